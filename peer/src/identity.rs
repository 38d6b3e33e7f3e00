//! This peer's identity in the fleet: the credential the control plane
//! signed for it (sent on every control-plane call and every exchange stream
//! it opens), and the control plane's public keys, which check the
//! credentials of the peers that dial it ([`ExchangeAuth`]).
//!
//! The credential is kept in the store (`credential`, mode 0600), so a daemon
//! restarted on another port within its lease can still move its peer id there.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use bytes::Bytes;
use nebula_common::{
    credential::{Claims, CredentialError, METADATA_KEY, PublicKey, Verifier},
    private_file,
};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
};

/// The credential and the keys, replaced whole as the control plane renews them.
#[derive(Debug, Default)]
pub(crate) struct Identity {
    credential: RwLock<Option<MetadataValue<Ascii>>>,
    /// Woken when a credential arrives.
    issued: tokio::sync::Notify,
    verifier: RwLock<Arc<Verifier>>,
    /// Where the credential is kept; `None`: memory only.
    file: Option<PathBuf>,
}

impl Identity {
    /// An identity kept at `file`, starting from the credential saved there.
    pub(crate) fn new(file: Option<PathBuf>) -> Self {
        let saved = file
            .as_deref()
            .and_then(|f| private_file::read(f).ok())
            .and_then(|t| t.trim().parse().ok());
        Self {
            credential: RwLock::new(saved),
            issued: tokio::sync::Notify::new(),
            verifier: RwLock::default(),
            file,
        }
    }

    /// The credential, waiting up to `max` for the first one (a peer that
    /// has just started dials others only once it can show one).
    pub(crate) async fn credential_within(
        &self,
        max: std::time::Duration,
    ) -> Option<MetadataValue<Ascii>> {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            // Armed before the check, so an update in between is not missed.
            let issued = self.issued.notified();
            if let Some(credential) = self.credential() {
                return Some(credential);
            }
            if tokio::time::timeout_at(deadline, issued).await.is_err() {
                return self.credential();
            }
        }
    }

    /// The credential to present, once the control plane issued one.
    pub(crate) fn credential(&self) -> Option<MetadataValue<Ascii>> {
        // Whole values only are stored under the lock: a poisoned one is usable.
        self.credential
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes what a Register or Heartbeat answer carried: a credential (when
    /// not empty) and the keys (when any).
    pub(crate) fn update(&self, credential: &str, keys: &[Bytes]) {
        if !credential.is_empty() {
            match credential.parse::<MetadataValue<Ascii>>() {
                Ok(value) => {
                    *self.credential.write().unwrap_or_else(|e| e.into_inner()) = Some(value);
                    self.issued.notify_waiters();
                    self.save(credential);
                }
                Err(_) => tracing::warn!("the control plane sent an unusable credential"),
            }
        }
        let keys: Vec<PublicKey> = keys
            .iter()
            .filter_map(|k| PublicKey::from_bytes(k))
            .collect();
        if keys.is_empty() {
            return;
        }
        let mut verifier = self.verifier.write().unwrap_or_else(|e| e.into_inner());
        if verifier.keys() != keys.as_slice() {
            *verifier = Arc::new(Verifier::new(keys));
        }
    }

    /// Forgets the credential (the control plane refused it).
    pub(crate) fn forget(&self) {
        *self.credential.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn save(&self, credential: &str) {
        let Some(file) = &self.file else {
            return;
        };
        if let Err(e) = private_file::replace(file, credential) {
            tracing::debug!(error = %e, "cannot keep the credential in the store");
        }
    }

    /// The claims of a credential another peer presented.
    pub(crate) fn verify(&self, token: &str) -> Result<Claims, CredentialError> {
        let verifier = Arc::clone(&self.verifier.read().unwrap_or_else(|e| e.into_inner()));
        verifier.verify(token)
    }
}

/// Adds this peer's credential to an outgoing call.
pub(crate) fn present<T>(identity: &Identity, req: &mut Request<T>) {
    if let Some(credential) = identity.credential() {
        req.metadata_mut().insert(METADATA_KEY, credential);
    }
}

/// Guards `PeerExchange`: a stream opens only with a credential the control
/// plane's keys verify; its claims go into the request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct ExchangeAuth(pub(crate) Arc<Identity>);

impl Interceptor for ExchangeAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let token = req
            .metadata()
            .get(METADATA_KEY)
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "no peer credential: only fleet members are served (send `{METADATA_KEY}`)"
                ))
            })?
            .to_str()
            .map_err(|_| Status::unauthenticated("malformed peer credential"))?;
        let claims = self.0.verify(token).map_err(|err| {
            tracing::debug!(caller = ?req.remote_addr(), error = %err, "exchange stream refused");
            Status::unauthenticated(err.to_string())
        })?;
        req.extensions_mut().insert(claims);
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nebula_common::credential::SigningKey;
    use tonic::Code;

    use super::*;

    fn keys(key: &SigningKey) -> Vec<Bytes> {
        vec![Bytes::copy_from_slice(key.public().as_bytes())]
    }

    #[test]
    fn streams_open_only_with_a_credential_of_the_fleet() {
        let fleet = SigningKey::generate();
        let identity = Arc::new(Identity::default());
        let mut auth = ExchangeAuth(Arc::clone(&identity));
        let token = fleet.issue("p1", "127.0.0.1:1", Duration::from_secs(60));
        let call = |auth: &mut ExchangeAuth, credential: Option<&str>| {
            let mut req = Request::new(());
            if let Some(c) = credential {
                req.metadata_mut().insert(METADATA_KEY, c.parse().unwrap());
            }
            auth.call(req)
        };
        // No keys yet (not registered): nobody is served.
        assert_eq!(
            call(&mut auth, Some(&token)).unwrap_err().code(),
            Code::Unauthenticated
        );
        identity.update("", &keys(&fleet));
        let req = call(&mut auth, Some(&token)).unwrap();
        assert_eq!(req.extensions().get::<Claims>().unwrap().sub, "p1");
        assert_eq!(
            call(&mut auth, None).unwrap_err().code(),
            Code::Unauthenticated
        );
        let stranger = SigningKey::generate().issue("p1", "127.0.0.1:1", Duration::from_secs(60));
        assert_eq!(
            call(&mut auth, Some(&stranger)).unwrap_err().code(),
            Code::Unauthenticated
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dial_waits_for_the_first_credential_within_a_bound() {
        let identity = Arc::new(Identity::default());
        assert!(
            identity
                .credential_within(Duration::from_secs(1))
                .await
                .is_none()
        );
        let fleet = SigningKey::generate();
        let token = fleet.issue("p1", "127.0.0.1:1", Duration::from_secs(60));
        let waiting = tokio::spawn({
            let identity = Arc::clone(&identity);
            async move { identity.credential_within(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        identity.update(&token, &keys(&fleet));
        let got = waiting.await.unwrap().unwrap();
        assert_eq!(got, token.as_str());
    }

    #[test]
    fn the_credential_is_kept_in_the_store_and_presented() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credential");
        let fleet = SigningKey::generate();
        let token = fleet.issue("p1", "127.0.0.1:1", Duration::from_secs(60));
        Identity::new(Some(file.clone())).update(&token, &keys(&fleet));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let restarted = Identity::new(Some(file));
        let mut req = Request::new(());
        present(&restarted, &mut req);
        assert_eq!(req.metadata().get(METADATA_KEY).unwrap(), token.as_str());
        restarted.forget();
        let mut req = Request::new(());
        present(&restarted, &mut req);
        assert!(req.metadata().get(METADATA_KEY).is_none());
    }
}
