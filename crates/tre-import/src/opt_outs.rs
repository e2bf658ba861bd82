//! `tre dataset optouts`: replace a dataset's National Data Opt-out list
//! without a re-import (issue #15). The list (one NHS number or other
//! direct identifier per line) is pseudonymised with the same key as the
//! import, so it names the same patients, and written beside the extracts
//! as `_opt_outs.parquet` through `ExtractWriter`: encrypted, sorted, and
//! in place in one rename. The server leaves these patients out of every
//! table once it reloads its datasets (SIGHUP, or its next start), and the
//! dataset's version (the snapshot hash that releases and manifests carry)
//! changes with the list.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use tre_extract::{ExtractWriter, OPT_OUT_LIST, Protection};
use tre_policy::Policy;
use tre_vault::MasterKey;

use crate::ImportError;

/// What a replaced list held.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OptOutReport {
    /// Identifiers read (blank lines and `#` comments aside).
    pub identifiers: u64,
    /// Distinct patients they name.
    pub patients: u64,
    /// `tre_extract::opt_out_digest` of the pseudonyms: the same list gives
    /// the same digest.
    pub digest: String,
}

/// Replace the opt-out list of the dataset in `data` with the identifiers
/// in `list`.
pub fn replace(
    data: &Path,
    policy: &Policy,
    master: &MasterKey,
    list: &Path,
) -> Result<OptOutReport, ImportError> {
    let dataset = &policy.dataset;
    if data.file_name().and_then(|n| n.to_str()) != Some(dataset.as_str()) || !data.is_dir() {
        return Err(ImportError::Schema(format!(
            "{} is not the directory of dataset '{dataset}'; give --data <dir>/{dataset}",
            data.display()
        )));
    }
    let shown = list.display().to_string();
    let file = std::fs::File::open(list).map_err(|e| ImportError::Input {
        file: shown.clone(),
        reason: format!("cannot open: {e}"),
        fix: "check the path and its permissions".into(),
    })?;
    let mut pseudonyms = BTreeSet::new();
    let mut identifiers = 0u64;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| ImportError::Input {
            file: shown.clone(),
            reason: format!("line {}: {e}", i + 1),
            fix: "save the list as UTF-8 text, one identifier per line".into(),
        })?;
        // NHS numbers are often written in groups: "943 476 5919".
        let id: String = line.split_whitespace().collect();
        if id.is_empty() || id.starts_with('#') {
            continue;
        }
        identifiers += 1;
        pseudonyms.insert(master.pseudonymise(&id));
    }
    let unit = &policy.privacy_unit;
    let schema = Arc::new(Schema::new(vec![Field::new(unit, DataType::Utf8, false)]));
    let seed = crate::sampler_seed(OPT_OUT_LIST)?;
    let file_id = tre_extract::file_id(dataset, OPT_OUT_LIST);
    let mut writer = ExtractWriter::create(
        &data.join(format!("{OPT_OUT_LIST}.parquet")),
        Arc::clone(&schema),
        unit,
        1,
        Protection::Encrypted {
            master,
            file_id: &file_id,
        },
        seed,
    )?;
    let all: Vec<&str> = pseudonyms.iter().map(String::as_str).collect();
    for chunk in all.chunks(crate::BATCH_ROWS) {
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(StringArray::from(chunk.to_vec()))],
        )
        .map_err(|e| ImportError::Stage {
            table: OPT_OUT_LIST.into(),
            reason: e.to_string(),
        })?;
        writer.write(&batch)?;
    }
    writer.close()?;
    Ok(OptOutReport {
        identifiers,
        patients: pseudonyms.len() as u64,
        digest: tre_extract::opt_out_digest(all),
    })
}
