//! Synthetic NHS-style records for demos, tests and benchmarks: seeded,
//! deterministic, streamed in bounded chunks, with planted correlations
//! (age → diabetes → HbA1c; deprivation → HbA1c and longer waits;
//! dexamethasone lowers COVID-19 mortality in ventilated patients). Direct
//! identifiers are pseudonymised by the vault before anything is written,
//! and every table is written as an encrypted Parquet extract.
//!
//! This crate must never depend on the query engine, storage or the
//! network: it only writes files.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, Int64Builder, StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, Gamma, Normal};
use tre_core::Code;
use tre_extract::ExtractWriter;
use tre_vault::MasterKey;

pub const TABLES: [&str; 4] = ["patients", "admissions", "lab_results", "waiting_list"];
pub const REGIONS: [&str; 7] = [
    "London",
    "South East",
    "South West",
    "East of England",
    "Midlands",
    "North East and Yorkshire",
    "North West",
];
const SPECIALTIES: [&str; 7] = [
    "general_medicine",
    "general_surgery",
    "respiratory",
    "cardiology",
    "obstetrics",
    "orthopaedics",
    "geriatrics",
];
const ETHNICITY: [(&str, f64); 6] = [
    ("White", 0.80),
    ("Asian", 0.09),
    ("Black", 0.04),
    ("Mixed", 0.03),
    ("Other", 0.02),
    ("Not stated", 0.02),
];
/// Non-COVID diagnoses (ICD-10), weighted roughly by admission frequency.
const DIAGNOSES: [&str; 12] = [
    "I21.9", "J18.9", "N39.0", "K35.8", "I50.9", "J44.1", "S72.0", "O80.0", "E11.9", "R07.4",
    "K80.2", "C50.9",
];
/// The optional table of a multi-year extract: repeat prescriptions.
pub const PRESCRIPTIONS: &str = "prescriptions";

/// Repeat medicines (BNF chemical names) and who is prescribed them.
const DRUGS: [&str; 6] = [
    "metformin",
    "atorvastatin",
    "ramipril",
    "amlodipine",
    "salbutamol",
    "sertraline",
];

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{code} cannot write {path}: {reason}", code = Code::Internal)]
    Write { path: String, reason: String },
    #[error("{code} the policy gives no max_rows_per_unit for table {table}; add [tables.{table}]", code = Code::PolicyInvalid)]
    NoBound { table: String },
    #[error("{code} cannot generate {patients} patients; at most 4,294,967,295 on one machine", code = Code::Internal)]
    TooManyPatients { patients: u64 },
    #[error("{code} the pseudonym order pass failed", code = Code::Internal)]
    OrderPass,
    #[error("{code} --years {years}: generate between 1 and {MAX_YEARS} years of history", code = Code::InvalidArgument)]
    Years { years: u32 },
    #[error(transparent)]
    Vault(#[from] tre_vault::VaultError),
    #[error(transparent)]
    Extract(#[from] tre_extract::ExtractError),
}

/// How extracts are protected on disk.
pub enum Protection<'a> {
    /// Parquet modular encryption under per-file data keys.
    Encrypted(&'a MasterKey),
    /// Plaintext, for benchmark baselines only.
    Plaintext,
}

/// Rows written per table, after the per-patient bound, and the rows the
/// bound removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub patients: u64,
    pub admissions: u64,
    pub lab_results: u64,
    pub waiting_list: u64,
    pub prescriptions: u64,
    pub dropped: u64,
}

pub use tre_extract::file_id;

pub fn schema(table: &str) -> SchemaRef {
    let s = |n: &str| Field::new(n, DataType::Utf8, false);
    let sn = |n: &str| Field::new(n, DataType::Utf8, true);
    let b = |n: &str| Field::new(n, DataType::Boolean, false);
    let i = |n: &str| Field::new(n, DataType::Int64, false);
    let f = |n: &str| Field::new(n, DataType::Float64, false);
    let d = |n: &str| Field::new(n, DataType::Date32, false);
    let fields = match table {
        "patients" => vec![
            s("person_id"),
            s("sex"),
            i("year_of_birth"),
            s("age_band"),
            s("ethnicity"),
            i("imd_quintile"),
            s("region"),
            s("gp_practice"),
            b("diabetes"),
            Field::new("date_of_death", DataType::Date32, true),
            b("research_opt_out"),
            b("nhs_app_user"),
        ],
        "admissions" => vec![
            s("person_id"),
            d("admission_date"),
            s("admission_month"),
            s("admission_method"),
            s("specialty"),
            sn("primary_diagnosis"),
            b("covid19"),
            b("ventilated"),
            b("dexamethasone"),
            i("length_of_stay_days"),
            i("died_28d"),
        ],
        "lab_results" => vec![s("person_id"), d("test_date"), s("test"), f("value")],
        PRESCRIPTIONS => vec![
            s("person_id"),
            d("issue_date"),
            s("drug"),
            i("quantity_days"),
        ],
        _ => vec![
            s("person_id"),
            d("referral_date"),
            s("specialty"),
            f("rtt_weeks"),
        ],
    };
    Arc::new(Schema::new(fields))
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Spec {
    pub patients: u64,
    pub seed: u64,
    /// The rows per patient each table keeps: the policy's
    /// `max_rows_per_unit`.
    pub max_rows_per_unit: BTreeMap<String, u32>,
    /// Leave the opted-out patients out of the event tables.
    pub remove_opt_outs: bool,
    /// Years of history ending in 2024: admissions, lab results, referrals
    /// and prescriptions are generated for each (issue #13).
    pub years: u32,
    /// Per table, the columns whose distinct values the writer holds to
    /// the policy's `max_distinct`.
    pub distinct_caps: BTreeMap<String, Vec<(String, u64)>>,
}

impl Spec {
    /// What `policy` asks of `patients` patients over `years` years: each
    /// table bounded to its `max_rows_per_unit`, and the opt-outs removed
    /// from the event tables where the policy names this schema's column
    /// (the server checks the removal by digest either way).
    pub fn under(policy: &tre_policy::Policy, patients: u64, seed: u64, years: u32) -> Self {
        Spec {
            patients,
            seed,
            max_rows_per_unit: policy
                .tables
                .iter()
                .map(|(name, t)| (name.clone(), t.max_rows_per_unit))
                .collect(),
            remove_opt_outs: policy
                .opt_out
                .as_ref()
                .is_some_and(|o| o.to_string() == OPT_OUT_COLUMN),
            years,
            distinct_caps: policy
                .tables
                .iter()
                .map(|(name, t)| {
                    let caps = t
                        .columns
                        .iter()
                        .filter_map(|c| Some((c.name.clone(), c.max_distinct?)))
                        .collect();
                    (name.clone(), caps)
                })
                .collect(),
        }
    }
}

/// Patients generated per chunk: memory is bounded by one chunk whatever N.
const CHUNK: usize = 8_192;

/// Generate `patients` patients with `seed` into `dir/<table>.parquet`,
/// each table sorted by `person_id` with at most `max_rows_per_unit(table)`
/// rows per patient (the extract writer enforces both). With
/// `remove_opt_outs`, the event tables leave out the patients whose
/// `patients.research_opt_out` is set, as a data provider applying the
/// National Data Opt-out would, and say so in their layouts; the patients
/// table keeps them, flagged. `progress` is called after each chunk with
/// the patients done so far.
///
/// Each patient's records come from a random stream of their own (the
/// seed's stream number `index`), so patients can be generated in the
/// order of their pseudonyms and the output is the same whatever the
/// chunking. Memory: 16 bytes per patient for that order, plus one chunk.
pub fn generate(
    dir: &Path,
    spec: &Spec,
    protection: Protection<'_>,
    pseudonymiser: &MasterKey,
    mut progress: impl FnMut(u64),
) -> Result<Counts, SynthError> {
    let Spec {
        patients,
        seed,
        ref max_rows_per_unit,
        remove_opt_outs,
        years,
        ref distinct_caps,
    } = *spec;
    if !(1..=MAX_YEARS).contains(&years) {
        return Err(SynthError::Years { years });
    }
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let dataset = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("dataset")
        .to_owned();
    let (order, opted_out) = pseudonym_order(patients, seed, pseudonymiser)?;
    let opted_out = Arc::new(opted_out);
    let mut writers = Vec::new();
    // The core tables always; prescriptions where the policy has them.
    let tables: Vec<&str> = TABLES
        .into_iter()
        .chain(
            max_rows_per_unit
                .contains_key(PRESCRIPTIONS)
                .then_some(PRESCRIPTIONS),
        )
        .collect();
    for &table in &tables {
        let path = dir.join(format!("{table}.parquet"));
        let bound = *max_rows_per_unit
            .get(table)
            .ok_or_else(|| SynthError::NoBound {
                table: table.to_owned(),
            })?;
        let file_id = file_id(&dataset, table);
        let protection = match &protection {
            Protection::Encrypted(master) => tre_extract::Protection::Encrypted {
                master,
                file_id: &file_id,
            },
            Protection::Plaintext => tre_extract::Protection::Plaintext,
        };
        // The rows kept for a patient over the bound are chosen by a
        // stream of the seed's own, so the dataset can be made again.
        let mut sampler_seed = [0u8; 32];
        ChaCha12Rng::seed_from_u64(seed ^ 0x5EED_B0D0).fill(&mut sampler_seed);
        sampler_seed[..table.len().min(32)]
            .iter_mut()
            .zip(table.bytes())
            .for_each(|(s, t)| *s ^= t);
        let mut w = ExtractWriter::create(
            &path,
            schema(table),
            "person_id",
            bound,
            protection,
            sampler_seed,
        )?
        .with_unit_ranges(pseudonym_splits(patients))?
        .with_distinct_caps(distinct_caps.get(table).cloned().unwrap_or_default())?;
        if remove_opt_outs && table != "patients" {
            w = w.excluding(Arc::clone(&opted_out), OPT_OUT_COLUMN)?;
        }
        writers.push(w);
    }
    let base = ChaCha12Rng::seed_from_u64(seed);
    let mut done = 0u64;
    for chunk in order.chunks(CHUNK) {
        let chunk = Chunk::generate(
            &base,
            seed,
            years,
            tables.len() > TABLES.len(),
            chunk,
            pseudonymiser,
        );
        for (w, batch) in writers.iter_mut().zip([
            &chunk.patients,
            &chunk.admissions,
            &chunk.labs,
            &chunk.waits,
            &chunk.prescriptions,
        ]) {
            w.write(batch)?;
        }
        done += chunk.patients.num_rows() as u64;
        progress(done);
    }
    let mut counts = Counts::default();
    for (w, table) in writers.into_iter().zip(tables) {
        let layout = w.close()?;
        counts.dropped += layout.rows_dropped;
        match table {
            "patients" => counts.patients = layout.rows,
            "admissions" => counts.admissions = layout.rows,
            "lab_results" => counts.lab_results = layout.rows,
            "waiting_list" => counts.waiting_list = layout.rows,
            _ => counts.prescriptions = layout.rows,
        }
    }
    Ok(counts)
}

/// Changes whenever the same seed would give different extracts; the
/// commands that reuse generated data keep it in their markers.
pub const GENERATOR_VERSION: u32 = 2;

/// The opt-out column of the synthetic schema.
pub const OPT_OUT_COLUMN: &str = "patients.research_opt_out";

/// Whether patient `index` opted out: from a stream of its own, so that
/// the order pass knows it before any record is generated.
fn opts_out(seed: u64, index: u64) -> bool {
    let mut rng = ChaCha12Rng::seed_from_u64(seed ^ 0x0D70_0D70_0D70_0D70);
    rng.set_stream(index);
    rng.random_bool(0.05)
}

/// Patient indices in the order of their pseudonyms, and the pseudonyms
/// of those who opted out. A pseudonym is `P` and 24 hex digits (96
/// bits); each key holds those bits above the index, so sorting the keys
/// sorts by pseudonym. Computed on every core.
fn pseudonym_order(
    patients: u64,
    seed: u64,
    key: &MasterKey,
) -> Result<(Vec<u128>, HashSet<String>), SynthError> {
    let too_many = || SynthError::TooManyPatients { patients };
    let n = usize::try_from(patients).map_err(|_| too_many())?;
    if patients > u64::from(u32::MAX) {
        return Err(too_many());
    }
    let mut keys = vec![0u128; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per = n.div_ceil(threads).max(1);
    let opted_out = std::thread::scope(|s| {
        let parts: Vec<_> = keys
            .chunks_mut(per)
            .enumerate()
            .map(|(part, slice)| {
                s.spawn(move || {
                    let mut opted_out = Vec::new();
                    for (j, k) in slice.iter_mut().enumerate() {
                        let index = (part * per + j) as u64;
                        let pseudonym = key.pseudonymise(&nhs_number(index));
                        *k = (pseudonym_bits(&pseudonym) << 32) | u128::from(index);
                        if opts_out(seed, index) {
                            opted_out.push(pseudonym);
                        }
                    }
                    opted_out
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in parts {
            // A lost part would lose opt-outs: fail rather than write them.
            all.extend(h.join().map_err(|_| SynthError::OrderPass)?);
        }
        Ok::<_, SynthError>(all)
    })?;
    keys.sort_unstable();
    Ok((keys, opted_out))
}

pub use tre_vault::pseudonym_splits;

/// The 96 bits of a pseudonym `P<24 hex digits>`.
fn pseudonym_bits(pseudonym: &str) -> u128 {
    u128::from_str_radix(pseudonym.get(1..).unwrap_or_default(), 16).unwrap_or_default()
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> SynthError {
    SynthError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// A synthetic NHS number with a valid modulus-11 check digit. Each index
/// owns the block `900000000 + 5·index .. +5`; within a block the weighted
/// sums differ by 2 each step, so at most one base has the invalid check
/// digit 10 and the numbers are unique for up to 20 million patients.
pub fn nhs_number(index: u64) -> String {
    let base = 900_000_000 + 5 * index;
    for n in base..base + 5 {
        let digits = format!("{n:09}");
        let sum: u64 = digits
            .bytes()
            .zip((2..=10u64).rev())
            .map(|(d, w)| u64::from(d - b'0') * w)
            .sum();
        let check = (11 - sum % 11) % 11;
        if check != 10 {
            return format!("{n:09}{check}");
        }
    }
    unreachable!("five consecutive weighted sums cannot all give check digit 10")
}

struct Chunk {
    patients: RecordBatch,
    admissions: RecordBatch,
    labs: RecordBatch,
    waits: RecordBatch,
    prescriptions: RecordBatch,
}

fn pick<'a, R: Rng>(rng: &mut R, weighted: &[(&'a str, f64)]) -> &'a str {
    let mut x: f64 = rng.random();
    for (v, w) in weighted {
        if x < *w {
            return v;
        }
        x -= w;
    }
    weighted.last().map(|(v, _)| *v).unwrap_or_default()
}

/// Most years of history one extract may hold.
pub const MAX_YEARS: u32 = 20;

/// Days since 1970-01-01 of 1 January of `year` (proleptic Gregorian).
fn first_day(year: i32) -> i32 {
    let y = year - 1;
    365 * (year - 1970) + (y / 4 - y / 100 + y / 400) - (1969 / 4 - 1969 / 100 + 1969 / 400)
}

fn is_leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// `YYYY-MM` of a day since 1970-01-01.
fn month_of(day: i32) -> String {
    let mut year = 1970 + day.div_euclid(366);
    while first_day(year + 1) <= day {
        year += 1;
    }
    let leap = i32::from(is_leap(year));
    let starts = [
        0,
        31,
        59 + leap,
        90 + leap,
        120 + leap,
        151 + leap,
        181 + leap,
        212 + leap,
        243 + leap,
        273 + leap,
        304 + leap,
        334 + leap,
    ];
    let d = day - first_day(year);
    let m = starts.iter().rposition(|s| d >= *s).unwrap_or(0);
    format!("{year}-{:02}", m + 1)
}

fn batch(table: &str, cols: Vec<ArrayRef>) -> RecordBatch {
    // Column types and counts are fixed by `schema`; a mismatch is a bug in
    // this file, caught by the unit test below.
    RecordBatch::try_new(schema(table), cols).unwrap_or_else(|e| panic!("{table}: {e}"))
}

impl Chunk {
    /// The records of the patients whose order keys are `keys`, each from
    /// its own stream of `base`.
    fn generate(
        base: &ChaCha12Rng,
        seed: u64,
        years: u32,
        with_prescriptions: bool,
        keys: &[u128],
        key: &MasterKey,
    ) -> Chunk {
        let mut r = PrescriptionCols::default();
        let mut p = PatientCols::default();
        let mut a = AdmissionCols::default();
        let mut l = DatedValueCols::default();
        let mut w = DatedValueCols::default();
        let normal = |m: f64, s: f64| Normal::new(m, s).unwrap_or_else(|_| unreachable!());
        for order_key in keys {
            let i = (order_key & u128::from(u32::MAX)) as u64;
            let pid = key.pseudonymise(&nhs_number(i));
            let mut own = base.clone();
            own.set_stream(i);
            let rng = &mut own;
            let age: i64 = (rng.random::<f64>().powf(1.15) * 100.0) as i64;
            let yob = 2024 - age;
            let sex = if rng.random_bool(0.51) { "F" } else { "M" };
            let imd: i64 = rng.random_range(1..=5);
            let region = REGIONS[rng.random_range(0..REGIONS.len())];
            // Diabetes: rises with age and with deprivation (quintile 1).
            let p_diab = (0.01 + 0.0025 * age as f64) * (1.0 + 0.15 * (5 - imd) as f64);
            let diabetes = rng.random_bool(p_diab.min(0.6));
            let opt_out = opts_out(seed, i);
            let mut death: Option<i32> = None;

            // Long-term conditions that bring repeat prescriptions, drawn
            // from a stream of their own so that the other tables are the
            // same whether or not prescriptions are written.
            let mut own_rx = base.clone();
            own_rx.set_stream(i | 1 << 32);
            let rx = &mut own_rx;
            let repeats = [
                (diabetes, 0, 10..=13, 28),
                (
                    age >= 40 && rx.random_bool((0.3 + 0.005 * (age - 40) as f64).min(0.7)),
                    1,
                    4..=6,
                    56,
                ),
                (
                    age >= 30 && rx.random_bool((0.01 * age as f64).min(0.6)),
                    if rx.random_bool(0.5) { 2 } else { 3 },
                    4..=6,
                    56,
                ),
                (rx.random_bool(0.1), 4, 1..=4, 30),
                (rx.random_bool(0.08), 5, 6..=12, 28),
            ];
            // Each year of history, oldest first; nothing after a death.
            for year in (2024 - years as i32 + 1)..=2024 {
                let start = first_day(year);
                let days = first_day(year + 1) - start;
                if death.is_some_and(|d| d < start) {
                    break;
                }
                // Admissions in the year.
                let rate = 0.15 + 0.01 * age as f64;
                let k = (rng.random::<f64>() * rate * 2.0).floor() as usize;
                let covid_risk = 0.06 + 0.002 * age as f64;
                for _ in 0..k.min(8) {
                    let day = start + rng.random_range(0..days);
                    let covid = rng.random_bool(covid_risk.min(0.3));
                    let method = if covid {
                        "emergency"
                    } else {
                        pick(
                            rng,
                            &[
                                ("emergency", 0.45),
                                ("elective", 0.4),
                                ("maternity", 0.08),
                                ("transfer", 0.07),
                            ],
                        )
                    };
                    let ventilated = covid && rng.random_bool(0.25 + 0.004 * age as f64);
                    let dexa = covid && rng.random_bool(if ventilated { 0.6 } else { 0.35 });
                    let p_die = if covid {
                        let base: f64 = 0.02 + 0.004 * age as f64;
                        if ventilated {
                            (base + 0.25) * if dexa { 0.65 } else { 1.0 }
                        } else {
                            base * if dexa { 0.95 } else { 1.0 }
                        }
                    } else {
                        0.002 + 0.0006 * age as f64
                    };
                    let died = death.is_none() && rng.random_bool(p_die.min(0.9));
                    if died {
                        death = Some(day + rng.random_range(0..28));
                    }
                    let los = Gamma::new(
                        1.5,
                        2.0 + age as f64 / 25.0 + if ventilated { 8.0 } else { 0.0 },
                    )
                    .map(|g| g.sample(rng).round() as i64)
                    .unwrap_or(1);
                    let specialty = if covid {
                        "respiratory"
                    } else if method == "maternity" {
                        "obstetrics"
                    } else if age >= 75 && rng.random_bool(0.4) {
                        "geriatrics"
                    } else {
                        SPECIALTIES[rng.random_range(0..SPECIALTIES.len())]
                    };
                    let diagnosis = if covid {
                        Some("U07.1")
                    } else if rng.random_bool(0.02) {
                        None
                    } else {
                        Some(DIAGNOSES[rng.random_range(0..DIAGNOSES.len())])
                    };
                    a.push(
                        &pid, day, method, specialty, diagnosis, covid, ventilated, dexa, los, died,
                    );
                }

                // Lab results: HbA1c for diabetics and a share of others.
                let hba1c_tests = if diabetes {
                    rng.random_range(2..=4)
                } else if rng.random_bool(0.25) {
                    1
                } else {
                    0
                };
                let hba1c_mean = if diabetes {
                    55.0 + 3.0 * (5 - imd) as f64 + 0.05 * age as f64
                } else {
                    34.0 + 0.05 * age as f64
                };
                for _ in 0..hba1c_tests {
                    let v = normal(hba1c_mean, 7.0).sample(rng).clamp(20.0, 150.0);
                    l.push(
                        &pid,
                        start + rng.random_range(0..days),
                        "HbA1c",
                        (v * 10.0).round() / 10.0,
                    );
                }
                if age >= 40 && rng.random_bool(0.4) {
                    let v = normal(5.2, 1.0).sample(rng).clamp(2.0, 10.0);
                    l.push(
                        &pid,
                        start + rng.random_range(0..days),
                        "cholesterol",
                        (v * 10.0).round() / 10.0,
                    );
                    let e = normal(
                        100.0 - 0.6 * age as f64 - if diabetes { 10.0 } else { 0.0 },
                        12.0,
                    )
                    .sample(rng)
                    .clamp(5.0, 120.0);
                    l.push(&pid, start + rng.random_range(0..days), "eGFR", e.round());
                }

                // Waiting list: deprivation lengthens waits.
                if rng.random_bool(0.2 + 0.002 * age as f64) {
                    for _ in 0..rng.random_range(1..=2) {
                        let mean = 14.0 + 2.0 * (5 - imd) as f64;
                        let weeks = Gamma::new(3.0, mean / 3.0)
                            .map(|g| g.sample(rng).min(104.0))
                            .unwrap_or(mean);
                        let spec = SPECIALTIES[rng.random_range(0..SPECIALTIES.len())];
                        w.push(
                            &pid,
                            first_day(year - 1) + rng.random_range(0..days + 365),
                            spec,
                            (weeks * 10.0).round() / 10.0,
                        );
                    }
                }

                if death.is_none() && rng.random_bool((0.0005 * age as f64).min(0.2)) {
                    death = Some(start + rng.random_range(0..days + 365));
                }

                if with_prescriptions {
                    for (on, drug, issues, quantity) in &repeats {
                        if !on {
                            continue;
                        }
                        for _ in 0..rx.random_range(issues.clone()) {
                            let day = start + rx.random_range(0..days);
                            if death.is_none_or(|d| day <= d) {
                                r.push(&pid, day, DRUGS[*drug], *quantity);
                            }
                        }
                    }
                }
            }
            let band = match age {
                0..=17 => "0-17",
                18..=39 => "18-39",
                40..=59 => "40-59",
                60..=79 => "60-79",
                _ => "80+",
            };
            p.person_id.append_value(&pid);
            p.sex.append_value(sex);
            p.yob.append_value(yob);
            p.age_band.append_value(band);
            p.ethnicity.append_value(pick(rng, &ETHNICITY));
            p.imd.append_value(imd);
            p.region.append_value(region);
            p.gp.append_value(format!(
                "{}{:05}",
                (b'A' + (i % 26) as u8) as char,
                rng.random_range(0..2_000)
            ));
            p.diabetes.append_value(diabetes);
            p.death.append_option(death);
            p.opt_out.append_value(opt_out);
            p.app
                .append_value(rng.random_bool(0.6 - 0.004 * age as f64).max(false));
        }
        Chunk {
            patients: p.finish(),
            admissions: a.finish(),
            labs: l.finish("lab_results"),
            waits: w.finish("waiting_list"),
            prescriptions: r.finish(),
        }
    }
}

#[derive(Default)]
struct PatientCols {
    person_id: StringBuilder,
    sex: StringBuilder,
    yob: Int64Builder,
    age_band: StringBuilder,
    ethnicity: StringBuilder,
    imd: Int64Builder,
    region: StringBuilder,
    gp: StringBuilder,
    diabetes: BooleanBuilder,
    death: Date32Builder,
    opt_out: BooleanBuilder,
    app: BooleanBuilder,
}

impl PatientCols {
    fn finish(mut self) -> RecordBatch {
        batch(
            "patients",
            vec![
                Arc::new(self.person_id.finish()),
                Arc::new(self.sex.finish()),
                Arc::new(self.yob.finish()),
                Arc::new(self.age_band.finish()),
                Arc::new(self.ethnicity.finish()),
                Arc::new(self.imd.finish()),
                Arc::new(self.region.finish()),
                Arc::new(self.gp.finish()),
                Arc::new(self.diabetes.finish()),
                Arc::new(self.death.finish()),
                Arc::new(self.opt_out.finish()),
                Arc::new(self.app.finish()),
            ],
        )
    }
}

#[derive(Default)]
struct AdmissionCols {
    person_id: StringBuilder,
    date: Date32Builder,
    month: StringBuilder,
    method: StringBuilder,
    specialty: StringBuilder,
    diagnosis: StringBuilder,
    covid: BooleanBuilder,
    ventilated: BooleanBuilder,
    dexa: BooleanBuilder,
    los: Int64Builder,
    died: Int64Builder,
}

impl AdmissionCols {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        pid: &str,
        day: i32,
        method: &str,
        specialty: &str,
        diagnosis: Option<&str>,
        covid: bool,
        ventilated: bool,
        dexa: bool,
        los: i64,
        died: bool,
    ) {
        self.person_id.append_value(pid);
        self.date.append_value(day);
        self.month.append_value(month_of(day));
        self.method.append_value(method);
        self.specialty.append_value(specialty);
        self.diagnosis.append_option(diagnosis);
        self.covid.append_value(covid);
        self.ventilated.append_value(ventilated);
        self.dexa.append_value(dexa);
        self.los.append_value(los);
        self.died.append_value(i64::from(died));
    }

    fn finish(mut self) -> RecordBatch {
        batch(
            "admissions",
            vec![
                Arc::new(self.person_id.finish()),
                Arc::new(self.date.finish()),
                Arc::new(self.month.finish()),
                Arc::new(self.method.finish()),
                Arc::new(self.specialty.finish()),
                Arc::new(self.diagnosis.finish()),
                Arc::new(self.covid.finish()),
                Arc::new(self.ventilated.finish()),
                Arc::new(self.dexa.finish()),
                Arc::new(self.los.finish()),
                Arc::new(self.died.finish()),
            ],
        )
    }
}

/// Columns of a table of dated values per patient, with a label: lab
/// results (test, value) and waiting-list pathways (specialty, weeks).
#[derive(Default)]
struct DatedValueCols {
    person_id: StringBuilder,
    date: Date32Builder,
    label: StringBuilder,
    value: Float64Builder,
}

impl DatedValueCols {
    fn push(&mut self, pid: &str, day: i32, label: &str, value: f64) {
        self.person_id.append_value(pid);
        self.date.append_value(day);
        self.label.append_value(label);
        self.value.append_value(value);
    }
    fn finish(mut self, table: &str) -> RecordBatch {
        batch(
            table,
            vec![
                Arc::new(self.person_id.finish()),
                Arc::new(self.date.finish()),
                Arc::new(self.label.finish()),
                Arc::new(self.value.finish()),
            ],
        )
    }
}

#[derive(Default)]
struct PrescriptionCols {
    person_id: StringBuilder,
    date: Date32Builder,
    drug: StringBuilder,
    quantity: Int64Builder,
}

impl PrescriptionCols {
    fn push(&mut self, pid: &str, day: i32, drug: &str, quantity_days: i64) {
        self.person_id.append_value(pid);
        self.date.append_value(day);
        self.drug.append_value(drug);
        self.quantity.append_value(quantity_days);
    }
    fn finish(mut self) -> RecordBatch {
        batch(
            PRESCRIPTIONS,
            vec![
                Arc::new(self.person_id.finish()),
                Arc::new(self.date.finish()),
                Arc::new(self.drug.finish()),
                Arc::new(self.quantity.finish()),
            ],
        )
    }
}

/// Paths of a dataset's extracts.
pub fn extract_paths(dir: &Path) -> Vec<(String, PathBuf)> {
    TABLES
        .iter()
        .chain(std::iter::once(&PRESCRIPTIONS))
        .map(|t| ((*t).to_owned(), dir.join(format!("{t}.parquet"))))
        .filter(|(t, p)| TABLES.contains(&t.as_str()) || p.exists())
        .collect()
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::AsArray;

    use super::*;

    /// First day of 2024 in days since 1970-01-01.
    const Y2024: i32 = 19_723;

    /// Issue #13: ranges of the pseudonym space, by first hex digit, one
    /// per 250,000 patients, between 2 and 16.
    #[test]
    fn pseudonym_ranges_grow_with_the_patients_asked_for() {
        assert_eq!(pseudonym_splits(1_000), ["P8"]);
        assert_eq!(pseudonym_splits(100_000), ["P8"]);
        assert_eq!(pseudonym_splits(1_000_000), ["P4", "P8", "Pc"]);
        let all = pseudonym_splits(10_000_000);
        assert_eq!(all.len(), 15);
        assert_eq!((all[0].as_str(), all[14].as_str()), ("P1", "Pf"));
        assert!(all.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn nhs_numbers_are_valid_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for i in (0..2_000).chain(9_999_000..10_000_000) {
            let n = nhs_number(i);
            assert_eq!(n.len(), 10);
            assert!(seen.insert(n.clone()), "{n}");
        }
    }

    #[test]
    fn chunks_are_deterministic_and_match_the_schema() {
        let key = MasterKey::from_bytes(&[3; 32]).unwrap_or_else(|e| panic!("{e}"));
        let (order, opted_out) = pseudonym_order(500, 7, &key).unwrap_or_else(|e| panic!("{e}"));
        let base = ChaCha12Rng::seed_from_u64(7);
        let a = Chunk::generate(&base, 7, 1, false, &order, &key);
        let b = Chunk::generate(&base, 7, 1, false, &order, &key);
        // A patient's records do not depend on who else is in the chunk.
        let alone = Chunk::generate(&base, 7, 1, false, &order[7..8], &key);
        // The order pass and the records agree on who opted out.
        let flagged = a.patients.column(10).as_boolean().true_count();
        assert_eq!(flagged, opted_out.len());
        assert!((5..60).contains(&flagged), "{flagged} of 500 opted out");
        assert_eq!(alone.patients, a.patients.slice(7, 1));
        assert_eq!(a.patients, b.patients);
        assert_eq!(a.admissions, b.admissions);
        assert_eq!(a.patients.num_rows(), 500);
        assert!(a.admissions.num_rows() > 50);
        assert!(a.labs.num_rows() > 100);
        assert!(a.waits.num_rows() > 50);
        assert_eq!(month_of(Y2024), "2024-01");
        assert_eq!(month_of(Y2024 + 365), "2024-12");
        assert_eq!(first_day(2024), Y2024);
        assert_eq!(first_day(1970), 0);
        assert_eq!(month_of(first_day(2020) + 59), "2020-02");
        assert_eq!(month_of(first_day(2021) + 59), "2021-03");
        assert_eq!(month_of(first_day(2025) - 1), "2024-12");
    }

    /// Issue #13: five years of history spread over 2020–2024, with many
    /// prescriptions; the tables other than prescriptions do not depend on
    /// whether prescriptions are written.
    #[test]
    fn years_of_history_with_prescriptions() {
        use datafusion::arrow::datatypes::Date32Type;
        let key = MasterKey::from_bytes(&[3; 32]).unwrap_or_else(|e| panic!("{e}"));
        let (order, _) = pseudonym_order(500, 7, &key).unwrap_or_else(|e| panic!("{e}"));
        let base = ChaCha12Rng::seed_from_u64(7);
        let one = Chunk::generate(&base, 7, 1, false, &order, &key);
        let five = Chunk::generate(&base, 7, 5, true, &order, &key);
        let five_without = Chunk::generate(&base, 7, 5, false, &order, &key);
        assert_eq!(five.labs, five_without.labs);
        assert_eq!(five_without.prescriptions.num_rows(), 0);
        assert!(five.admissions.num_rows() > 3 * one.admissions.num_rows());
        assert!(
            five.prescriptions.num_rows() > 10 * 500,
            "{}",
            five.prescriptions.num_rows()
        );
        let dates = five.labs.column(1).as_primitive::<Date32Type>();
        let (lo, hi) = (first_day(2020), first_day(2025));
        assert!(dates.iter().flatten().all(|d| (lo..hi).contains(&d)));
        assert!(dates.iter().flatten().any(|d| d < first_day(2021)));
    }
}
