//! Keys and everything that touches key bytes: the master key (from a file
//! or `TRE_MASTER_KEY`), per-file data keys wrapped by it (envelope
//! encryption, AES-256-GCM), Parquet modular-encryption properties for
//! writing and reading extracts, and keyed pseudonymisation of direct
//! identifiers (HMAC-SHA256).
//!
//! This is the only crate that holds the keys that protect data. It must
//! never depend on DataFusion, the query engine, storage or the network;
//! key bytes never leave it except inside parquet's encryption properties.
//! The gateway's Ed25519 signing keys (audit notary, token issuer) are not
//! here: they sign and decrypt nothing.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use parquet::encryption::decrypt::{FileDecryptionProperties, KeyRetriever};
use parquet::encryption::encrypt::FileEncryptionProperties;
use parquet::errors::ParquetError;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tre_core::Code;

/// Environment variable that may carry the master key as 64 hex digits.
pub const MASTER_KEY_ENV: &str = "TRE_MASTER_KEY";

const WRAP_MAGIC: &[u8; 5] = b"TREK1";
const KEY_ID_LEN: usize = 8;
const DEK_LEN: usize = 32;
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{code} master key: {0}", code = self.code())]
    MasterKey(String),
    #[error("{code} the master key does not match the key that encrypted {file}; check --key-file or {MASTER_KEY_ENV}", code = self.code())]
    WrongMasterKey { file: String },
    #[error("{code} could not read the encrypted extract {file}: {reason}", code = self.code())]
    Unreadable { file: String, reason: String },
    #[error("{code} cryptographic failure: {0}", code = self.code())]
    Crypto(String),
}

impl VaultError {
    /// The stable code, written once: the message's prefix comes from here.
    pub fn code(&self) -> Code {
        match self {
            VaultError::MasterKey(_) => Code::MasterKey,
            VaultError::WrongMasterKey { .. } => Code::WrongMasterKey,
            VaultError::Unreadable { .. } => Code::ExtractUnreadable,
            VaultError::Crypto(_) => Code::Internal,
        }
    }
}

/// The key-encryption key. Never printed, never serialised.
pub struct MasterKey {
    key: LessSafeKey,
    id: [u8; KEY_ID_LEN],
    pseudonym_key: hmac::Key,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey(id={})", hex::encode(self.id))
    }
}

/// Where the master key came from, for the operator's benefit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Environment,
    File { created: bool },
}

impl MasterKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, VaultError> {
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, bytes)
                .map_err(|_| VaultError::Crypto("aes key".into()))?,
        );
        // Sub-keys are derived so that the wrapping key never doubles as the
        // pseudonymisation key.
        let prf = hmac::Key::new(hmac::HMAC_SHA256, bytes);
        let id_tag = hmac::sign(&prf, b"tre key id v1");
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&id_tag.as_ref()[..KEY_ID_LEN]);
        let pseudo = hmac::sign(&prf, b"tre pseudonym key v1");
        Ok(Self {
            key,
            id,
            pseudonym_key: hmac::Key::new(hmac::HMAC_SHA256, pseudo.as_ref()),
        })
    }

    pub fn from_hex(text: &str) -> Result<Self, VaultError> {
        let bytes = hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| VaultError::MasterKey("expected 64 hex digits (32 bytes)".into()))?;
        Self::from_bytes(&bytes)
    }

    /// Resolve the master key: `TRE_MASTER_KEY` if set, else `key_file`.
    /// With `create`, a missing key file is made with a fresh random key and
    /// owner-only permissions (0600).
    pub fn resolve(
        env_value: Option<&str>,
        key_file: &Path,
        create: bool,
    ) -> Result<(Self, KeySource), VaultError> {
        if let Some(v) = env_value.filter(|v| !v.trim().is_empty()) {
            return Ok((Self::from_hex(v)?, KeySource::Environment));
        }
        match fs::read_to_string(key_file) {
            Ok(text) => Ok((
                Self::from_hex(&text)
                    .map_err(|e| VaultError::MasterKey(format!("{}: {e}", key_file.display())))?,
                KeySource::File { created: false },
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let bytes: [u8; 32] = random_bytes()?;
                write_secret_file(key_file, hex::encode(bytes).as_bytes()).map_err(|e| {
                    VaultError::MasterKey(format!("cannot create {}: {e}", key_file.display()))
                })?;
                Ok((Self::from_bytes(&bytes)?, KeySource::File { created: true }))
            }
            Err(e) => Err(VaultError::MasterKey(format!(
                "cannot read {}: {e}; set {MASTER_KEY_ENV} or pass --key-file",
                key_file.display()
            ))),
        }
    }

    pub fn key_id(&self) -> String {
        hex::encode(self.id)
    }

    /// Keyed pseudonym of a direct identifier. Deterministic for one master
    /// key, so records of one person link across tables; irreversible
    /// without the key.
    pub fn pseudonymise(&self, identifier: &str) -> String {
        let tag = hmac::sign(&self.pseudonym_key, identifier.as_bytes());
        format!("P{}", hex::encode(&tag.as_ref()[..12]))
    }

    /// Encryption properties for one new extract file: a fresh data key,
    /// wrapped by the master key into the footer key metadata; AES-256-GCM
    /// with the footer encrypted; the file identity bound in as AAD prefix
    /// (not stored) so that files cannot be swapped.
    pub fn file_encryption(
        &self,
        file_id: &str,
    ) -> Result<Arc<FileEncryptionProperties>, VaultError> {
        let dek: [u8; DEK_LEN] = random_bytes()?;
        let wrapped = self.wrap(&dek, file_id)?;
        FileEncryptionProperties::builder(dek.to_vec())
            .with_footer_key_metadata(wrapped)
            .with_plaintext_footer(false)
            .with_aad_prefix(file_id.as_bytes().to_vec())
            .with_aad_prefix_storage(false)
            .build()
            .map_err(|e| VaultError::Crypto(e.to_string()))
    }

    /// Decryption properties for an extract with identity `file_id`; the data
    /// key is unwrapped from the file's key metadata when parquet asks.
    pub fn file_decryption(
        self: &Arc<Self>,
        file_id: &str,
    ) -> Result<Arc<FileDecryptionProperties>, VaultError> {
        FileDecryptionProperties::with_key_retriever(Arc::new(Unwrapper {
            master: Arc::clone(self),
            file_id: file_id.to_owned(),
        }))
        .with_aad_prefix(file_id.as_bytes().to_vec())
        .build()
        .map_err(|e| VaultError::Crypto(e.to_string()))
    }

    fn wrap(&self, dek: &[u8; DEK_LEN], file_id: &str) -> Result<Vec<u8>, VaultError> {
        let nonce_bytes: [u8; NONCE_LEN] = random_bytes()?;
        let mut sealed = dek.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(file_id.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| VaultError::Crypto("wrap".into()))?;
        let mut out = Vec::with_capacity(WRAP_MAGIC.len() + KEY_ID_LEN + NONCE_LEN + sealed.len());
        out.extend_from_slice(WRAP_MAGIC);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap_key(&self, wrapped: &[u8], file_id: &str) -> Result<Vec<u8>, VaultError> {
        let unreadable = |reason: &str| VaultError::Unreadable {
            file: file_id.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = wrapped
            .strip_prefix(WRAP_MAGIC.as_slice())
            .ok_or_else(|| unreadable("key metadata is not a tre wrapped key"))?;
        if rest.len() != KEY_ID_LEN + NONCE_LEN + DEK_LEN + TAG_LEN {
            return Err(unreadable("wrapped key has the wrong length"));
        }
        let (id, rest) = rest.split_at(KEY_ID_LEN);
        if id != self.id {
            return Err(VaultError::WrongMasterKey {
                file: file_id.to_owned(),
            });
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| unreadable("nonce"))?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(file_id.as_bytes()), &mut buf)
            .map_err(|_| unreadable("the data key does not authenticate for this file identity"))?;
        Ok(plain.to_vec())
    }
}

struct Unwrapper {
    master: Arc<MasterKey>,
    file_id: String,
}

impl KeyRetriever for Unwrapper {
    fn retrieve_key(&self, key_metadata: &[u8]) -> parquet::errors::Result<Vec<u8>> {
        self.master
            .unwrap_key(key_metadata, &self.file_id)
            // Boxed whole, so the caller can find it again by type.
            .map_err(|e| ParquetError::External(Box::new(e)))
    }
}

/// Classify an error raised while opening an extract, so that a wrong
/// master key is reported as such rather than as a generic read failure.
/// The key retriever's own `VaultError` travels inside parquet's error and
/// is found by type along the source chain, not by its text (issue #12).
pub fn classify_open_error(file: &str, err: &(dyn std::error::Error + 'static)) -> VaultError {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(VaultError::WrongMasterKey { .. }) = e.downcast_ref::<VaultError>() {
            return VaultError::WrongMasterKey {
                file: file.to_owned(),
            };
        }
        cause = e.source();
    }
    VaultError::Unreadable {
        file: file.to_owned(),
        reason: err.to_string(),
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], VaultError> {
    let mut buf = [0u8; N];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| VaultError::Crypto("system random source failed".into()))?;
    Ok(buf)
}

/// Splits of the pseudonym space into equal ranges, by first hex digit:
/// every table is stored in the same ranges, so that a reader can give
/// each worker whole patients of every table (issue #13). They follow the
/// pseudonym format and the number of patients asked for, never the data:
/// one range per 250,000 patients, at least 2 and at most 16 (a power of
/// two). More ranges than that only cut small tables into many small row
/// groups, each with its own decryption and decoding set-up.
pub fn pseudonym_splits(patients: u64) -> Vec<String> {
    let ranges = (patients / 250_000)
        .clamp(2, 16)
        .next_power_of_two()
        .min(16);
    let step = 16 / ranges;
    (1..ranges).map(|r| format!("P{:x}", r * step)).collect()
}

/// Create `path` (and its parents) holding `bytes`, readable and writable by
/// the owner only (0600). Fails if the file exists: secrets are never
/// overwritten.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Arc<MasterKey> {
        Arc::new(MasterKey::from_bytes(&[byte; 32]).unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn wrap_round_trips_and_binds_identity_and_key() {
        let k = key(1);
        let dek = [7u8; DEK_LEN];
        let wrapped = k
            .wrap(&dek, "nhs_epr/patients.parquet")
            .unwrap_or_else(|e| panic!("{e}"));
        let back = k
            .unwrap_key(&wrapped, "nhs_epr/patients.parquet")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, dek);
        assert!(matches!(
            k.unwrap_key(&wrapped, "nhs_epr/admissions.parquet"),
            Err(VaultError::Unreadable { .. })
        ));
        assert!(matches!(
            key(2).unwrap_key(&wrapped, "nhs_epr/patients.parquet"),
            Err(VaultError::WrongMasterKey { .. })
        ));
    }

    #[test]
    fn pseudonyms_are_keyed_and_stable() {
        let (a, b) = (key(1), key(2));
        assert_eq!(a.pseudonymise("9434765919"), a.pseudonymise("9434765919"));
        assert_ne!(a.pseudonymise("9434765919"), b.pseudonymise("9434765919"));
        assert_ne!(a.pseudonymise("9434765919"), a.pseudonymise("9434765870"));
    }

    #[test]
    fn key_file_is_created_owner_only_and_reused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("keys/master.key");
        let (k1, src) = MasterKey::resolve(None, &path, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(src, KeySource::File { created: true });
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
            assert_eq!(mode.ok(), Some(0o600));
        }
        let (k2, src) = MasterKey::resolve(None, &path, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(src, KeySource::File { created: false });
        assert_eq!(k1.key_id(), k2.key_id());
        let missing = dir.path().join("none.key");
        assert!(MasterKey::resolve(None, &missing, false).is_err());
        let env = hex::encode([9u8; 32]);
        let (k3, src) =
            MasterKey::resolve(Some(&env), &missing, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(src, KeySource::Environment);
        assert_eq!(k3.key_id(), key(9).key_id());
    }
}
