//! The audit log's tamper evidence, independent of where the log is kept.
//!
//! Each event commits to its predecessor, `h_i = SHA-256(h_{i-1} ‖ i ‖
//! event)`, and carries an Ed25519 signature over `h_i` by the server's audit
//! key, so nobody without the key can append a plausible event. Every N
//! events, and at shutdown and export, the server also signs a checkpoint
//! `(seq, h_seq, time)`; a checkpoint that points past the end of the log
//! reveals a truncated tail. The same `verify` runs in the server and on an
//! exported JSON Lines file offline (`tre audit verify --export`).

use ring::digest;
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// The `prev_hash` of the first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Signs on behalf of the server. The store is handed one and never sees
/// the key itself.
pub trait Notary: Send + Sync {
    fn sign(&self, message: &[u8]) -> Vec<u8>;
    /// The raw 32-byte Ed25519 public key that verifies `sign`.
    fn public_key(&self) -> Vec<u8>;
}

/// One call, allowed or refused. Never holds an exact aggregate. Privacy
/// costs are kept in the ledger's integer units so the hash is exact.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    pub at: String,
    pub user: String,
    pub role: String,
    /// The caller's network address as the server saw it.
    pub client: String,
    pub project: String,
    pub action: String,
    pub sql: String,
    pub plan_hash: String,
    pub epsilon_nanos: i64,
    pub delta_femtos: i64,
    /// A `tre_core::Outcome` as text; set it with `set_outcome`. Text, so
    /// that a tampered value is still read and reported by the chain check.
    pub outcome: String,
    pub code: String,
    pub release_id: String,
    /// SHA-256 of the released table as the researcher received it.
    pub release_hash: String,
    /// Internal detail for auditors (e.g. the engine error behind a generic
    /// TRE-E001). Never shown to the researcher.
    pub detail: String,
}

/// The most SQL one event keeps: the compiler refuses longer SQL
/// (`TRE-Q031`), so every query that can run is kept whole.
pub const MAX_SQL_BYTES: usize = 64 * 1024;
/// The most detail (an engine error, a parse error) one event keeps.
pub const MAX_DETAIL_BYTES: usize = 4 * 1024;
/// The most any other text field keeps (ids, names, addresses, hashes).
pub const MAX_FIELD_BYTES: usize = 512;

impl AuditEvent {
    /// Bytes of text the event holds: what a page of events is budgeted by.
    pub fn text_bytes(&self) -> usize {
        [
            &self.at,
            &self.user,
            &self.role,
            &self.client,
            &self.project,
            &self.action,
            &self.sql,
            &self.plan_hash,
            &self.outcome,
            &self.code,
            &self.release_id,
            &self.release_hash,
            &self.detail,
        ]
        .iter()
        .map(|s| s.len())
        .sum()
    }

    /// This event with each text field cut to its cap, so that no call can
    /// make the log unreadable (issue #11: two DryRuns of 2.5 MB of SQL
    /// broke `audit list` and `audit export`). A cut field ends with the
    /// original's length and SHA-256, so it can still be matched to the
    /// text the caller sent.
    pub fn capped(&self) -> AuditEvent {
        let field = |s: &String| cap(s, MAX_FIELD_BYTES);
        AuditEvent {
            at: field(&self.at),
            user: field(&self.user),
            role: field(&self.role),
            client: field(&self.client),
            project: field(&self.project),
            action: field(&self.action),
            sql: cap(&self.sql, MAX_SQL_BYTES),
            plan_hash: field(&self.plan_hash),
            epsilon_nanos: self.epsilon_nanos,
            delta_femtos: self.delta_femtos,
            outcome: field(&self.outcome),
            code: field(&self.code),
            release_id: field(&self.release_id),
            release_hash: field(&self.release_hash),
            detail: cap(&self.detail, MAX_DETAIL_BYTES),
        }
    }
}

fn cap(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… [cut by tre: {} bytes in all, sha256 {}]",
        &s[..end],
        s.len(),
        sha256_hex(s.as_bytes())
    )
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredEvent {
    pub seq: i64,
    pub prev_hash: String,
    pub hash: String,
    /// Hex Ed25519 signature over `event_message(hash)`.
    pub sig: String,
    pub event: AuditEvent,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: String,
    pub at: String,
    pub sig: String,
    /// `key_fingerprint` of the key that signed it, inside the signed
    /// message, so an auditor can compare it with the fingerprint `tre
    /// serve` printed at start-up (issue #11). Empty in checkpoints signed
    /// before fingerprints were recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
}

/// A line of an export: events in order, each checkpoint right after the
/// event it covers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    Event(Box<StoredEvent>),
    Checkpoint(Checkpoint),
    ExportEnd(ExportEnd),
}

/// The last line of an export, signed over the head of the log and the
/// number of lines before it, so an offline verifier can tell a whole
/// export from any prefix of one (issue #11: a prefix verified as intact).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportEnd {
    pub seq: i64,
    pub hash: String,
    /// Lines before this one.
    pub entries: usize,
    pub at: String,
    pub sig: String,
}

pub fn export_end_message(seq: i64, hash: &str, entries: usize, at: &str) -> Vec<u8> {
    format!("tre-audit-export-end/v1\n{seq}\n{hash}\n{entries}\n{at}").into_bytes()
}

/// The end-of-export line after `entries` lines whose last event is `seq`
/// with `hash` (the genesis hash and 0 for an empty log), for an export
/// written page by page.
pub fn export_end(
    seq: i64,
    hash: &str,
    entries: usize,
    at: &str,
    notary: &dyn Notary,
) -> ExportEnd {
    let sig = hex::encode(notary.sign(&export_end_message(seq, hash, entries, at)));
    ExportEnd {
        seq,
        hash: hash.to_owned(),
        entries,
        at: at.to_owned(),
        sig,
    }
}

/// Where verification first failed. `position` is 1-based, counting entries
/// (lines of an export), so an auditor can go straight to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tamper {
    pub position: usize,
    pub seq: Option<i64>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub events: usize,
    pub checkpoints: usize,
    /// The last event covered by a valid checkpoint.
    pub checkpointed_through: i64,
    /// The entries end with a valid end-of-export line.
    pub export_complete: bool,
    pub first_bad: Option<Tamper>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.first_bad.is_none()
    }
}

pub fn event_hash(prev: &str, seq: i64, e: &AuditEvent) -> String {
    // Serialising a plain struct of strings and integers cannot fail; an
    // empty body would still be caught because the hash would not match.
    let body = serde_json::to_string(e).unwrap_or_default();
    let mut buf = Vec::with_capacity(prev.len() + body.len() + 8);
    buf.extend_from_slice(prev.as_bytes());
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend_from_slice(body.as_bytes());
    sha256_hex(&buf)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes).as_ref())
}

/// Decode hex written exactly as `hex::encode` writes it.
pub fn canonical_hex(s: &str) -> Option<Vec<u8>> {
    hex::decode(s).ok().filter(|b| hex::encode(b) == s)
}

pub fn event_message(hash: &str) -> Vec<u8> {
    format!("tre-audit-event/v1\n{hash}").into_bytes()
}

pub fn checkpoint_message(seq: i64, hash: &str, at: &str, key: &str) -> Vec<u8> {
    if key.is_empty() {
        format!("tre-audit-checkpoint/v1\n{seq}\n{hash}\n{at}").into_bytes()
    } else {
        format!("tre-audit-checkpoint/v2\n{seq}\n{hash}\n{at}\n{key}").into_bytes()
    }
}

/// A short, stable name of an Ed25519 public key: `SHA256:` and the first
/// 128 bits of its SHA-256, in hex. `tre serve` prints it at start-up and
/// every checkpoint carries it; an auditor who wrote it down can pin
/// verification to it.
pub fn key_fingerprint(public_key: &[u8]) -> String {
    format!("SHA256:{}", &sha256_hex(public_key)[..32])
}

fn signed(public_key: &[u8], message: &[u8], sig_hex: &str) -> bool {
    // Only the canonical (lowercase) spelling counts: a log is tampered
    // with if any byte of it changes, even where the meaning would not.
    let Some(sig) = canonical_hex(sig_hex) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, &sig)
        .is_ok()
}

/// Check a whole log. Detects any modified, deleted, inserted or reordered
/// event, any event not signed by `public_key`, and a truncated tail up to
/// the last checkpoint.
pub fn verify(entries: &[Entry], public_key: &[u8]) -> VerifyReport {
    let mut report = VerifyReport {
        events: 0,
        checkpoints: 0,
        checkpointed_through: 0,
        export_complete: false,
        first_bad: None,
    };
    let mut prev = GENESIS.to_owned();
    let mut last_seq = 0i64;
    for (i, entry) in entries.iter().enumerate() {
        let position = i + 1;
        let bad = |seq: i64, reason: String| Tamper {
            position,
            seq: Some(seq),
            reason,
        };
        let problem = match entry {
            Entry::Event(e) => {
                report.events += 1;
                let expected = last_seq + 1;
                let problem = if e.seq != expected {
                    Some(bad(
                        e.seq,
                        format!("expected event {expected} here, found event {}", e.seq),
                    ))
                } else if e.prev_hash != prev {
                    Some(bad(
                        e.seq,
                        "does not follow the event before it (previous hash differs)".into(),
                    ))
                } else if event_hash(&prev, e.seq, &e.event) != e.hash {
                    Some(bad(e.seq, "content does not match its hash".into()))
                } else if !signed(public_key, &event_message(&e.hash), &e.sig) {
                    Some(bad(e.seq, "signature is not the server's".into()))
                } else {
                    None
                };
                last_seq = e.seq;
                prev = e.hash.clone();
                problem
            }
            Entry::Checkpoint(c) => {
                report.checkpoints += 1;
                if !c.key.is_empty() && c.key != key_fingerprint(public_key) {
                    Some(bad(
                        c.seq,
                        format!(
                            "checkpoint was signed by key {} but is checked against key {}",
                            c.key,
                            key_fingerprint(public_key)
                        ),
                    ))
                } else if !signed(
                    public_key,
                    &checkpoint_message(c.seq, &c.hash, &c.at, &c.key),
                    &c.sig,
                ) {
                    Some(bad(
                        c.seq,
                        "checkpoint signature is not the server's".into(),
                    ))
                } else if c.seq != last_seq || c.hash != prev {
                    Some(bad(
                        c.seq,
                        format!(
                            "checkpoint covers event {} but the log has {last_seq} events at this point (events deleted or reordered)",
                            c.seq
                        ),
                    ))
                } else {
                    report.checkpointed_through = c.seq;
                    None
                }
            }
            Entry::ExportEnd(end) => {
                if !signed(
                    public_key,
                    &export_end_message(end.seq, &end.hash, end.entries, &end.at),
                    &end.sig,
                ) {
                    Some(bad(
                        end.seq,
                        "end-of-export signature is not the server's".into(),
                    ))
                } else if position != entries.len() {
                    Some(bad(end.seq, "lines follow the end of the export".into()))
                } else if end.entries != i || end.seq != last_seq || end.hash != prev {
                    Some(bad(
                        end.seq,
                        format!(
                            "the export ended after {} lines and event {}, but {i} lines and {last_seq} events precede its end (lines deleted)",
                            end.entries, end.seq
                        ),
                    ))
                } else {
                    report.export_complete = true;
                    None
                }
            }
        };
        if let Some(t) = problem {
            report.first_bad = Some(t);
            return report;
        }
    }
    report
}

/// Parse a JSON Lines export and verify it. A line that does not parse is
/// itself the first bad position.
pub fn verify_jsonl(text: &str, public_key: &[u8]) -> VerifyReport {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match serde_json::from_str::<Entry>(line) {
            Ok(e) => entries.push(e),
            Err(err) => {
                let mut r = verify(&entries, public_key);
                if r.first_bad.is_none() {
                    r.first_bad = Some(Tamper {
                        position: i + 1,
                        seq: None,
                        reason: format!("not a valid log entry: {err}"),
                    });
                }
                return r;
            }
        }
    }
    verify(&entries, public_key)
}

/// Verify an export file: as `verify_jsonl`, and it must end with the
/// server's end-of-export line, so an export cut anywhere (at a line, in a
/// line, after a checkpoint or with none) fails.
pub fn verify_export(text: &str, public_key: &[u8]) -> VerifyReport {
    let mut r = verify_jsonl(text, public_key);
    if r.first_bad.is_none() && !r.export_complete {
        r.first_bad = Some(Tamper {
            position: text.lines().count() + 1,
            seq: None,
            reason: "the export has no end-of-export line: it was cut short".into(),
        });
    }
    r
}

pub fn to_jsonl(entries: &[Entry]) -> Result<String, serde_json::Error> {
    let mut out = String::new();
    for e in entries {
        out.push_str(&serde_json::to_string(e)?);
        out.push('\n');
    }
    Ok(out)
}
