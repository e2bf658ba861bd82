//! Post-processing: the researcher's HAVING, ORDER BY, LIMIT, windows and
//! arithmetic, run by DataFusion over a table of the noisy cells only.

use super::*;

/// The researcher's plan with its release aggregate replaced by a table of
/// the noisy cells: HAVING, ORDER BY, LIMIT, windows and arithmetic then
/// see released values only. Each output row carries its cell's id.
pub(super) fn post_plan(
    plan: &PrivatePlan,
    cells: &[Key],
    agg_cells: &[Vec<Cell>],
) -> Result<LogicalPlan, QueryError> {
    let internal = |e: datafusion::error::DataFusionError| {
        QueryError::Internal(format!("post-processing: {e}"))
    };
    let n_keys = plan.keys.len();
    let schema = &plan.agg_schema;
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for (i, (_, f)) in schema.iter().enumerate() {
        let values: Vec<ScalarValue> = (0..cells.len())
            .map(|r| {
                let v = if i < n_keys {
                    cells[r][i].clone()
                } else {
                    match &agg_cells[r][i] {
                        Cell::Value { value: Some(v), .. } => ScalarValue::Float64(Some(*v)),
                        _ => ScalarValue::Float64(None),
                    }
                };
                v.cast_to(f.data_type())
                    .or_else(|_| ScalarValue::try_from(f.data_type()))
            })
            .collect::<Result<_, _>>()
            .map_err(internal)?;
        let array = if values.is_empty() {
            datafusion::arrow::array::new_empty_array(f.data_type())
        } else {
            ScalarValue::iter_to_array(values).map_err(internal)?
        };
        fields.push(Field::new(format!("__c{i}"), f.data_type().clone(), true));
        arrays.push(array);
    }
    fields.push(Field::new(CELL_ID, DataType::UInt64, false));
    arrays.push(Arc::new(UInt64Array::from_iter_values(
        0..cells.len() as u64,
    )));
    let arrow_schema = Arc::new(Schema::new(fields));
    let batch =
        RecordBatch::try_new(Arc::clone(&arrow_schema), arrays).map_err(|e| internal(e.into()))?;
    let table = MemTable::try_new(arrow_schema, vec![vec![batch]]).map_err(internal)?;
    // The noisy table, shaped exactly like the release aggregate's output.
    let mut exprs: Vec<Expr> = schema
        .iter()
        .enumerate()
        .map(|(i, (q, f))| {
            Expr::Column(Column::from_name(format!("__c{i}"))).alias_qualified(q.cloned(), f.name())
        })
        .collect();
    exprs.push(Expr::Column(Column::new(Some("__tre_noisy"), CELL_ID)).alias(CELL_ID));
    let noisy = LogicalPlanBuilder::scan("__tre_noisy", provider_as_source(Arc::new(table)), None)
        .and_then(|b| b.project(exprs))
        .and_then(|b| b.build())
        .map_err(internal)?;
    let mut replaced = false;
    let post = plan
        .post
        .clone()
        .transform_down(|node| match node {
            LogicalPlan::Aggregate(_) if !replaced => {
                replaced = true;
                Ok(Transformed::new(
                    noisy.clone(),
                    true,
                    TreeNodeRecursion::Jump,
                ))
            }
            other => Ok(Transformed::no(other)),
        })
        .map_err(internal)?
        .data
        .transform_up(|node| match node {
            LogicalPlan::Projection(mut p) => {
                let id = Expr::Column(Column::from_name(CELL_ID));
                let has_id = p.schema.fields().iter().any(|f| f.name() == CELL_ID);
                if !has_id {
                    p.expr.push(id);
                }
                LogicalPlan::Projection(p)
                    .recompute_schema()
                    .map(Transformed::yes)
            }
            other => other.recompute_schema().map(Transformed::yes),
        })
        .map_err(internal)?
        .data;
    Ok(post)
}

/// Run the researcher's post-processing (HAVING, ORDER BY, LIMIT,
/// arithmetic) over the noisy cells, in DataFusion, and map each output
/// column back to its noisy cell where it passes one through unchanged.
pub(super) async fn post_process(
    ctx: &SessionContext,
    plan: &PrivatePlan,
    cells: &[Key],
    agg_cells: &[Vec<Cell>],
) -> Result<Vec<Vec<Cell>>, QueryError> {
    let internal = |e: datafusion::error::DataFusionError| {
        QueryError::Internal(format!("post-processing: {e}"))
    };
    let post = post_plan(plan, cells, agg_cells)?;
    let batches = collect(ctx, &Prepared::default(), &post)
        .await
        .map_err(|e| match e {
            QueryError::Execution { detail } => {
                QueryError::Internal(format!("post-processing: {detail}"))
            }
            other => other,
        })?;
    let mut rows = Vec::new();
    for b in &batches {
        let id_col = b
            .schema()
            .index_of(CELL_ID)
            .map_err(|e| internal(e.into()))?;
        let ids = b
            .column(id_col)
            .as_primitive_opt::<datafusion::arrow::datatypes::UInt64Type>()
            .ok_or_else(|| QueryError::Internal("cell id type".into()))?;
        for r in 0..b.num_rows() {
            let cell_row = usize::try_from(ids.value(r))
                .ok()
                .and_then(|i| agg_cells.get(i));
            let mut row = Vec::with_capacity(plan.columns.len());
            for (c, col) in plan.columns.iter().enumerate() {
                let passed = col.source.and_then(|s| cell_row.and_then(|cr| cr.get(s)));
                row.push(match passed {
                    Some(cell) => cell.clone(),
                    None => {
                        let v = ScalarValue::try_from_array(b.column(c), r).map_err(internal)?;
                        let value = relation_f64(&v);
                        match value {
                            Some(x) => value_cell(
                                Some(x),
                                None,
                                tre_sdc::Status::Released,
                                "computed from released values".into(),
                            ),
                            None if v.is_null() => value_cell(
                                None,
                                None,
                                tre_sdc::Status::Suppressed,
                                "computed from a suppressed value".into(),
                            ),
                            None => Cell::Key {
                                value: v.to_string(),
                            },
                        }
                    }
                });
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

pub(super) fn relation_f64(v: &ScalarValue) -> Option<f64> {
    if v.is_null() || !v.data_type().is_numeric() {
        return None;
    }
    match v.cast_to(&DataType::Float64).ok()? {
        ScalarValue::Float64(Some(f)) => Some(f),
        _ => None,
    }
}
