use std::collections::BTreeMap;

use arrow::array::{Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::*;

fn master() -> Arc<MasterKey> {
    Arc::new(MasterKey::from_bytes(&[9; 32]).unwrap_or_else(|e| panic!("{e}")))
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Utf8, true),
        Field::new("seq", DataType::Int64, false),
    ]))
}

/// A batch of `(unit, seq)` rows.
fn rows(rows: &[(Option<&str>, i64)]) -> RecordBatch {
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn writer(path: &Path, bound: u32, master: &MasterKey) -> ExtractWriter {
    let protection = Protection::Encrypted {
        master,
        file_id: "d/t.parquet",
    };
    ExtractWriter::create(path, schema(), "person_id", bound, protection, [1; 32])
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Every `(unit, seq)` row of an encrypted extract, in file order.
fn read(path: &Path, master: &Arc<MasterKey>) -> Vec<(String, i64)> {
    let file = File::open(path).unwrap_or_else(|e| panic!("{e}"));
    let options = ArrowReaderOptions::new().with_file_decryption_properties(
        master
            .file_decryption("d/t.parquet")
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let mut out = Vec::new();
    for batch in ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)
        .and_then(|b| b.build())
        .unwrap_or_else(|e| panic!("{e}"))
    {
        let batch = batch.unwrap_or_else(|e| panic!("{e}"));
        let (units, seqs) = (batch.column(0), batch.column(1));
        let units = units.as_any().downcast_ref::<StringArray>();
        let seqs = seqs.as_any().downcast_ref::<Int64Array>();
        let (Some(units), Some(seqs)) = (units, seqs) else {
            panic!("unexpected column types");
        };
        out.extend((0..batch.num_rows()).map(|i| (units.value(i).to_owned(), seqs.value(i))));
    }
    out
}

#[test]
fn units_split_across_batches_are_bounded_as_one() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("t.parquet");
    let master = master();
    let mut w = writer(&path, 2, &master);
    // b's four rows span three batches; c's one row ends the last.
    for batch in [
        rows(&[(Some("a"), 0), (Some("b"), 1), (Some("b"), 2)]),
        rows(&[(Some("b"), 3)]),
        rows(&[]),
        rows(&[(Some("b"), 4), (Some("c"), 5)]),
    ] {
        w.write(&batch).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(!path.exists(), "the extract appears only when closed");
    let layout = w.close().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        layout,
        Layout {
            format: 1,
            sorted_by: "person_id".into(),
            max_rows_per_unit: 2,
            rows: 4,
            units: 3,
            rows_dropped: 2,
            opt_outs_removed: None,
            unit_ranges: None,
            distinct_caps: BTreeMap::new(),
        }
    );
    let written = read(&path, &master);
    let units: Vec<&str> = written.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(units, ["a", "b", "b", "c"]);
    // b keeps two of its rows, in their original order.
    assert!(written[1].1 < written[2].1 && (1..=4).contains(&written[1].1));
    let opened = open(&path, "d/t.parquet", &master).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(opened.layout, layout);
    assert_eq!(opened.schema.fields().len(), 2);
}

/// Issue #13: each range of units is stored in row groups of its own, and
/// the layout says where each range starts, so that a reader can give
/// every worker whole units, the same ranges of every table.
#[test]
fn each_unit_range_is_stored_in_row_groups_of_its_own() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("t.parquet");
    let master = master();
    let splits: Vec<String> = ["b", "d", "e", "x", "y"].map(String::from).into();
    let mut w = writer(&path, 3, &master)
        .with_unit_ranges(splits.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    // Units a, b, bb, c, e1, e2, z: range "d".."e" is empty, and so are
    // "x".."y" and "y"..; a unit equal to a split starts its range; c's
    // rows span a batch boundary.
    for batch in [
        rows(&[(Some("a"), 0), (Some("a"), 1), (Some("b"), 2)]),
        rows(&[(Some("bb"), 3), (Some("c"), 4)]),
        rows(&[(Some("c"), 5), (Some("e1"), 6), (Some("e2"), 7)]),
        rows(&[(Some("z"), 8)]),
    ] {
        w.write(&batch).unwrap_or_else(|e| panic!("{e}"));
    }
    let layout = w.close().unwrap_or_else(|e| panic!("{e}"));
    let Some(ranges) = layout.unit_ranges.clone() else {
        panic!("no ranges recorded");
    };
    assert_eq!(ranges.splits, splits);
    let opened = open(&path, "d/t.parquet", &master).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(opened.layout, layout);
    let expected: [&[&str]; 6] = [&["a"], &["b", "bb", "c"], &[], &["e1", "e2"], &[], &["z"]];
    for (r, want) in expected.iter().enumerate() {
        let Some(groups) = ranges.row_groups(r..r + 1, opened.row_groups) else {
            panic!("range {r} does not fit the file: {ranges:?}");
        };
        let file = File::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let options = ArrowReaderOptions::new().with_file_decryption_properties(
            master
                .file_decryption("d/t.parquet")
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let mut got: Vec<String> = Vec::new();
        for batch in ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)
            .and_then(|b| b.with_row_groups(groups.clone().collect()).build())
            .unwrap_or_else(|e| panic!("{e}"))
        {
            let batch = batch.unwrap_or_else(|e| panic!("{e}"));
            let units = batch.column(0).as_string::<i32>();
            got.extend(units.iter().flatten().map(str::to_owned));
        }
        got.dedup();
        assert_eq!(got, want.to_vec(), "range {r}: row groups {groups:?}");
    }
    // Splits out of order, or over a unit that is not text, are refused.
    let refused = writer(&dir.path().join("u.parquet"), 3, &master)
        .with_unit_ranges(vec!["b".into(), "b".into()]);
    assert!(matches!(refused, Err(ExtractError::BadUnitRanges { .. })));
}

/// Issue #13: a column without a public domain may have at most its
/// policy's `max_distinct` values; the writer enforces it (NULL aside) and
/// records it, and the compiler bounds grouping by it with that cap.
#[test]
fn distinct_values_are_held_to_their_cap() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let master = master();
    let write = |cap: u64| {
        let path = dir.path().join(format!("cap{cap}.parquet"));
        let mut w =
            writer(&path, 5, &master).with_distinct_caps([("person_id".to_owned(), cap)])?;
        w.write(&rows(&[(Some("a"), 0), (Some("a"), 1), (Some("b"), 2)]))?;
        w.write(&rows(&[(Some("c"), 3)]))?;
        w.close()
    };
    let layout = write(3).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(layout.distinct_caps.get("person_id"), Some(&3));
    assert!(matches!(
        write(2),
        Err(ExtractError::TooManyDistinct { cap: 2, .. })
    ));
    assert!(!dir.path().join("cap2.parquet").exists());
    let not_text = writer(&dir.path().join("n.parquet"), 5, &master)
        .with_distinct_caps([("seq".to_owned(), 9)]);
    assert!(matches!(
        not_text,
        Err(ExtractError::DistinctCapNotText { .. })
    ));
}

#[test]
fn rows_out_of_unit_order_or_without_a_unit_are_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let master = master();
    let cases: [(&str, Vec<RecordBatch>); 4] = [
        (
            "within a batch",
            vec![rows(&[(Some("b"), 0), (Some("a"), 1)])],
        ),
        (
            "across batches",
            vec![rows(&[(Some("b"), 0)]), rows(&[(Some("a"), 1)])],
        ),
        (
            "a unit that comes back",
            vec![
                rows(&[(Some("a"), 0), (Some("b"), 1)]),
                rows(&[(Some("a"), 2)]),
            ],
        ),
        ("no unit", vec![rows(&[(Some("a"), 0), (None, 1)])]),
    ];
    for (what, batches) in cases {
        let path = dir.path().join("t.parquet");
        let mut w = writer(&path, 5, &master);
        let failed = batches.iter().find_map(|b| w.write(b).err());
        let Some(e) = failed else {
            panic!("{what}: accepted");
        };
        assert_eq!(e.code(), Code::ExtractLayout, "{what}: {e}");
        assert!(!path.exists(), "{what}");
    }
}

/// The bound must not bias what is kept: over many units of ten rows with
/// a bound of one, each position is kept about equally often.
#[test]
fn the_rows_kept_are_chosen_uniformly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("t.parquet");
    let master = master();
    let mut w = writer(&path, 1, &master);
    let units = 5_000;
    let ids: Vec<String> = (0..units).map(|u| format!("u{u:05}")).collect();
    let all: Vec<(Option<&str>, i64)> = ids
        .iter()
        .flat_map(|id| (0..10).map(move |k| (Some(id.as_str()), k)))
        .collect();
    for chunk in all.chunks(777) {
        w.write(&rows(chunk)).unwrap_or_else(|e| panic!("{e}"));
    }
    let layout = w.close().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((layout.rows, layout.units), (units as u64, units as u64));
    let mut kept: BTreeMap<i64, u64> = BTreeMap::new();
    for (_, seq) in read(&path, &master) {
        *kept.entry(seq).or_default() += 1;
    }
    // Each position: Binomial(5000, 0.1), mean 500, sd 21.2; ±5 sd fails
    // by chance with probability below 1e-5 over all ten.
    assert_eq!(kept.len(), 10);
    for (position, n) in kept {
        assert!(
            (394..=606).contains(&n),
            "position {position} kept {n} times"
        );
    }
}

#[test]
fn only_encrypted_extracts_with_a_layout_open() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let master = master();
    // Plaintext, written by the same writer: its layout is unauthenticated.
    let plain = dir.path().join("plain.parquet");
    let mut w = ExtractWriter::create(
        &plain,
        schema(),
        "person_id",
        1,
        Protection::Plaintext,
        [0; 32],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    w.write(&rows(&[(Some("a"), 0)]))
        .unwrap_or_else(|e| panic!("{e}"));
    w.close().unwrap_or_else(|e| panic!("{e}"));
    let e = open(&plain, "d/t.parquet", &master).err();
    assert!(
        matches!(e, Some(ExtractError::NotEncrypted { .. })),
        "{e:?}"
    );
    // Encrypted, but written around the extract writer: no layout.
    let bare = dir.path().join("t.parquet");
    let props = WriterProperties::builder()
        .with_file_encryption_properties(
            master
                .file_encryption("d/t.parquet")
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .build();
    let file = File::create(&bare).unwrap_or_else(|e| panic!("{e}"));
    let mut raw =
        ArrowWriter::try_new(file, schema(), Some(props)).unwrap_or_else(|e| panic!("{e}"));
    raw.write(&rows(&[(Some("a"), 0)]))
        .unwrap_or_else(|e| panic!("{e}"));
    raw.close().unwrap_or_else(|e| panic!("{e}"));
    let e = open(&bare, "d/t.parquet", &master).err();
    assert!(matches!(e, Some(ExtractError::NoLayout { .. })), "{e:?}");
    // Under another identity, the footer does not authenticate.
    let e = open(&bare, "d/other.parquet", &master).err();
    assert_eq!(e.map(|e| e.code()), Some(Code::ExtractUnreadable));
}

/// Issue #13: an opted-out unit's rows are left out wherever they fall in
/// the batches, and the layout says which opt-outs were removed.
#[test]
fn opted_out_units_are_left_out_and_recorded() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("t.parquet");
    let master = master();
    let opted_out: Arc<HashSet<String>> = Arc::new(["b".to_owned(), "z".to_owned()].into());
    let mut w = writer(&path, 5, &master)
        .excluding(Arc::clone(&opted_out), "patients.research_opt_out")
        .unwrap_or_else(|e| panic!("{e}"));
    for batch in [
        rows(&[(Some("a"), 0), (Some("b"), 1)]),
        rows(&[(Some("b"), 2), (Some("c"), 3)]),
    ] {
        w.write(&batch).unwrap_or_else(|e| panic!("{e}"));
    }
    let layout = w.close().unwrap_or_else(|e| panic!("{e}"));
    let written: Vec<String> = read(&path, &master).into_iter().map(|r| r.0).collect();
    assert_eq!(written, ["a", "c"]);
    assert_eq!((layout.rows, layout.units), (2, 2));
    assert_eq!(
        layout.opt_outs_removed,
        Some(OptOutsRemoved {
            source: "patients.research_opt_out".into(),
            digest: opt_out_digest(["z", "b"]),
            units: 2,
            rows: 2,
        })
    );
    assert_ne!(opt_out_digest(["b"]), opt_out_digest(["b", "z"]));
}
