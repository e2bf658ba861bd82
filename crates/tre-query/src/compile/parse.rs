//! Stage 1: one SQL statement, parsed and planned by DataFusion, with
//! planning failures turned into coded refusals.

use super::*;

pub(super) async fn parse(ctx: &SessionContext, sql: &str) -> Result<LogicalPlan, QueryError> {
    let mut statements = bounds::parse_bounded(sql, bounds::SQL_LIMITS)?;
    if statements.len() != 1 {
        return Err(refuse(
            Code::MultipleStatements,
            format!(
                "send exactly one SELECT statement, not {}",
                statements.len()
            ),
        ));
    }
    let Some(statement) = statements.pop() else {
        return Err(refuse(
            Code::MultipleStatements,
            "send exactly one SELECT statement",
        ));
    };
    match &statement {
        SqlStatement::Query(_) => {}
        SqlStatement::Explain { .. } | SqlStatement::ExplainTable { .. } => {
            return Err(explain_refusal());
        }
        other => {
            let kind = other.to_string();
            let kind: String = kind
                .split_whitespace()
                .next()
                .unwrap_or("this")
                .to_uppercase();
            return Err(refuse(
                Code::StatementNotAllowed,
                format!(
                    "{kind} statements are not allowed; only SELECT queries that return aggregates are accepted"
                ),
            ));
        }
    }
    let state = ctx.state();
    let plan = state
        .statement_to_plan(DfStatement::Statement(Box::new(statement)))
        .await
        .map_err(|e| planning_refusal(&e.to_string()))?;
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(|_| {
            refuse(
                Code::StatementNotAllowed,
                "only SELECT queries are accepted",
            )
        })?;
    // Type coercion only: the plan keeps its shape.
    state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})
        .map_err(|e| planning_refusal(&e.to_string()))
}

/// DataFusion's own statements (CREATE EXTERNAL TABLE, COPY, SET, RESET).
pub(super) fn not_sql_statement_refusal() -> QueryError {
    refuse(
        Code::StatementNotAllowed,
        "DDL, COPY and SET are not allowed; only SELECT queries that return aggregates are accepted",
    )
}

pub(super) fn explain_refusal() -> QueryError {
    refuse(
        Code::ExplainNotAllowed,
        "EXPLAIN is not allowed (EXPLAIN ANALYZE would reveal row counts); use a dry run to see the accepted plan and its cost",
    )
}

/// Planning errors depend only on the schema and the SQL text, never on
/// data, so their substance may be shown.
pub(super) fn planning_refusal(msg: &str) -> QueryError {
    let msg = msg.lines().next().unwrap_or_default();
    if msg.contains("table function") {
        return refuse(
            Code::TableFunction,
            "table functions (generate_series, range, read_parquet, ...) are not available; query the dataset's tables",
        );
    }
    if msg.contains("not found") && msg.contains("table") {
        let looks_like_path = msg.contains('/')
            || msg.contains('\\')
            || [".parquet", ".csv", ".json", ".arrow", ".avro"]
                .iter()
                .any(|x| msg.contains(x));
        return if looks_like_path {
            refuse(
                Code::FilePath,
                "files cannot be read from a query; use the dataset's tables (see `tre catalog`)",
            )
        } else {
            refuse(
                Code::UnknownTable,
                format!("{msg}; list the dataset's tables with the catalog service"),
            )
        };
    }
    if msg.contains("Invalid function") || msg.contains("function") && msg.contains("not found") {
        return refuse(
            Code::FunctionNotAllowed,
            format!("{msg}; see the catalog for the functions tre allows"),
        );
    }
    refuse(
        Code::SqlSyntax,
        format!("the query cannot be planned: {msg}"),
    )
}
