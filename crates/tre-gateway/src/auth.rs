//! Keys the server signs with, and signed bearer tokens.
//!
//! Tokens are JWTs with EdDSA (Ed25519) via `jsonwebtoken`. Claims carry
//! user, role, expiry and a token id (`jti`, for revocation), shaped so that
//! an OpenID Connect provider can replace the local issuer later. The audit
//! log is signed by a separate key (`AuditNotary`), so that a leaked token
//! key cannot forge history. Both keys live in the server's state directory,
//! owner-only.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use tre_core::{Principal, Role, UserId};

use crate::{GatewayError, ServerFault};

const ISSUER: &str = "tre";

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
    /// A custodian's datasets (issue #15); absent: every dataset served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custodian_of: Option<Vec<String>>,
}

pub struct Issuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

fn key_file(path: &Path, reason: impl Into<String>) -> GatewayError {
    ServerFault::KeyFile {
        path: path.display().to_string(),
        reason: reason.into(),
    }
    .into()
}

/// Read an Ed25519 PKCS#8 key from `path`, creating it (0600) on first use.
fn load_or_create_pkcs8(path: &Path) -> Result<Vec<u8>, GatewayError> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| ServerFault::Random)?;
            tre_vault::write_secret_file(path, doc.as_ref())
                .map_err(|e| key_file(path, format!("cannot write it: {e}")))?;
            Ok(doc.as_ref().to_vec())
        }
        Err(e) => Err(key_file(path, format!("cannot read it: {e}"))),
    }
}

/// Signs audit events and checkpoints for the store.
pub struct AuditNotary(Ed25519KeyPair);

impl AuditNotary {
    /// Load `state_dir/audit.pk8` (creating it on first use) and write its
    /// public key, hex, to `state_dir/audit.pub` for offline verification.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, GatewayError> {
        let path = state_dir.join("audit.pk8");
        let pkcs8 = load_or_create_pkcs8(&path)?;
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| key_file(&path, "not a valid Ed25519 PKCS#8 key"))?;
        let public = state_dir.join("audit.pub");
        std::fs::write(&public, hex::encode(pair.public_key().as_ref()))
            .map_err(|e| key_file(&public, format!("cannot write it: {e}")))?;
        Ok(Self(pair))
    }
}

impl tre_store::Notary for AuditNotary {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).as_ref().to_vec()
    }
    fn public_key(&self) -> Vec<u8> {
        self.0.public_key().as_ref().to_vec()
    }
}

impl Issuer {
    /// Load `state_dir/issuer.pk8`, creating it (0600) on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, GatewayError> {
        Self::from_pkcs8(&load_or_create_pkcs8(&state_dir.join("issuer.pk8"))?)
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, GatewayError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| ServerFault::KeyFile {
            path: "the token issuer key".into(),
            reason: "not a valid Ed25519 PKCS#8 key".into(),
        })?;
        Ok(Self {
            encoding: EncodingKey::from_ed_der(pkcs8),
            decoding: DecodingKey::from_ed_der(pair.public_key().as_ref()),
        })
    }

    /// Claims for a new token: a fresh random `jti`, valid from now for
    /// `ttl_secs`.
    pub fn claims(user: &UserId, role: Role, ttl_secs: u64) -> Result<Claims, GatewayError> {
        let now = unix_now();
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut jti)
            .map_err(|_| ServerFault::Random)?;
        Ok(Claims {
            sub: user.to_string(),
            role: role.as_str().to_owned(),
            iss: ISSUER.to_owned(),
            iat: now,
            exp: now.saturating_add(ttl_secs),
            jti: hex::encode(jti),
            custodian_of: None,
        })
    }

    pub fn issue(&self, user: &UserId, role: Role, ttl_secs: u64) -> Result<String, GatewayError> {
        self.sign(&Self::claims(user, role, ttl_secs)?)
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, GatewayError> {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &self.encoding)
            .map_err(|e| ServerFault::Signing(format!("a token: {e}")).into())
    }

    /// Check signature, issuer and expiry; returns the caller and the token
    /// id (revocation is checked against the store by the caller).
    pub fn verify(&self, token: &str) -> Result<(Principal, String), GatewayError> {
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_issuer(&[ISSUER]);
        v.set_required_spec_claims(&["exp", "iss", "sub"]);
        v.leeway = 0;
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &v).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => GatewayError::TokenExpired,
                    _ => GatewayError::Unauthenticated(
                        "the token is not valid; ask the operator for a new one".into(),
                    ),
                }
            })?;
        let user = UserId::new(data.claims.sub)
            .map_err(|_| GatewayError::Unauthenticated("the token names an invalid user".into()))?;
        let role =
            data.claims.role.parse::<Role>().map_err(|_| {
                GatewayError::Unauthenticated("the token names an unknown role".into())
            })?;
        Ok((
            Principal {
                user,
                role,
                custodian_of: data.claims.custodian_of,
            },
            data.claims.jti,
        ))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
