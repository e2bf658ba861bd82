//! Bounds on the SQL text and its syntax tree, checked before DataFusion
//! plans anything (issue #11).
//!
//! Every later stage — DataFusion's planner, the analyzer, tre's own walks
//! in `relation`, `total` and the rewrite — recurses over the plan, and its
//! time and memory grow with the number of CTEs, joins and columns. Without
//! these bounds one free DryRun of a 2,000-term `AND` chain overflowed the
//! stack and killed the server, and a 10,000-deep CTE chain compiled into
//! 12.5 GB. With them, every input that reaches the planner is small.
//!
//! The checks themselves must not recurse without a bound either: the text
//! is capped in bytes and tokens first (the tokenizer is a loop), and the
//! parse, the tree walk and the drop of a refused tree run on a thread with
//! a stack large enough for the deepest tree the token cap allows.

use std::ops::ControlFlow;

use datafusion::sql::parser::{DFParserBuilder, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::{
    Expr, Select, Statement as SqlStatement, TableFactor, Visit, Visitor,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use tre_core::Code;

use super::refuse;
use crate::QueryError;

/// The limits on one query's SQL. Research queries we have seen are well
/// under a tenth of each; ARCHITECTURE.md lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlLimits {
    /// Bytes of SQL text.
    pub max_bytes: usize,
    /// Tokens other than whitespace and comments.
    pub max_tokens: usize,
    /// Nesting of expressions (`a AND b AND c` nests three deep).
    pub max_expr_depth: usize,
    /// SELECT blocks: CTEs, subqueries, derived tables and UNION branches.
    pub max_selects: usize,
    /// Joins in all FROM clauses together: explicit, by comma, nested in
    /// parentheses, or a derived table.
    pub max_joins: usize,
    /// Items in one SELECT list.
    pub max_select_items: usize,
    /// Nesting of parentheses and brackets, counted on the tokens before
    /// anything is parsed. sqlparser parses a keyword followed by `(` two
    /// ways when the first fails (`NOT (…)` as an operator, then as a
    /// function call), so each level of a malformed nest doubles the parse:
    /// `NOT (` nested 40 deep parsed for minutes, and no parse can be
    /// stopped once started. The fuzzer found it (issue #11).
    pub max_paren_depth: usize,
}

/// The limits every gateway applies.
pub const SQL_LIMITS: SqlLimits = SqlLimits {
    max_bytes: 64 * 1024,
    max_tokens: 8_192,
    max_expr_depth: 100,
    max_selects: 32,
    max_joins: 16,
    max_select_items: 128,
    max_paren_depth: 12,
};

/// The checking thread's stack. The deepest tree 8,192 tokens can build is
/// about 4,000 levels (`SELECT 1 UNION ALL SELECT 1 ...`); sqlparser's
/// visitor and the drop of such a tree take well under 4 KiB per level in a
/// debug build.
const CHECK_STACK_BYTES: usize = 64 << 20;

/// Tokenize, parse and bound `sql`, returning its SQL statements only when
/// every limit holds; DataFusion's own statements (EXPLAIN, COPY, DDL) are
/// refused here. Runs on its own thread with a known stack; the caller
/// blocks for at most the time the tokenizer and parser need for 64 KiB.
pub(crate) fn parse_bounded(sql: &str, limits: SqlLimits) -> Result<Vec<SqlStatement>, QueryError> {
    if sql.len() > limits.max_bytes {
        return Err(too_long(format!(
            "{} bytes of SQL; send at most {}",
            sql.len(),
            limits.max_bytes
        )));
    }
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("tre-parse".into())
            .stack_size(CHECK_STACK_BYTES)
            .spawn_scoped(s, || parse_on_this_thread(sql, limits))
            .map_err(|e| QueryError::Internal(format!("cannot start the parse thread: {e}")))?
            .join()
            .map_err(|_| QueryError::Internal("the parser panicked".into()))?
    })
}

fn parse_on_this_thread(sql: &str, limits: SqlLimits) -> Result<Vec<SqlStatement>, QueryError> {
    let dialect = GenericDialect {};
    let syntax =
        |e: &dyn std::fmt::Display| refuse(Code::SqlSyntax, format!("the SQL does not parse: {e}"));
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| syntax(&e))?;
    let significant = tokens
        .iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .count();
    if significant > limits.max_tokens {
        return Err(too_long(format!(
            "{significant} tokens of SQL; send at most {}",
            limits.max_tokens
        )));
    }
    let mut depth = 0usize;
    for t in &tokens {
        match t.token {
            Token::LParen | Token::LBracket | Token::LBrace => {
                depth += 1;
                if depth > limits.max_paren_depth {
                    return Err(refuse(
                        Code::QueryTooComplex,
                        format!(
                            "the query is too complex: parentheses nested more than {} deep; flatten it (CTEs help)",
                            limits.max_paren_depth
                        ),
                    ));
                }
            }
            Token::RParen | Token::RBracket | Token::RBrace => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    let statements = DFParserBuilder::new(tokens)
        .with_dialect(&dialect)
        .build()
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| syntax(&e))?;
    let mut counter = Counter {
        limits,
        depth: 0,
        selects: 0,
        relations: 0,
    };
    let mut sql_statements = Vec::with_capacity(statements.len());
    for s in statements {
        // DataFusion's own statements are refused here, not by the caller:
        // they can wrap a query (`EXPLAIN`, `COPY (...) TO`) the walk has
        // not bounded, and such a tree must be dropped on this stack.
        match s {
            DfStatement::Statement(s) => {
                if let ControlFlow::Break(e) = s.visit(&mut counter) {
                    return Err(e);
                }
                sql_statements.push(*s);
            }
            DfStatement::Explain(_) => return Err(super::explain_refusal()),
            _ => return Err(super::not_sql_statement_refusal()),
        }
    }
    Ok(sql_statements)
}

fn too_long(what: String) -> QueryError {
    refuse(
        Code::SqlTooLong,
        format!("the query is too long: {what}; split it into smaller queries"),
    )
}

fn too_complex(what: &str, limit: usize) -> ControlFlow<QueryError> {
    ControlFlow::Break(refuse(
        Code::QueryTooComplex,
        format!(
            "the query is too complex: more than {limit} {what}; simplify it (IN lists and CASE are flat) or split it into smaller queries"
        ),
    ))
}

/// Counts as it walks and stops at the first limit broken, so the walk
/// never goes deeper than the expression limit inside an expression.
struct Counter {
    limits: SqlLimits,
    depth: usize,
    selects: usize,
    relations: usize,
}

impl Visitor for Counter {
    type Break = QueryError;

    fn pre_visit_expr(&mut self, _: &Expr) -> ControlFlow<QueryError> {
        self.depth += 1;
        if self.depth > self.limits.max_expr_depth {
            return too_complex("levels of nested expressions", self.limits.max_expr_depth);
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<QueryError> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<QueryError> {
        self.selects += 1;
        if self.selects > self.limits.max_selects {
            return too_complex(
                "SELECT blocks (CTEs, subqueries and UNION branches)",
                self.limits.max_selects,
            );
        }
        if select.projection.len() > self.limits.max_select_items {
            return too_complex("columns in one SELECT list", self.limits.max_select_items);
        }
        ControlFlow::Continue(())
    }

    /// Each SELECT's first relation is free; every further one is a join
    /// (explicit, by comma, or inside parentheses), and a derived table
    /// counts as one too. A SELECT is visited before its FROM clause, so the
    /// running counts are enough.
    fn pre_visit_table_factor(&mut self, _: &TableFactor) -> ControlFlow<QueryError> {
        self.relations += 1;
        if self.relations > self.selects + self.limits.max_joins {
            return too_complex("joins", self.limits.max_joins);
        }
        ControlFlow::Continue(())
    }
}
