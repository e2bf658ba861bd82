//! Signed bearer tokens: JWT with EdDSA (Ed25519) via `jsonwebtoken`. The
//! issuer key lives in the server's state directory (owner-only). Claims
//! carry user, role, expiry and a token id, shaped so that an OpenID Connect
//! provider can replace the local issuer later.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use tre_core::{Principal, Role, UserId};

use crate::GatewayError;

const ISSUER: &str = "tre";

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
}

pub struct Issuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Issuer {
    /// Load `state_dir/issuer.pk8`, creating it (0600) on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, GatewayError> {
        let path = state_dir.join("issuer.pk8");
        let pkcs8 = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| {
                    GatewayError::Setup("cannot generate the token issuer key".into())
                })?;
                tre_vault::write_secret_file(&path, doc.as_ref()).map_err(|e| {
                    GatewayError::Setup(format!("cannot write {}: {e}", path.display()))
                })?;
                doc.as_ref().to_vec()
            }
            Err(e) => {
                return Err(GatewayError::Setup(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        Self::from_pkcs8(&pkcs8)
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, GatewayError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| {
            GatewayError::Setup("the token issuer key is not a valid Ed25519 PKCS#8 key".into())
        })?;
        Ok(Self {
            encoding: EncodingKey::from_ed_der(pkcs8),
            decoding: DecodingKey::from_ed_der(pair.public_key().as_ref()),
        })
    }

    pub fn issue(&self, user: &UserId, role: Role, ttl_secs: u64) -> Result<String, GatewayError> {
        let now = unix_now();
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut jti)
            .map_err(|_| GatewayError::Setup("system random source failed".into()))?;
        let claims = Claims {
            sub: user.to_string(),
            role: role.as_str().to_owned(),
            iss: ISSUER.to_owned(),
            iat: now,
            exp: now.saturating_add(ttl_secs),
            jti: jti.iter().map(|b| format!("{b:02x}")).collect(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.encoding)
            .map_err(|e| GatewayError::Setup(format!("cannot sign token: {e}")))
    }

    pub fn verify(&self, token: &str) -> Result<Principal, GatewayError> {
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_issuer(&[ISSUER]);
        v.leeway = 0;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &v).map_err(|e| {
            GatewayError::Unauthenticated(match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    "the token has expired; ask the operator for a new one".into()
                }
                _ => "the token is not valid; ask the operator for a new one".into(),
            })
        })?;
        let user = UserId::new(data.claims.sub)
            .map_err(|_| GatewayError::Unauthenticated("the token names an invalid user".into()))?;
        let role =
            data.claims.role.parse::<Role>().map_err(|_| {
                GatewayError::Unauthenticated("the token names an unknown role".into())
            })?;
        Ok(Principal { user, role })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
