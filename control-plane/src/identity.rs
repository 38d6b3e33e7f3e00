//! Peer identity: the control plane signs each registered peer a short-lived
//! credential naming its peer id (see [`nebula_common::credential`]); every
//! later call about a peer must carry it and may speak only for that peer.
//!
//! [`PeerAuth`] is the interceptor of the `ControlPlane` service: it checks the
//! join token, verifies a presented credential and leaves the outcome in the
//! request's extensions; [`bound`] is the one check a handler makes. Besides,
//! this module keeps the admission limits that go with identity: registrations
//! per source address ([`Admission`]), and which providers discovery recently
//! gave to whom, so that a report counts only from a peer that was sent to
//! the provider it reports ([`Grants`]).

use std::{
    net::IpAddr,
    sync::{Arc, RwLock, RwLockReadGuard},
    time::Duration,
};

use bytes::Bytes;
use dashmap::{DashMap, DashSet};
use nebula_common::credential::{Claims, CredentialError, METADATA_KEY, SigningKey, Verifier};
use tokio::time::Instant;
use tonic::{Request, Status, service::Interceptor};

use crate::{auth::JoinAuth, config::Config, store::PeerId};

/// Why a call about a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The call carries no credential.
    #[error(
        "no peer credential: register first, then send the credential it returned in `{METADATA_KEY}`"
    )]
    Missing,
    /// The credential does not verify.
    #[error("{0}; register again")]
    Invalid(CredentialError),
    /// The credential names another peer.
    #[error("the credential names peer {caller}, not {claimed}")]
    OtherPeer {
        /// Whom the credential names.
        caller: String,
        /// Whom the call was about.
        claimed: PeerId,
    },
    /// A live peer id registered elsewhere, and the caller is not that peer.
    #[error(
        "peer id {id} is registered at another address; only that peer may move it (with its credential)"
    )]
    Taken {
        /// The peer id.
        id: PeerId,
    },
    /// The advertised address is not the caller's own.
    #[error(
        "address {address} is not the caller's ({caller}); advertise your own address, or run the control plane with --allow-foreign-addresses"
    )]
    Foreign {
        /// What the peer advertised.
        address: String,
        /// The caller's source IP.
        caller: IpAddr,
    },
    /// Too many registrations from one source address.
    #[error("too many registrations from {caller}; retry later")]
    RegisterRate {
        /// The caller's source IP.
        caller: IpAddr,
    },
    /// Too many reports from one peer.
    #[error("peer {reporter} reports too often; retry later")]
    ReportRate {
        /// The reporter.
        reporter: PeerId,
    },
    /// Discovery did not send the reporter to the provider it reports.
    #[error(
        "peer {provider} was not given to {reporter} by this control plane recently; the report does not count"
    )]
    NotGranted {
        /// The reporter.
        reporter: PeerId,
        /// The provider reported.
        provider: PeerId,
    },
}

impl From<IdentityError> for Status {
    fn from(err: IdentityError) -> Self {
        let message = err.to_string();
        match err {
            IdentityError::Missing | IdentityError::Invalid(_) => Status::unauthenticated(message),
            IdentityError::RegisterRate { .. } | IdentityError::ReportRate { .. } => {
                Status::resource_exhausted(message)
            }
            IdentityError::OtherPeer { .. }
            | IdentityError::Taken { .. }
            | IdentityError::Foreign { .. }
            | IdentityError::NotGranted { .. } => Status::permission_denied(message),
        }
    }
}

/// Signs credentials and checks those presented.
#[derive(Debug)]
pub struct Identity {
    key: Arc<SigningKey>,
    verifier: Verifier,
    ttl: Duration,
}

impl Identity {
    /// The identity of `config`: its signing key (or, without one, a key made
    /// now, so credentials lapse when this process ends), and the extra keys
    /// still accepted.
    pub fn new(config: &Config) -> Self {
        let key = match &config.signing_key {
            Some(key) => Arc::clone(key),
            None => {
                tracing::info!(
                    "peer credentials signed with a key made at start (--signing-key keeps one across restarts and replicas)"
                );
                Arc::new(SigningKey::generate())
            }
        };
        let mut keys = vec![key.public()];
        keys.extend(
            config
                .verify_keys
                .iter()
                .filter(|k| **k != key.public())
                .cloned(),
        );
        Self {
            verifier: Verifier::new(keys),
            key,
            ttl: config.credential_ttl,
        }
    }

    /// A fresh credential for `peer` at `address`.
    pub fn issue(&self, peer: &PeerId, address: &str) -> String {
        self.key.issue(peer.as_str(), address, self.ttl)
    }

    /// A renewed credential when `held` is past half its life.
    pub fn renewal(&self, held: &Claims) -> Option<String> {
        (held.remaining() < self.ttl / 2).then(|| self.key.issue(&held.sub, &held.addr, self.ttl))
    }

    /// The public keys, current first, as sent to peers.
    pub fn wire_keys(&self) -> Vec<Bytes> {
        self.verifier
            .keys()
            .iter()
            .map(|k| Bytes::copy_from_slice(k.as_bytes()))
            .collect()
    }
}

/// What [`PeerAuth`] found in a call's metadata.
#[derive(Debug, Clone)]
pub struct Presented(Result<Claims, CredentialError>);

/// The verified credential of a call, if it carried one.
pub fn caller<T>(req: &Request<T>) -> Option<&Claims> {
    req.extensions()
        .get::<Presented>()
        .and_then(|p| p.0.as_ref().ok())
}

/// Checks that a call carries a valid credential naming `peer`.
pub fn bound<T>(req: &Request<T>, peer: &PeerId) -> Result<Claims, IdentityError> {
    let claims = match req.extensions().get::<Presented>() {
        None => return Err(IdentityError::Missing),
        Some(Presented(Err(err))) => return Err(IdentityError::Invalid(err.clone())),
        Some(Presented(Ok(claims))) => claims,
    };
    if claims.sub != peer.as_str() {
        return Err(IdentityError::OtherPeer {
            caller: claims.sub.chars().take(128).collect(),
            claimed: peer.clone(),
        });
    }
    Ok(claims.clone())
}

/// Guards `ControlPlane`: the join token (when set) on every call, and the
/// credential, when one is presented, verified into the request's extensions.
#[derive(Debug, Clone)]
pub struct PeerAuth {
    join: JoinAuth,
    identity: Arc<Identity>,
}

impl PeerAuth {
    /// Checks `join`, and credentials against `identity`'s keys.
    pub fn new(join: JoinAuth, identity: Arc<Identity>) -> Self {
        Self { join, identity }
    }
}

impl Interceptor for PeerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        self.join.check(&req).map_err(|err| {
            tracing::debug!(caller = ?req.remote_addr(), error = %err, "control-plane call refused");
            Status::from(err)
        })?;
        if let Some(value) = req.metadata().get(METADATA_KEY) {
            let presented = value
                .to_str()
                .map_err(|_| CredentialError::Malformed)
                .and_then(|token| self.identity.verifier.verify(token));
            if let Err(err) = &presented {
                tracing::debug!(caller = ?req.remote_addr(), error = %err, "peer credential refused");
            }
            req.extensions_mut().insert(Presented(presented));
        }
        Ok(req)
    }
}

/// A token bucket per key, refilled at `rate` per second up to `burst`.
#[derive(Debug)]
struct Buckets<K: std::hash::Hash + Eq> {
    rate: f64,
    burst: f64,
    buckets: DashMap<K, (f64, Instant)>,
}

/// Keys remembered at most; past that, full buckets are forgotten.
const MAX_BUCKETS: usize = 100_000;

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            buckets: DashMap::new(),
        }
    }

    /// Takes one token for `key`; false when its bucket is empty.
    fn take(&self, key: &K) -> bool {
        let now = Instant::now();
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(key) {
            let (rate, burst) = (self.rate, self.burst);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let mut bucket = self.buckets.entry(key.clone()).or_insert((self.burst, now));
        let (tokens, at) = &mut *bucket;
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Who may register from where, how often.
#[derive(Debug)]
pub struct Admission {
    allow_foreign: bool,
    registrations: Buckets<IpAddr>,
    reports: Buckets<PeerId>,
}

impl Admission {
    /// The rules of `config`.
    pub fn new(config: &Config) -> Self {
        let per_second = |per_minute: u32| f64::from(per_minute) / 60.0;
        Self {
            allow_foreign: config.allow_foreign_addresses,
            registrations: Buckets::new(
                per_second(config.registrations_per_minute),
                f64::from(config.registrations_per_minute),
            ),
            reports: Buckets::new(
                per_second(config.reports_per_minute),
                f64::from(config.reports_per_minute),
            ),
        }
    }

    /// Admits one registration of `address` from `caller` (unknown for an
    /// in-process call, which is not limited).
    pub fn register(&self, caller: Option<IpAddr>, address: &str) -> Result<(), IdentityError> {
        let Some(caller) = caller.map(|ip| ip.to_canonical()) else {
            return Ok(());
        };
        if !self.allow_foreign {
            let host = address
                .rsplit_once(':')
                .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'));
            let ip = host.and_then(|h| h.parse::<IpAddr>().ok());
            if ip.map(|ip| ip.to_canonical()) != Some(caller) {
                return Err(IdentityError::Foreign {
                    address: address.chars().take(80).collect(),
                    caller,
                });
            }
        }
        if !self.registrations.take(&caller) {
            return Err(IdentityError::RegisterRate { caller });
        }
        Ok(())
    }

    /// Admits one report from `reporter`.
    pub fn report(&self, reporter: &PeerId) -> Result<(), IdentityError> {
        if self.reports.take(reporter) {
            Ok(())
        } else {
            Err(IdentityError::ReportRate {
                reporter: reporter.clone(),
            })
        }
    }
}

/// Which providers discovery gave to which asker, for `ttl` at least and
/// twice that at most (two generations: the current one, and the one before).
/// Calls share a read lock; only the turn of a generation takes it alone.
#[derive(Debug)]
pub struct Grants {
    ttl: Duration,
    inner: RwLock<Generations>,
}

#[derive(Debug)]
struct Generations {
    started: Instant,
    current: DashSet<(PeerId, PeerId)>,
    previous: DashSet<(PeerId, PeerId)>,
}

impl Generations {
    fn due(&self, ttl: Duration, now: Instant) -> bool {
        now.duration_since(self.started) >= ttl || self.current.len() >= MAX_GRANTS
    }
}

/// Pairs one generation holds at most; a full one starts the next early.
const MAX_GRANTS: usize = 1 << 20;

impl Grants {
    /// Grants remembered for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: RwLock::new(Generations {
                started: Instant::now(),
                current: DashSet::new(),
                previous: DashSet::new(),
            }),
        }
    }

    fn generations(&self) -> RwLockReadGuard<'_, Generations> {
        // Whole sets only are swapped under the lock: a poisoned one is usable.
        let now = Instant::now();
        let read = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if !read.due(self.ttl, now) {
            return read;
        }
        drop(read);
        {
            let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
            if g.due(self.ttl, now) {
                let elapsed = now.duration_since(g.started);
                g.previous = std::mem::take(&mut g.current);
                if elapsed >= self.ttl * 2 {
                    g.previous.clear();
                }
                g.started = now;
            }
        }
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `asker` was given `providers`.
    pub fn give<'a>(&self, asker: &PeerId, providers: impl IntoIterator<Item = &'a PeerId>) {
        let g = self.generations();
        for p in providers {
            g.current.insert((asker.clone(), p.clone()));
        }
    }

    /// Whether `asker` was recently given `provider`.
    pub fn given(&self, asker: &PeerId, provider: &PeerId) -> bool {
        let g = self.generations();
        let key = (asker.clone(), provider.clone());
        g.current.contains(&key) || g.previous.contains(&key)
    }
}

/// `msg` as `peer` sends it, with a credential `identity` issued, through
/// the interceptor (for tests that call the services directly).
#[cfg(test)]
pub(crate) fn signed<T>(identity: &Arc<Identity>, peer: &str, msg: T) -> Request<T> {
    let token = identity.issue(&peer.parse().expect("peer id"), "127.0.0.1:1");
    let mut req = Request::new(());
    req.metadata_mut()
        .insert(METADATA_KEY, token.parse().expect("ASCII"));
    let mut auth = PeerAuth::new(JoinAuth::new(None), Arc::clone(identity));
    let (meta, ext, ()) = auth.call(req).expect("admitted").into_parts();
    Request::from_parts(meta, ext, msg)
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn peer(s: &str) -> PeerId {
        s.parse().unwrap()
    }

    fn config() -> Config {
        Config {
            registrations_per_minute: 3,
            reports_per_minute: 2,
            ..Config::default()
        }
    }

    #[test]
    fn calls_are_bound_to_the_credential_they_carry() {
        let identity = Arc::new(Identity::new(&config()));
        let auth = PeerAuth::new(JoinAuth::new(None), Arc::clone(&identity));
        let token = identity.issue(&peer("p1"), "127.0.0.1:1");
        let call = |credential: Option<&str>| {
            let mut req = Request::new(());
            if let Some(c) = credential {
                req.metadata_mut().insert(METADATA_KEY, c.parse().unwrap());
            }
            auth.clone().call(req).unwrap()
        };
        assert_eq!(bound(&call(Some(&token)), &peer("p1")).unwrap().sub, "p1");
        assert!(matches!(
            bound(&call(Some(&token)), &peer("p2")),
            Err(IdentityError::OtherPeer { .. })
        ));
        assert_eq!(bound(&call(None), &peer("p1")), Err(IdentityError::Missing));
        let forged = SigningKey::generate().issue("p1", "127.0.0.1:1", Duration::from_secs(60));
        assert!(matches!(
            bound(&call(Some(&forged)), &peer("p1")),
            Err(IdentityError::Invalid(CredentialError::UnknownKey { .. }))
        ));
        let status = Status::from(bound(&call(Some("x.y.z")), &peer("p1")).unwrap_err());
        assert_eq!(status.code(), Code::Unauthenticated);
        // The join token is still checked first.
        let mut closed = PeerAuth::new(JoinAuth::new(Some("t")), identity);
        let mut req = Request::new(());
        req.metadata_mut()
            .insert(METADATA_KEY, token.parse().unwrap());
        assert_eq!(closed.call(req).unwrap_err().code(), Code::Unauthenticated);
    }

    #[test]
    fn credentials_are_renewed_past_half_their_life() {
        let identity = Identity::new(&config());
        let fresh = identity
            .verifier
            .verify(&identity.issue(&peer("p"), "a:1"))
            .unwrap();
        assert_eq!(identity.renewal(&fresh), None);
        let old = Claims {
            exp: fresh.exp - config().credential_ttl.as_secs() / 2 - 5,
            ..fresh
        };
        let renewed = identity.renewal(&old).unwrap();
        assert_eq!(identity.verifier.verify(&renewed).unwrap().sub, "p");
    }

    #[tokio::test(start_paused = true)]
    async fn registrations_must_come_from_their_address_and_are_rate_limited() {
        let admission = Admission::new(&config());
        let me: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(matches!(
            admission.register(Some(me), "127.0.0.2:7"),
            Err(IdentityError::Foreign { .. })
        ));
        assert!(matches!(
            admission.register(Some(me), "localhost:7"),
            Err(IdentityError::Foreign { .. })
        ));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        for _ in 0..3 {
            admission.register(Some(mapped), "127.0.0.1:7").unwrap();
        }
        assert_eq!(
            admission.register(Some(me), "127.0.0.1:7"),
            Err(IdentityError::RegisterRate { caller: me })
        );
        // Another source has its own budget; in-process calls are not limited.
        let other: IpAddr = "127.0.0.9".parse().unwrap();
        admission.register(Some(other), "127.0.0.9:7").unwrap();
        admission.register(None, "10.1.1.1:7").unwrap();
        // 20 s later one more (3 a minute).
        tokio::time::advance(Duration::from_secs(20)).await;
        admission.register(Some(me), "127.0.0.1:7").unwrap();
        assert!(admission.register(Some(me), "127.0.0.1:7").is_err());

        let open = Admission::new(&Config {
            allow_foreign_addresses: true,
            ..config()
        });
        open.register(Some(me), "10.0.0.1:7").unwrap();
        open.register(Some(me), "peer.example:7").unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn grants_last_one_to_two_ttls() {
        let grants = Grants::new(Duration::from_secs(60));
        grants.give(&peer("a"), [&peer("x"), &peer("y")]);
        assert!(grants.given(&peer("a"), &peer("x")));
        assert!(!grants.given(&peer("b"), &peer("x")));
        assert!(!grants.given(&peer("x"), &peer("a")));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(grants.given(&peer("a"), &peer("y")));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!grants.given(&peer("a"), &peer("y")));
    }

    #[tokio::test(start_paused = true)]
    async fn reports_are_rate_limited_per_reporter() {
        let admission = Admission::new(&config());
        admission.report(&peer("r")).unwrap();
        admission.report(&peer("r")).unwrap();
        assert!(matches!(
            admission.report(&peer("r")),
            Err(IdentityError::ReportRate { .. })
        ));
        admission.report(&peer("s")).unwrap();
    }
}
