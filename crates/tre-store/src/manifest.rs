//! Signed release manifests: what was released, under which rules, at what
//! cost, signed with the server's Ed25519 key so that anyone holding the
//! public key can check a release offline (`tre release verify`).

use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::chain::{Notary, sha256_hex};

pub const FORMAT: &str = "tre-release-manifest/v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestColumn {
    pub name: String,
    pub kind: String,
    pub mechanism: String,
    pub noise_scale: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellCounts {
    pub released: u64,
    pub rounded: u64,
    pub suppressed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub release_id: String,
    pub project: String,
    pub user: String,
    pub created_at: String,
    pub sql: String,
    pub plan_hash: String,
    pub dataset: String,
    pub policy_sha256: String,
    pub sdc_profile: String,
    pub sdc_profile_sha256: String,
    /// SHA-256 over the dataset's extract files as served.
    pub dataset_snapshot_sha256: String,
    pub epsilon_nanos: i64,
    pub delta_femtos: i64,
    pub columns: Vec<ManifestColumn>,
    pub cells: CellCounts,
    /// Each value cell's disclosure outcome, row by row: released, rounded
    /// or suppressed, with the rule's reason after a colon.
    pub cell_outcomes: Vec<String>,
    /// pass | review | fail
    pub sdc_outcome: String,
    /// Whether rules on exact values (minimum patients, dominance, p-ratio)
    /// ran: their decisions depend on exact data.
    pub exact_rules_applied: bool,
    pub engine_version: String,
    /// SHA-256 of the released table file (`release.json`).
    pub table_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    pub manifest: Manifest,
    /// Hex Ed25519 signature over `FORMAT ‖ '\n' ‖ JSON`, the JSON being
    /// serde_json's compact output of `Manifest` (fields in declaration order).
    pub signature: String,
}

fn message(m: &Manifest) -> Result<Vec<u8>, String> {
    let body = serde_json::to_string(m).map_err(|e| format!("cannot serialise: {e}"))?;
    Ok(format!("{FORMAT}\n{body}").into_bytes())
}

impl Manifest {
    pub fn sign(self, notary: &dyn Notary) -> Result<SignedManifest, String> {
        let signature = hex::encode(notary.sign(&message(&self)?));
        Ok(SignedManifest {
            manifest: self,
            signature,
        })
    }
}

impl SignedManifest {
    /// Check the signature and that `table` is the released table. Returns
    /// what is wrong, naming the first failed check.
    pub fn verify(&self, table: &[u8], public_key: &[u8]) -> Result<(), String> {
        if self.manifest.format != FORMAT {
            return Err(format!(
                "unknown manifest format '{}'",
                self.manifest.format
            ));
        }
        let sig = crate::chain::canonical_hex(&self.signature)
            .ok_or("the signature is not lowercase hex: it was changed")?;
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&message(&self.manifest)?, &sig)
            .map_err(|_| "the manifest's signature does not verify: it was changed or not signed by this server")?;
        let actual = sha256_hex(table);
        if actual != self.manifest.table_sha256 {
            return Err(format!(
                "the table does not match the manifest (SHA-256 {actual}, manifest says {})",
                self.manifest.table_sha256
            ));
        }
        Ok(())
    }
}
