//! Peer credentials: what the control plane signs at registration to say
//! "this caller is peer `P`", and what every daemon checks offline before it
//! serves a chunk.
//!
//! A credential is a JSON Web Token signed with Ed25519 (`alg: EdDSA`):
//!
//! ```text
//! base64url({"alg":"EdDSA","typ":"JWT","kid":"<16 hex>"}) . base64url(claims) . base64url(signature)
//! claims: {"iss":"nebula","sub":"<peer id>","addr":"<host:port>","iat":<unix s>,"exp":<unix s>}
//! ```
//!
//! `kid` names the public key (the first 8 bytes of its BLAKE3 hash, in hex),
//! so a [`Verifier`] holding several keys (during a rotation) tries the right
//! one. Credentials travel in the `nebula-credential` gRPC metadata entry.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use dashmap::DashMap;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::private_file;

/// The gRPC metadata entry a credential travels in.
pub const METADATA_KEY: &str = "nebula-credential";

/// Clock difference tolerated between the signer and a verifier.
const SKEW: Duration = Duration::from_secs(60);

/// Longer tokens are refused before any decoding.
const MAX_LEN: usize = 2048;

/// Verified credentials remembered, so a call costs a lookup, not a signature check.
const CACHE_ENTRIES: usize = 65_536;

/// Why a credential, or a key, was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Not three base64url parts, or a part is not the expected JSON.
    #[error("malformed peer credential")]
    Malformed,
    /// Signed by a key this verifier does not hold.
    #[error("peer credential signed by an unknown key {kid:?}")]
    UnknownKey {
        /// The `kid` it named.
        kid: String,
    },
    /// The signature does not match.
    #[error("peer credential signature does not verify")]
    BadSignature,
    /// Past its `exp`.
    #[error("peer credential expired")]
    Expired,
    /// No key to verify with: this daemon has not joined a fleet yet.
    #[error("no control-plane key to verify peer credentials with yet")]
    NoKeys,
}

/// Why a key file could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading, creating or writing it failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Its content is not what was expected.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
}

/// What a credential says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Always `nebula`.
    pub iss: String,
    /// The peer id.
    pub sub: String,
    /// The address it registered.
    pub addr: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
}

impl Claims {
    /// Time left before it expires (zero once it has).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.exp.saturating_sub(unix_now()))
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An Ed25519 public key that verifies credentials.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The key from its 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// Its 32 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Its `kid`: the first 8 bytes of its BLAKE3 hash, in hex.
    pub fn kid(&self) -> String {
        hex::encode(&blake3::hash(&self.0).as_bytes()[..8])
    }

    /// Reads a public key file: 64 hex digits, or a signing-key file (whose
    /// public half is taken).
    pub fn read(path: &Path) -> Result<Self, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        if let Ok(bytes) = hex::decode(text.trim())
            && let Some(key) = Self::from_bytes(&bytes)
        {
            return Ok(key);
        }
        SigningKey::parse(path, &text).map(|k| k.public())
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.kid())
    }
}

/// The control plane's key: signs credentials.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.public == other.public
    }
}

impl Eq for SigningKey {}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.public.kid())
            .finish_non_exhaustive()
    }
}

const PEM_LABEL: &str = "NEBULA SIGNING KEY";

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Self {
        let seed: [u8; 32] = rand::random();
        Self::from_seed(&seed)
    }

    fn from_seed(seed: &[u8; 32]) -> Self {
        // A 32-byte seed is always a valid Ed25519 private key.
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("32-byte seed");
        let public = PublicKey::from_bytes(pair.public_key().as_ref()).expect("32-byte key");
        Self { pair, public }
    }

    /// Reads the key at `path`, or makes one there (mode 0600, never
    /// following a symlink) when no file exists. Several processes making
    /// the same file at once end up with the same key: it is written aside
    /// and linked into place, and the losers read the winner's.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyFileError> {
        let io = |source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        };
        match private_file::read(path) {
            Ok(text) => return Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let seed: [u8; 32] = rand::random();
        let text = format!(
            "-----BEGIN {PEM_LABEL}-----\n{}\n-----END {PEM_LABEL}-----\n",
            hex::encode(seed)
        );
        // Replicas starting at once: one creates the key, the others read it.
        if private_file::create(path, &text).map_err(io)? {
            Ok(Self::from_seed(&seed))
        } else {
            let text = private_file::read(path).map_err(io)?;
            Self::parse(path, &text)
        }
    }

    fn parse(path: &Path, text: &str) -> Result<Self, KeyFileError> {
        let invalid = |reason| KeyFileError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let body = text
            .trim()
            .strip_prefix(&format!("-----BEGIN {PEM_LABEL}-----"))
            .and_then(|rest| rest.strip_suffix(&format!("-----END {PEM_LABEL}-----")))
            .ok_or_else(|| invalid("not a Nebula signing key (or a public key's 64 hex digits)"))?;
        let seed: [u8; 32] = hex::decode(body.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| invalid("the key is not 64 hex digits"))?;
        Ok(Self::from_seed(&seed))
    }

    /// Its public half.
    pub fn public(&self) -> PublicKey {
        self.public.clone()
    }

    /// A credential naming `peer_id` at `address`, valid for `ttl`.
    pub fn issue(&self, peer_id: &str, address: &str, ttl: Duration) -> String {
        let now = unix_now();
        let header = Header {
            alg: "EdDSA".into(),
            typ: "JWT".into(),
            kid: self.public.kid(),
        };
        let claims = Claims {
            iss: "nebula".into(),
            sub: peer_id.into(),
            addr: address.into(),
            iat: now,
            exp: now + ttl.as_secs().max(1),
        };
        // Serializing plain structs of strings and numbers cannot fail.
        let header = B64.encode(serde_json::to_vec(&header).expect("json"));
        let claims = B64.encode(serde_json::to_vec(&claims).expect("json"));
        let signed = format!("{header}.{claims}");
        let signature = self.pair.sign(signed.as_bytes());
        format!("{signed}.{}", B64.encode(signature.as_ref()))
    }
}

/// Checks credentials against a set of public keys, remembering the ones it
/// verified. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Verifier {
    keys: Vec<PublicKey>,
    verified: DashMap<[u8; 64], Claims>,
}

impl Verifier {
    /// A verifier trusting `keys`.
    pub fn new(keys: Vec<PublicKey>) -> Self {
        Self {
            keys,
            verified: DashMap::new(),
        }
    }

    /// The keys it trusts.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// The claims of `token`, if a trusted key signed it and it has not expired.
    pub fn verify(&self, token: &str) -> Result<Claims, CredentialError> {
        if self.keys.is_empty() {
            return Err(CredentialError::NoKeys);
        }
        if token.len() > MAX_LEN {
            return Err(CredentialError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CredentialError::Malformed);
        };
        let signature: [u8; 64] = B64
            .decode(signature)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or(CredentialError::Malformed)?;
        let cached = self.verified.get(&signature).map(|c| c.clone());
        let claims = match cached {
            Some(claims) => claims,
            None => {
                let checked = self.check(header, claims, &signature)?;
                if self.verified.len() >= CACHE_ENTRIES {
                    self.verified.clear();
                }
                self.verified.insert(signature, checked.clone());
                checked
            }
        };
        if claims.exp + SKEW.as_secs() <= unix_now() {
            return Err(CredentialError::Expired);
        }
        Ok(claims)
    }

    fn check(
        &self,
        header: &str,
        claims: &str,
        signature: &[u8],
    ) -> Result<Claims, CredentialError> {
        let json = |part: &str| B64.decode(part).map_err(|_| CredentialError::Malformed);
        let head: Header =
            serde_json::from_slice(&json(header)?).map_err(|_| CredentialError::Malformed)?;
        if head.alg != "EdDSA" {
            return Err(CredentialError::Malformed);
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.kid() == head.kid)
            .ok_or_else(|| CredentialError::UnknownKey {
                kid: head.kid.chars().take(32).collect(),
            })?;
        // The signature covers the two encoded parts exactly as sent.
        let signed_len = header.len() + 1 + claims.len();
        let mut signed = String::with_capacity(signed_len);
        signed.push_str(header);
        signed.push('.');
        signed.push_str(claims);
        UnparsedPublicKey::new(&ED25519, key.as_bytes())
            .verify(signed.as_bytes(), signature)
            .map_err(|_| CredentialError::BadSignature)?;
        let claims: Claims =
            serde_json::from_slice(&json(claims)?).map_err(|_| CredentialError::Malformed)?;
        if claims.iss != "nebula" {
            return Err(CredentialError::Malformed);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_credentials_verify_and_name_their_peer() {
        let key = SigningKey::generate();
        let token = key.issue("p1", "127.0.0.1:7", Duration::from_secs(600));
        let verifier = Verifier::new(vec![key.public()]);
        let claims = verifier.verify(&token).unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.addr.as_str()),
            ("p1", "127.0.0.1:7")
        );
        assert!(claims.remaining() > Duration::from_secs(590));
        // Twice: the second answer comes from the cache, the same.
        assert_eq!(verifier.verify(&token).unwrap(), claims);
    }

    #[test]
    fn other_keys_tampering_and_garbage_are_refused() {
        let key = SigningKey::generate();
        let other = SigningKey::generate();
        let token = key.issue("p1", "127.0.0.1:7", Duration::from_secs(600));
        let stranger = Verifier::new(vec![other.public()]);
        assert!(matches!(
            stranger.verify(&token),
            Err(CredentialError::UnknownKey { .. })
        ));
        // During a rotation both keys verify.
        let both = Verifier::new(vec![other.public(), key.public()]);
        assert!(both.verify(&token).is_ok());
        assert_eq!(
            Verifier::default().verify(&token),
            Err(CredentialError::NoKeys)
        );

        // Another peer's claims under this signature.
        let forged_claims = other.issue("p2", "127.0.0.1:7", Duration::from_secs(600));
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = forged_claims.split('.').nth(1).unwrap();
        let verifier = Verifier::new(vec![key.public()]);
        assert_eq!(
            verifier.verify(&parts.join(".")),
            Err(CredentialError::BadSignature)
        );
        for garbage in ["", "a.b", "a.b.c", "a.b.c.d", &"x".repeat(5000)] {
            assert_eq!(verifier.verify(garbage), Err(CredentialError::Malformed));
        }
    }

    #[test]
    fn expired_credentials_are_refused() {
        let key = SigningKey::generate();
        let verifier = Verifier::new(vec![key.public()]);
        // Issued "now" for one second, then judged as if 2 minutes later: rewrite exp by hand.
        let header = B64.encode(
            serde_json::to_vec(&Header {
                alg: "EdDSA".into(),
                typ: "JWT".into(),
                kid: key.public().kid(),
            })
            .unwrap(),
        );
        let now = unix_now();
        let claims = B64.encode(
            serde_json::to_vec(&Claims {
                iss: "nebula".into(),
                sub: "p".into(),
                addr: "a:1".into(),
                iat: now - 300,
                exp: now - 120,
            })
            .unwrap(),
        );
        let signed = format!("{header}.{claims}");
        let sig = B64.encode(key.pair.sign(signed.as_bytes()).as_ref());
        assert_eq!(
            verifier.verify(&format!("{signed}.{sig}")),
            Err(CredentialError::Expired)
        );
    }

    #[test]
    fn key_files_are_made_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let made = SigningKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = SigningKey::load_or_create(&path).unwrap();
        assert_eq!(made.public(), read.public());
        assert_eq!(PublicKey::read(&path).unwrap(), made.public());
        let public = dir.path().join("signing.pub");
        std::fs::write(&public, hex::encode(made.public().as_bytes())).unwrap();
        assert_eq!(PublicKey::read(&public).unwrap(), made.public());
        std::fs::write(&public, "nonsense").unwrap();
        assert!(matches!(
            PublicKey::read(&public),
            Err(KeyFileError::Invalid { .. })
        ));
    }
}
