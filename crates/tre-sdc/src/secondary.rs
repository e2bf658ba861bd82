//! Secondary suppression for releases that carry totals.
//!
//! A table with totals is a set of linear equations: each line (a row or a
//! column of cells) sums to its total. If a cell is suppressed but every
//! other cell and total of its line is shown, the cell is the difference:
//! suppressing it protected nothing. More generally a suppressed cell is
//! exposed when it is fixed by the equations of the cells and totals still
//! shown. `protect` suppresses further cells, smallest first, until no
//! suppressed cell is fixed; `exposed` is the test it uses.
//!
//! The values here are noisy, so this is post-processing and keeps the DP
//! guarantee; it removes the arithmetic route to a suppressed value, which
//! is what output checkers look for.

/// One line of a table: its cells and the cell holding their total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub members: Vec<usize>,
    pub total: usize,
}

/// The suppressed cells that the shown cells and totals fix exactly.
pub fn exposed(suppressed: &[bool], lines: &[Line]) -> Vec<usize> {
    let unknowns: Vec<usize> = (0..suppressed.len()).filter(|i| suppressed[*i]).collect();
    let col = |cell: usize| unknowns.iter().position(|u| *u == cell);
    // One equation per line, over the unknowns only: Σ members − total = known.
    let mut rows: Vec<Vec<f64>> = lines
        .iter()
        .map(|l| {
            let mut r = vec![0.0; unknowns.len()];
            for m in &l.members {
                if let Some(c) = col(*m) {
                    r[c] += 1.0;
                }
            }
            if let Some(c) = col(l.total) {
                r[c] -= 1.0;
            }
            r
        })
        .filter(|r| r.iter().any(|v| *v != 0.0))
        .collect();
    let pivots = reduce(&mut rows);
    // A cell is fixed iff its unit vector lies in the row space.
    (0..unknowns.len())
        .filter(|&u| {
            let mut v = vec![0.0; unknowns.len()];
            v[u] = 1.0;
            for (row, &p) in rows.iter().zip(&pivots) {
                let f = v[p];
                if f != 0.0 {
                    for (x, r) in v.iter_mut().zip(row) {
                        *x -= f * r;
                    }
                }
            }
            v.iter().all(|x| x.abs() < 1e-9)
        })
        .map(|u| unknowns[u])
        .collect()
}

/// Reduced row echelon form in place; returns each kept row's pivot column.
fn reduce(rows: &mut Vec<Vec<f64>>) -> Vec<usize> {
    let width = rows.first().map_or(0, Vec::len);
    let mut pivots = Vec::new();
    let mut r = 0;
    for c in 0..width {
        let Some(p) =
            (r..rows.len()).max_by(|a, b| rows[*a][c].abs().total_cmp(&rows[*b][c].abs()))
        else {
            break;
        };
        if rows[p][c].abs() < 1e-9 {
            continue;
        }
        rows.swap(r, p);
        let lead = rows[r][c];
        for x in rows[r].iter_mut() {
            *x /= lead;
        }
        for i in 0..rows.len() {
            if i != r && rows[i][c].abs() > 1e-12 {
                let f = rows[i][c];
                let pivot_row = rows[r].clone();
                for (x, y) in rows[i].iter_mut().zip(&pivot_row) {
                    *x -= f * y;
                }
            }
        }
        pivots.push(c);
        r += 1;
        if r == rows.len() {
            break;
        }
    }
    rows.truncate(r);
    pivots
}

/// Suppress more cells until no suppressed cell is exposed. Each step
/// takes the smallest shown cell on a line through an exposed cell (a total
/// only when those lines show no cell). Returns the cells added, in order.
pub fn protect(values: &[f64], suppressed: &mut [bool], lines: &[Line]) -> Vec<usize> {
    let mut added = Vec::new();
    loop {
        let open = exposed(suppressed, lines);
        if open.is_empty() {
            break;
        }
        let through: Vec<&Line> = lines
            .iter()
            .filter(|l| open.iter().any(|c| l.total == *c || l.members.contains(c)))
            .collect();
        let smallest = |cands: &mut dyn Iterator<Item = usize>| {
            cands
                .filter(|i| !suppressed[*i])
                .min_by(|a, b| values[*a].total_cmp(&values[*b]).then(a.cmp(b)))
        };
        let pick = smallest(&mut through.iter().flat_map(|l| l.members.iter().copied()))
            .or_else(|| smallest(&mut through.iter().map(|l| l.total)))
            .or_else(|| smallest(&mut (0..values.len())));
        let Some(p) = pick else {
            break;
        };
        suppressed[p] = true;
        added.push(p);
    }
    added
}

/// A one-way table: cells `0..n` and their total at `n`.
pub fn one_way(n: usize) -> (usize, Vec<Line>) {
    (
        n + 1,
        vec![Line {
            members: (0..n).collect(),
            total: n,
        }],
    )
}

/// The lines of a table of `rows` × `cols` cells stored row by row, with a
/// total per row (after the cells), a total per column, and a grand total:
/// cells `0..r*c`, row totals `r*c..r*c+r`, column totals after them, then
/// the grand total.
pub fn two_way(rows: usize, cols: usize) -> (usize, Vec<Line>) {
    let cell = |i: usize, j: usize| i * cols + j;
    let row_total = |i: usize| rows * cols + i;
    let col_total = |j: usize| rows * cols + rows + j;
    let grand = rows * cols + rows + cols;
    let mut lines = Vec::new();
    for i in 0..rows {
        lines.push(Line {
            members: (0..cols).map(|j| cell(i, j)).collect(),
            total: row_total(i),
        });
    }
    for j in 0..cols {
        lines.push(Line {
            members: (0..rows).map(|i| cell(i, j)).collect(),
            total: col_total(j),
        });
    }
    lines.push(Line {
        members: (0..rows).map(row_total).collect(),
        total: grand,
    });
    lines.push(Line {
        members: (0..cols).map(col_total).collect(),
        total: grand,
    });
    (grand + 1, lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// An independent oracle. The equations of a table with totals form a
    /// network matrix (totally unimodular), so if a suppressed cell can
    /// change at all it can change along a vector of -1, 0 and +1 that
    /// keeps every line's sum: search those exhaustively.
    fn can_move(cell: usize, suppressed: &[bool], lines: &[Line]) -> bool {
        let unknowns: Vec<usize> = (0..suppressed.len()).filter(|i| suppressed[*i]).collect();
        let n = unknowns.len();
        let mut v = vec![0i64; suppressed.len()];
        let total = 3usize.pow(n as u32);
        (0..total).any(|mut code| {
            for u in &unknowns {
                v[*u] = (code % 3) as i64 - 1;
                code /= 3;
            }
            v[cell] != 0
                && lines
                    .iter()
                    .all(|l| l.members.iter().map(|m| v[*m]).sum::<i64>() == v[l.total])
        })
    }

    /// Issue #5: for random tables with totals, after `protect` no
    /// suppressed value can be solved from the released cells and totals.
    #[test]
    fn no_suppressed_value_can_be_solved_from_a_protected_table() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (mut tables, mut checked) = (0, 0);
        while checked < 400 {
            let (rows, cols) = (rng.random_range(1..=3), rng.random_range(2..=4));
            let (n, lines) = if rows == 1 {
                one_way(cols)
            } else {
                two_way(rows, cols)
            };
            let mut values = vec![0.0; n];
            for v in values.iter_mut().take(rows * cols) {
                *v = if rng.random_bool(0.35) {
                    rng.random_range(0..10) as f64
                } else {
                    rng.random_range(10..200) as f64
                };
            }
            // Totals are sums of the (noisy) cells, lines in order: row
            // totals and column totals before the grand total.
            for l in &lines {
                values[l.total] = l.members.iter().map(|m| values[*m]).sum();
            }
            // Primary suppression: the threshold rule on every cell and total.
            let mut suppressed: Vec<bool> = values.iter().map(|v| *v < 10.0).collect();
            protect(&values, &mut suppressed, &lines);
            tables += 1;
            let hidden = suppressed.iter().filter(|s| **s).count();
            assert!(exposed(&suppressed, &lines).is_empty());
            if hidden == 0 || hidden > 11 {
                continue;
            }
            for cell in (0..n).filter(|i| suppressed[*i]) {
                assert!(
                    can_move(cell, &suppressed, &lines),
                    "{rows}x{cols} table {values:?}: cell {cell} is fixed; suppressed {suppressed:?}"
                );
            }
            checked += 1;
        }
        assert!(tables >= checked);
    }

    #[test]
    fn a_lone_suppressed_cell_takes_its_smallest_neighbour_with_it() {
        // 3 | 50 | 7 | 100, total 160: hiding the 3 alone hides nothing.
        let (n, lines) = one_way(4);
        let values = [3.0, 50.0, 7.0, 100.0, 160.0];
        assert_eq!(n, values.len());
        let mut suppressed = vec![true, false, false, false, false];
        assert_eq!(exposed(&suppressed, &lines), vec![0]);
        assert_eq!(protect(&values, &mut suppressed, &lines), vec![2]);
        assert!(exposed(&suppressed, &lines).is_empty());
    }

    #[test]
    fn a_two_way_table_is_protected_along_rows_and_columns() {
        // 2 x 2 with margins: 4 | 30 / 40 | 50; row totals 34, 90; column
        // totals 44, 80; grand 124. Hiding the 4 needs a rectangle.
        let (n, lines) = two_way(2, 2);
        let values = [4.0, 30.0, 40.0, 50.0, 34.0, 90.0, 44.0, 80.0, 124.0];
        let mut suppressed = vec![false; n];
        suppressed[0] = true;
        let added = protect(&values, &mut suppressed, &lines);
        assert_eq!(added.len(), 3, "{added:?}");
        assert!(suppressed[..4].iter().all(|s| *s));
        assert!(exposed(&suppressed, &lines).is_empty());
    }
}
