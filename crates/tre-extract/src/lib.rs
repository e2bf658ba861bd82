//! The extract format: one Parquet file per table, written only through
//! [`ExtractWriter`]. The writer checks that rows arrive in privacy-unit
//! order (it sorts nothing), keeps at most `max_rows_per_unit` rows per unit
//! (chosen uniformly at random by a CSPRNG, so that the bound biases no
//! estimate), stores each range of units it is given in row groups of its
//! own ([`UnitRanges`]), and records what it enforced, the [`Layout`], in
//! the file's footer. Served extracts are encrypted with the footer encrypted: AES-GCM
//! under a data key that only the master key unwraps, with the file identity
//! bound in as AAD. So a layout that authenticates was written by this code,
//! and the order and the bound are facts the writer checked, not claims a
//! reader must trust. [`open`] reads a file's schema and layout and refuses
//! a file without them (issue #13).
//!
//! This crate must never depend on DataFusion, the query engine, storage or
//! the network: it writes and reads files. Key bytes stay in tre-vault.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt64Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::row::{OwnedRow, RowConverter, SortField};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use tre_core::Code;
use tre_vault::MasterKey;

/// The footer key under which the layout is stored, as JSON.
pub const LAYOUT_KEY: &str = "tre.layout";

/// The one layout format this code writes and reads.
const FORMAT: u32 = 1;

/// Rows of one unit the writer holds while it waits for the unit's end.
/// Past this one unit's rows would no longer be bounded in memory, and no
/// real record has a million rows for one patient in one table.
pub const MAX_ROWS_HELD_PER_UNIT: usize = 1 << 20;

/// Rows per row group: small enough to stream, large enough to compress.
const ROW_GROUP_ROWS: usize = 64 * 1024;

/// Encrypted extracts end with this magic; plaintext ones with `PAR1`.
const ENCRYPTED_FOOTER_MAGIC: &[u8; 4] = b"PARE";

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("{code} cannot write {path}: {reason}", code = self.code())]
    Write { path: String, reason: String },
    #[error("{code} rows for {path} are not in {unit} order; sort them by {unit} before writing", code = self.code())]
    OutOfOrder { path: String, unit: String },
    #[error("{code} {path} has a row without {unit}; every row needs its privacy unit", code = self.code())]
    NullUnit { path: String, unit: String },
    #[error("{code} one {unit} in {path} has more than {MAX_ROWS_HELD_PER_UNIT} rows; check the extract's linkage", code = self.code())]
    UnitTooLarge { path: String, unit: String },
    #[error("{code} {path} has no column {unit}; every table needs the privacy unit", code = self.code())]
    NoUnitColumn { path: String, unit: String },
    #[error("{code} {path}: keep at least one row per unit (max_rows_per_unit ≥ 1)", code = self.code())]
    ZeroBound { path: String },
    #[error("{code} {path}: opt-outs can be removed only where {unit} is text", code = self.code())]
    TextUnitsOnly { path: String, unit: String },
    #[error("{code} {path}: unit ranges need text units and strictly ascending splits", code = self.code())]
    BadUnitRanges { path: String },
    #[error("{code} {path}: column {column} has more than {cap} distinct values, its policy's max_distinct; raise the cap or check the extract", code = self.code())]
    TooManyDistinct {
        path: String,
        column: String,
        cap: u64,
    },
    #[error("{code} {path}: max_distinct applies to a text column; {column} is not one", code = self.code())]
    DistinctCapNotText { path: String, column: String },
    #[error("{code} extract {file} is not encrypted with an encrypted footer; only extracts tre wrote encrypted are served", code = self.code())]
    NotEncrypted { file: String },
    #[error("{code} extract {file} has no tre layout (order and rows per unit); write it again with `tre dataset generate`", code = self.code())]
    NoLayout { file: String },
    #[error(transparent)]
    Vault(#[from] tre_vault::VaultError),
}

impl ExtractError {
    /// The stable code, written once: the message's prefix comes from here.
    pub fn code(&self) -> Code {
        match self {
            ExtractError::Write { .. } => Code::Internal,
            ExtractError::OutOfOrder { .. }
            | ExtractError::NullUnit { .. }
            | ExtractError::UnitTooLarge { .. }
            | ExtractError::NoUnitColumn { .. }
            | ExtractError::ZeroBound { .. }
            | ExtractError::TextUnitsOnly { .. }
            | ExtractError::BadUnitRanges { .. }
            | ExtractError::TooManyDistinct { .. }
            | ExtractError::DistinctCapNotText { .. }
            | ExtractError::NotEncrypted { .. }
            | ExtractError::NoLayout { .. } => Code::ExtractLayout,
            ExtractError::Vault(e) => e.code(),
        }
    }
}

/// How an extract is protected on disk.
pub enum Protection<'a> {
    /// Parquet modular encryption under a per-file data key, footer
    /// encrypted, file identity `file_id` bound in as AAD.
    Encrypted {
        master: &'a MasterKey,
        file_id: &'a str,
    },
    /// Plaintext, for benchmark baselines only; never served.
    Plaintext,
}

/// What the writer enforced, stored in the footer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub format: u32,
    /// Rows are in ascending order of this column (the privacy unit), and
    /// all rows of one unit are adjacent.
    pub sorted_by: String,
    /// No unit has more rows than this.
    pub max_rows_per_unit: u32,
    pub rows: u64,
    pub units: u64,
    /// Rows the bound removed, for the custodian's record.
    pub rows_dropped: u64,
    /// The opt-outs removed when the extract was written, if any.
    #[serde(default)]
    pub opt_outs_removed: Option<OptOutsRemoved>,
    /// Where each range of units starts, if the writer was given ranges.
    #[serde(default)]
    pub unit_ranges: Option<UnitRanges>,
    /// Columns whose distinct non-null values the writer held to a cap.
    #[serde(default)]
    pub distinct_caps: std::collections::BTreeMap<String, u64>,
}

/// Ranges of the unit's values, each stored in row groups of its own
/// (issue #13). Range `r` holds the units `u` with
/// `splits[r-1] <= u < splits[r]` (unbounded at either end), in row groups
/// `first_row_group[r]..first_row_group[r+1]` (to the file's last for the
/// last range). Every table of a dataset written with the same splits is
/// partitioned alike, so a reader can give each worker the same ranges of
/// every table: work per patient and joins on the unit then need no
/// exchange of rows between workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitRanges {
    pub splits: Vec<String>,
    pub first_row_group: Vec<u64>,
}

impl UnitRanges {
    /// The row groups of ranges `ranges`, in a file of `row_groups` row
    /// groups; `None` if the recorded starts do not fit that file.
    pub fn row_groups(
        &self,
        ranges: std::ops::Range<usize>,
        row_groups: usize,
    ) -> Option<std::ops::Range<usize>> {
        let start = |r: usize| -> Option<usize> {
            if r == self.first_row_group.len() {
                Some(row_groups)
            } else {
                usize::try_from(*self.first_row_group.get(r)?).ok()
            }
        };
        let (from, to) = (start(ranges.start)?, start(ranges.end)?);
        (from <= to && to <= row_groups).then_some(from..to)
    }
}

/// Opted-out patients whose rows the writer left out (issue #13): the
/// server skips its own opt-out filter on this table only when `digest`
/// equals the digest of the opt-outs it reads at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptOutsRemoved {
    /// The opt-out column, `table.column`.
    pub source: String,
    /// `opt_out_digest` of the opted-out units.
    pub digest: String,
    /// Units in the opt-out set, and rows left out because of it.
    pub units: u64,
    pub rows: u64,
}

/// The identity bound into each extract (AAD prefix and key wrapping): the
/// dataset directory name and the file name. Whatever writes an extract
/// and whatever reads it must agree on it.
pub fn file_id(dataset: &str, table: &str) -> String {
    format!("{dataset}/{table}.parquet")
}

/// The file (`<name>.parquet` in a dataset's directory) holding the latest
/// National Data Opt-out list: one column, the privacy unit, written by
/// [`ExtractWriter`] like any extract (issue #15).
pub const OPT_OUT_LIST: &str = "_opt_outs";

/// SHA-256 over the sorted, newline-terminated units: the same set gives
/// the same digest whatever order it is read in.
pub fn opt_out_digest<'a>(units: impl IntoIterator<Item = &'a str>) -> String {
    let mut sorted: Vec<&str> = units.into_iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for u in sorted {
        ctx.update(u.as_bytes());
        ctx.update(b"\n");
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes one extract: checks the unit order, bounds rows per unit, and
/// stores the layout. The file appears under its name only when `close`
/// succeeds, so a failed write never leaves a half extract to serve.
pub struct ExtractWriter {
    path: PathBuf,
    partial: PathBuf,
    schema: SchemaRef,
    writer: ArrowWriter<File>,
    unit_index: usize,
    units: RowConverter,
    /// The last unit whose rows were written.
    last: Option<OwnedRow>,
    /// Rows of the unit that may continue in the next batch.
    held: Option<RecordBatch>,
    sampler: ChaCha20Rng,
    layout: Layout,
    /// Units whose rows are left out (opted out).
    excluded: Option<Arc<HashSet<String>>>,
    /// The next range's index, while unit ranges are being written.
    next_range: usize,
    /// Per capped column: its index, its cap, and the values seen so far.
    distinct: Vec<(usize, u64, HashSet<String>)>,
}

impl ExtractWriter {
    /// Start `path`. `seed` drives the choice of rows kept for a unit with
    /// more than `max_rows_per_unit`: pass fresh OS randomness for real
    /// data; the synthetic generator passes one derived from its seed so
    /// that a dataset can be made again.
    pub fn create(
        path: &Path,
        schema: SchemaRef,
        unit: &str,
        max_rows_per_unit: u32,
        protection: Protection<'_>,
        seed: [u8; 32],
    ) -> Result<Self, ExtractError> {
        let shown = path.display().to_string();
        let unit_index = schema
            .index_of(unit)
            .map_err(|_| ExtractError::NoUnitColumn {
                path: shown.clone(),
                unit: unit.to_owned(),
            })?;
        if max_rows_per_unit == 0 {
            return Err(ExtractError::ZeroBound { path: shown });
        }
        let write = |e: &dyn std::fmt::Display| ExtractError::Write {
            path: shown.clone(),
            reason: e.to_string(),
        };
        let mut props =
            WriterProperties::builder().set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
        if let Protection::Encrypted { master, file_id } = protection {
            props = props.with_file_encryption_properties(master.file_encryption(file_id)?);
        }
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::create(&partial).map_err(|e| write(&e))?;
        let writer = ArrowWriter::try_new(file, Arc::clone(&schema), Some(props.build()))
            .map_err(|e| write(&e))?;
        let units = RowConverter::new(vec![SortField::new(
            schema.field(unit_index).data_type().clone(),
        )])
        .map_err(|e| write(&e))?;
        Ok(Self {
            path: path.to_owned(),
            partial,
            schema,
            writer,
            unit_index,
            units,
            last: None,
            held: None,
            sampler: ChaCha20Rng::from_seed(seed),
            layout: Layout {
                format: FORMAT,
                sorted_by: unit.to_owned(),
                max_rows_per_unit,
                rows: 0,
                units: 0,
                rows_dropped: 0,
                opt_outs_removed: None,
                unit_ranges: None,
                distinct_caps: std::collections::BTreeMap::new(),
            },
            excluded: None,
            next_range: 1,
            distinct: Vec::new(),
        })
    }

    /// Leave out every row of the units in `opted_out`, the opt-outs of
    /// the column `source` (`table.column`), and record it in the layout.
    /// Only text units can be opted out.
    pub fn excluding(
        mut self,
        opted_out: Arc<HashSet<String>>,
        source: &str,
    ) -> Result<Self, ExtractError> {
        if !self.text_units() {
            return Err(ExtractError::TextUnitsOnly {
                path: self.shown(),
                unit: self.layout.sorted_by.clone(),
            });
        }
        self.layout.opt_outs_removed = Some(OptOutsRemoved {
            source: source.to_owned(),
            digest: opt_out_digest(opted_out.iter().map(String::as_str)),
            units: opted_out.len() as u64,
            rows: 0,
        });
        self.excluded = Some(opted_out);
        Ok(self)
    }

    /// Store the units below each of `splits` (strictly ascending) in row
    /// groups apart from the units at or above it, and record where each
    /// range starts (see [`UnitRanges`]). Only text units can be split.
    pub fn with_unit_ranges(mut self, splits: Vec<String>) -> Result<Self, ExtractError> {
        if !self.text_units() || splits.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ExtractError::BadUnitRanges { path: self.shown() });
        }
        self.layout.unit_ranges = Some(UnitRanges {
            splits,
            first_row_group: vec![0],
        });
        Ok(self)
    }

    /// Refuse to write more than `cap` distinct non-null values of each
    /// text column in `caps`, and record the caps in the layout: what the
    /// compiler bounds the memory of grouping by such a column with.
    pub fn with_distinct_caps(
        mut self,
        caps: impl IntoIterator<Item = (String, u64)>,
    ) -> Result<Self, ExtractError> {
        for (column, cap) in caps {
            let index = self
                .schema
                .index_of(&column)
                .ok()
                .filter(|&i| self.is_text(i))
                .ok_or_else(|| ExtractError::DistinctCapNotText {
                    path: self.shown(),
                    column: column.clone(),
                })?;
            self.distinct.push((index, cap, HashSet::new()));
            self.layout.distinct_caps.insert(column, cap);
        }
        Ok(self)
    }

    fn text_units(&self) -> bool {
        self.is_text(self.unit_index)
    }

    /// Whether column `index` holds text ([`text_at`] reads it).
    fn is_text(&self, index: usize) -> bool {
        use arrow::datatypes::DataType;
        matches!(
            self.schema.field(index).data_type(),
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8
        )
    }

    /// Write `batch`, whose rows continue the unit order of earlier batches.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), ExtractError> {
        let batch = match self.held.take() {
            Some(held) => concat_batches(&self.schema, [&held, batch]).map_err(|e| self.err(&e))?,
            None => batch.clone(),
        };
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let column = Arc::clone(batch.column(self.unit_index));
        let column = &column;
        if column.null_count() > 0 {
            return Err(ExtractError::NullUnit {
                path: self.shown(),
                unit: self.layout.sorted_by.clone(),
            });
        }
        let units = self
            .units
            .convert_columns(&[Arc::clone(column)])
            .map_err(|e| self.err(&e))?;
        if self
            .last
            .as_ref()
            .is_some_and(|last| units.row(0) <= last.row())
        {
            return Err(self.out_of_order());
        }
        let mut keep = Vec::with_capacity(n);
        let mut start = 0;
        for i in 1..n {
            let (before, here) = (units.row(i - 1), units.row(i));
            if here == before {
                continue;
            }
            if here < before {
                return Err(self.out_of_order());
            }
            self.keep_unit(column, start, i, &mut keep);
            self.last = Some(before.owned());
            start = i;
        }
        // The last unit may go on in the next batch: hold it.
        if n - start > MAX_ROWS_HELD_PER_UNIT {
            return Err(ExtractError::UnitTooLarge {
                path: self.shown(),
                unit: self.layout.sorted_by.clone(),
            });
        }
        self.held = Some(batch.slice(start, n - start));
        self.write_rows(&batch, keep)
    }

    /// Write the last unit and the layout, and give the file its name.
    pub fn close(mut self) -> Result<Layout, ExtractError> {
        if let Some(held) = self.held.take() {
            let mut keep = Vec::with_capacity(held.num_rows());
            let column = Arc::clone(held.column(self.unit_index));
            self.keep_unit(&column, 0, held.num_rows(), &mut keep);
            self.write_rows(&held, keep)?;
        }
        // Ranges past the last unit are empty: they start at the end.
        if let Some(ranges) = &mut self.layout.unit_ranges {
            self.writer.flush().map_err(|e| ExtractError::Write {
                path: self.path.display().to_string(),
                reason: e.to_string(),
            })?;
            let end = self.writer.flushed_row_groups().len() as u64;
            ranges.first_row_group.resize(ranges.splits.len() + 1, end);
        }
        let json = serde_json::to_string(&self.layout).map_err(|e| self.err(&e))?;
        self.writer
            .append_key_value_metadata(KeyValue::new(LAYOUT_KEY.to_owned(), json));
        let shown = self.shown();
        let write = |e: &dyn std::fmt::Display| ExtractError::Write {
            path: shown.clone(),
            reason: e.to_string(),
        };
        self.writer.close().map_err(|e| write(&e))?;
        std::fs::rename(&self.partial, &self.path).map_err(|e| write(&e))?;
        Ok(self.layout)
    }

    /// Keep the rows `start..end` of one unit, or a uniform random
    /// `max_rows_per_unit` of them in their original order; none if the
    /// unit opted out.
    fn keep_unit(&mut self, units: &ArrayRef, start: usize, end: usize, keep: &mut Vec<u64>) {
        let n = end - start;
        if let (Some(set), Some(removed)) = (&self.excluded, &mut self.layout.opt_outs_removed)
            && text_at(units, start).is_some_and(|u| set.contains(u))
        {
            removed.rows += n as u64;
            return;
        }
        let bound = self.layout.max_rows_per_unit as usize;
        self.layout.units += 1;
        if n <= bound {
            keep.extend((start..end).map(|i| i as u64));
            self.layout.rows += n as u64;
            return;
        }
        let mut chosen = rand::seq::index::sample(&mut self.sampler, n, bound).into_vec();
        chosen.sort_unstable();
        keep.extend(chosen.into_iter().map(|i| (start + i) as u64));
        self.layout.rows += bound as u64;
        self.layout.rows_dropped += (n - bound) as u64;
    }

    fn write_rows(&mut self, batch: &RecordBatch, keep: Vec<u64>) -> Result<(), ExtractError> {
        if keep.is_empty() {
            return Ok(());
        }
        let rows = if keep.len() == batch.num_rows() {
            batch.clone()
        } else {
            take_record_batch(batch, &UInt64Array::from(keep)).map_err(|e| self.err(&e))?
        };
        self.count_distinct(&rows)?;
        let Some(ranges) = &self.layout.unit_ranges else {
            return self.writer.write(&rows).map_err(|e| self.err(&e));
        };
        // Cut a row group wherever the units reach the next split. The
        // rows are in unit order, so each split is a partition point.
        let units = Arc::clone(rows.column(self.unit_index));
        let n = rows.num_rows();
        let mut splits = ranges.splits.clone().into_iter().skip(self.next_range - 1);
        let mut from = 0;
        for split in splits.by_ref() {
            let at = first_at_or_above(&units, from, n, &split);
            if at == n {
                break;
            }
            if at > from {
                self.writer
                    .write(&rows.slice(from, at - from))
                    .map_err(|e| self.err(&e))?;
            }
            self.writer.flush().map_err(|e| self.err(&e))?;
            let start = self.writer.flushed_row_groups().len() as u64;
            if let Some(ranges) = &mut self.layout.unit_ranges {
                ranges.first_row_group.push(start);
            }
            self.next_range += 1;
            from = at;
        }
        if from < n {
            self.writer
                .write(&rows.slice(from, n - from))
                .map_err(|e| self.err(&e))?;
        }
        Ok(())
    }

    /// Add `rows`' values of the capped columns to those seen; past a
    /// cap, the extract is refused. The sets hold at most the caps.
    fn count_distinct(&mut self, rows: &RecordBatch) -> Result<(), ExtractError> {
        for k in 0..self.distinct.len() {
            let (index, cap, _) = self.distinct[k];
            let column = Arc::clone(rows.column(index));
            for i in 0..rows.num_rows() {
                let Some(value) = column.is_valid(i).then(|| text_at(&column, i)).flatten() else {
                    continue;
                };
                let seen = &mut self.distinct[k].2;
                if !seen.contains(value) {
                    if seen.len() as u64 >= cap {
                        return Err(ExtractError::TooManyDistinct {
                            path: self.shown(),
                            column: self.schema.field(index).name().clone(),
                            cap,
                        });
                    }
                    seen.insert(value.to_owned());
                }
            }
        }
        Ok(())
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn err(&self, e: &dyn std::fmt::Display) -> ExtractError {
        ExtractError::Write {
            path: self.shown(),
            reason: e.to_string(),
        }
    }

    fn out_of_order(&self) -> ExtractError {
        ExtractError::OutOfOrder {
            path: self.shown(),
            unit: self.layout.sorted_by.clone(),
        }
    }
}

/// The text at row `i` of a text column (the unit, or a capped column).
fn text_at(column: &ArrayRef, i: usize) -> Option<&str> {
    if let Some(a) = column.as_string_opt::<i32>() {
        Some(a.value(i))
    } else if let Some(a) = column.as_string_view_opt() {
        Some(a.value(i))
    } else {
        column.as_string_opt::<i64>().map(|a| a.value(i))
    }
}

/// The first row in `from..to` whose unit is at or above `split`, or `to`;
/// the units in that span are ascending.
fn first_at_or_above(units: &ArrayRef, from: usize, to: usize, split: &str) -> usize {
    let (mut lo, mut hi) = (from, to);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if text_at(units, mid).is_some_and(|u| u < split) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// An extract as the server sees it before serving it.
#[derive(Debug, Clone)]
pub struct Opened {
    pub schema: SchemaRef,
    pub layout: Layout,
    /// Row groups in the file, for placing `layout.unit_ranges`.
    pub row_groups: usize,
}

/// Open the encrypted extract at `path`, whose identity is `file_id`, and
/// read its schema and layout. Refuses a plaintext file or an encrypted one
/// with a plaintext footer (whose layout nothing authenticates), and a file
/// without a layout.
pub fn open(path: &Path, file_id: &str, master: &Arc<MasterKey>) -> Result<Opened, ExtractError> {
    let shown = path.display().to_string();
    let unreadable = |e: &dyn std::fmt::Display| {
        ExtractError::Vault(tre_vault::VaultError::Unreadable {
            file: shown.clone(),
            reason: e.to_string(),
        })
    };
    let mut file = File::open(path).map_err(|e| unreadable(&e))?;
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::End(-4))
        .and_then(|_| file.read_exact(&mut magic))
        .map_err(|e| unreadable(&e))?;
    if &magic != ENCRYPTED_FOOTER_MAGIC {
        return Err(ExtractError::NotEncrypted { file: shown });
    }
    let builder = decrypting(file, &shown, file_id, master)?;
    let layout = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|kv| kv.key == LAYOUT_KEY))
        .and_then(|kv| kv.value.as_deref())
        .and_then(|json| serde_json::from_str::<Layout>(json).ok())
        .filter(|l| l.format == FORMAT)
        .ok_or_else(|| ExtractError::NoLayout {
            file: shown.clone(),
        })?;
    let schema = Arc::clone(builder.schema());
    if schema.index_of(&layout.sorted_by).is_err() {
        return Err(ExtractError::NoLayout { file: shown });
    }
    let row_groups = builder.metadata().num_row_groups();
    Ok(Opened {
        schema,
        layout,
        row_groups,
    })
}

/// A reader of the encrypted extract at `path`, whose identity is
/// `file_id`: for reading an extract `open` has accepted (the sandbox
/// reads the opt-outs through it).
pub fn reader(
    path: &Path,
    file_id: &str,
    master: &Arc<MasterKey>,
) -> Result<ParquetRecordBatchReaderBuilder<File>, ExtractError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| {
        ExtractError::Vault(tre_vault::VaultError::Unreadable {
            file: shown.clone(),
            reason: e.to_string(),
        })
    })?;
    decrypting(file, &shown, file_id, master)
}

/// `file`, decrypted with the data key `master` unwraps for `file_id`.
fn decrypting(
    file: File,
    shown: &str,
    file_id: &str,
    master: &Arc<MasterKey>,
) -> Result<ParquetRecordBatchReaderBuilder<File>, ExtractError> {
    let options =
        ArrowReaderOptions::new().with_file_decryption_properties(master.file_decryption(file_id)?);
    ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)
        .map_err(|e| ExtractError::Vault(tre_vault::classify_open_error(shown, &e)))
}

#[cfg(test)]
mod tests;
