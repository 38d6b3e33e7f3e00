//! The upstream registry: which one a request is for, and its token flow.
//!
//! A registry that wants a token answers 401 with
//! `WWW-Authenticate: Bearer realm=…,service=…,scope=…`; the token comes
//! from the realm (anonymously, or with the registry's credentials from a
//! Docker `config.json`) and is kept until it expires. Tokens stay in this
//! process: they are sent only to the registry they were issued for (and to
//! the origin client of this daemon's own downloads), never logged, never in
//! what goes to the control plane or to other peers.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::Engine as _;
use reqwest::{
    Method, Response, StatusCode,
    header::{self, HeaderMap, HeaderValue},
};
use url::Url;

/// Docker Hub's registry: the upstream of `ns=docker.io`.
pub const DOCKER_HUB: &str = "https://registry-1.docker.io";
/// A token whose lifetime the realm does not say lives this long (the
/// distribution spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Tokens are dropped this much before they expire.
const TOKEN_MARGIN: Duration = Duration::from_secs(5);
/// A token is reused at most this long, whatever its realm says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// The largest token answer read.
const MAX_TOKEN_ANSWER: u64 = 64 << 10;
/// Tokens kept at most (one per registry and repository).
const MAX_TOKENS: usize = 1024;

/// Credentials per registry host, from a Docker `config.json`. Never printed.
#[derive(Clone, Default)]
pub struct Credentials(HashMap<String, (String, String)>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({} registries)", self.0.len())
    }
}

impl Credentials {
    /// Reads the `auths` of a Docker `config.json`: each entry's `auth`
    /// (base64 of `user:password`) or `username` and `password`. Credential
    /// helpers (`credsStore`, `credHelpers`) are not run.
    pub fn from_docker_config(json: &[u8]) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            auths: HashMap<String, Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(default)]
            auth: String,
            #[serde(default)]
            username: String,
            #[serde(default)]
            password: String,
        }
        // serde_json's messages name no values, only positions.
        let config: Config =
            serde_json::from_slice(json).map_err(|e| format!("not a Docker config.json: {e}"))?;
        let mut map = HashMap::new();
        for (key, entry) in config.auths {
            let pair = if !entry.auth.is_empty() {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(entry.auth.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| format!("the auth of {key:?} is not base64 of user:password"))?;
                let (user, password) = decoded
                    .split_once(':')
                    .ok_or_else(|| format!("the auth of {key:?} is not base64 of user:password"))?;
                (user.to_owned(), password.to_owned())
            } else if !entry.username.is_empty() {
                (entry.username, entry.password)
            } else {
                continue;
            };
            map.insert(registry_key(&key), pair);
        }
        Ok(Self(map))
    }

    fn get(&self, registry: &str) -> Option<&(String, String)> {
        self.0.get(&registry_key(registry))
    }
}

/// One name per registry: `https://index.docker.io/v1/`, `docker.io` and
/// `registry-1.docker.io` are all Docker Hub; otherwise the `host[:port]`.
fn registry_key(s: &str) -> String {
    let s = s.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

/// A registry's base URL, by containerd's `ns` (the registry host the
/// client asked for) or the configured default.
pub(crate) fn base_for(ns: Option<&str>, default: &Url) -> Result<Url, String> {
    let Some(ns) = ns.map(str::trim).filter(|n| !n.is_empty()) else {
        return Ok(default.clone());
    };
    let ns = ns.to_ascii_lowercase();
    if registry_key(&ns) == "docker.io" {
        return Ok(Url::parse(DOCKER_HUB).expect("a valid constant URL"));
    }
    // The configured upstream keeps its scheme (a plain-http registry).
    if registry_key(default.as_str()) == ns || authority(default) == ns {
        return Ok(default.clone());
    }
    let valid = ns
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !valid {
        return Err(format!("ns {ns:?} is not a registry host"));
    }
    Url::parse(&format!("https://{ns}/"))
        .ok()
        .filter(|u| u.host_str().is_some() && u.path() == "/")
        .ok_or_else(|| format!("ns {ns:?} is not a registry host"))
}

/// `host[:port]` of a URL.
fn authority(url: &Url) -> String {
    match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or("")),
        None => url.host_str().unwrap_or("").to_owned(),
    }
}

/// What a 401 asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Challenge {
    Bearer { realm: String, service: String },
    Basic,
}

/// A token and when it stops being used.
struct Token {
    value: HeaderValue,
    until: Instant,
}

/// Talks to upstream registries, with their tokens.
pub(crate) struct Upstream {
    http: reqwest::Client,
    credentials: Credentials,
    /// By registry base URL: what its 401 asked for (`None`: no auth).
    challenges: Mutex<HashMap<String, Option<Challenge>>>,
    /// By (registry base URL, scope).
    tokens: Mutex<HashMap<(String, String), Token>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is one insert or remove; a panic cannot leave one half-done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Upstream {
    pub(crate) fn new(
        timeout: Duration,
        extra_ca: Option<&[u8]>,
        credentials: Credentials,
    ) -> Result<Self, String> {
        let builder = crate::origin::http::client_builder(timeout, extra_ca)
            .map_err(|e| e.to_string())?
            .redirect(reqwest::redirect::Policy::limited(
                crate::origin::http::MAX_REDIRECTS,
            ));
        let http = builder.build().map_err(|e| e.to_string())?;
        Ok(Self {
            http,
            credentials,
            challenges: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `method url` for repository `name` of registry `base`, with the
    /// `Authorization` the registry wants; a 401 is answered once (a token
    /// fetched, or credentials sent) and the request made again. A realm
    /// that gives no token leaves the registry's 401 as the answer.
    pub(crate) async fn send(
        &self,
        base: &Url,
        name: &str,
        method: Method,
        url: Url,
        headers: HeaderMap,
    ) -> Result<Response, String> {
        let mut auth = self.authorization(base, name, false).await?;
        let mut retried = false;
        loop {
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(a) = auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| crate::origin::http::describe(&e))?;
            if resp.status() != StatusCode::UNAUTHORIZED || retried {
                return Ok(resp);
            }
            let Some(challenge) = challenge_of(resp.headers()) else {
                return Ok(resp);
            };
            retried = true;
            self.forget_token(base, name);
            lock(&self.challenges).insert(base.to_string(), Some(challenge));
            auth = match self.authorization(base, name, false).await {
                Ok(a) => a,
                Err(why) => {
                    tracing::warn!(registry = %authority(base), %why, "the registry's token realm gave no token");
                    return Ok(resp);
                }
            };
        }
    }

    /// The `Authorization` for the registry's repository `name`: a cached
    /// token, or a new one when the registry is known to want one (learned
    /// from a 401, or from `GET /v2/` when `probe` and nothing is known).
    pub(crate) async fn authorization(
        &self,
        base: &Url,
        name: &str,
        probe: bool,
    ) -> Result<Option<HeaderValue>, String> {
        let known = lock(&self.challenges).get(base.as_str()).cloned();
        let challenge = match known {
            Some(c) => c,
            None if probe => {
                let ping = base.join("v2/").map_err(|e| e.to_string())?;
                let resp = self
                    .http
                    .get(ping)
                    .send()
                    .await
                    .map_err(|e| crate::origin::http::describe(&e))?;
                let c = match resp.status() {
                    StatusCode::UNAUTHORIZED => challenge_of(resp.headers()),
                    _ => None,
                };
                lock(&self.challenges).insert(base.to_string(), c.clone());
                c
            }
            None => None,
        };
        let registry = authority(base);
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credentials.get(&registry).map(|(u, p)| basic(u, p))),
            Some(Challenge::Bearer { realm, service }) => {
                let scope = format!("repository:{name}:pull");
                let key = (base.to_string(), scope.clone());
                if let Some(t) = lock(&self.tokens).get(&key)
                    && t.until > Instant::now()
                {
                    return Ok(Some(t.value.clone()));
                }
                let token = self.token(&registry, &realm, &service, &scope).await?;
                let value = token.value.clone();
                let mut tokens = lock(&self.tokens);
                if tokens.len() >= MAX_TOKENS {
                    let now = Instant::now();
                    tokens.retain(|_, t| t.until > now);
                    if tokens.len() >= MAX_TOKENS {
                        tokens.clear();
                    }
                }
                tokens.insert(key, token);
                Ok(Some(value))
            }
        }
    }

    fn forget_token(&self, base: &Url, name: &str) {
        let key = (base.to_string(), format!("repository:{name}:pull"));
        lock(&self.tokens).remove(&key);
    }

    /// Asks the realm for a token for `scope`, with the registry's
    /// credentials when there are some.
    async fn token(
        &self,
        registry: &str,
        realm: &str,
        service: &str,
        scope: &str,
    ) -> Result<Token, String> {
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(default)]
            token: String,
            #[serde(default)]
            access_token: String,
            #[serde(default)]
            expires_in: u64,
        }
        let mut url = Url::parse(realm).map_err(|_| "the registry's token realm is not a URL")?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("the registry's token realm is not http(s)".into());
        }
        url.query_pairs_mut()
            .append_pair("service", service)
            .append_pair("scope", scope);
        let mut req = self.http.get(url);
        if let Some((user, password)) = self.credentials.get(registry) {
            req = req.basic_auth(user, Some(password));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("token realm: {}", crate::origin::http::describe(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("the token realm answered {}", resp.status()));
        }
        // A token answer is small: a realm may not fill memory.
        if resp.content_length().is_some_and(|n| n > MAX_TOKEN_ANSWER) {
            return Err("the token realm's answer is too large".into());
        }
        let mut body = Vec::new();
        let mut resp = resp;
        while let Some(piece) = resp
            .chunk()
            .await
            .map_err(|e| format!("token realm: {}", crate::origin::http::describe(&e)))?
        {
            if (body.len() + piece.len()) as u64 > MAX_TOKEN_ANSWER {
                return Err("the token realm's answer is too large".into());
            }
            body.extend_from_slice(&piece);
        }
        let answer: Answer =
            serde_json::from_slice(&body).map_err(|_| "the token realm's answer is not a token")?;
        let raw = if answer.token.is_empty() {
            answer.access_token
        } else {
            answer.token
        };
        if raw.is_empty() {
            return Err("the token realm's answer holds no token".into());
        }
        let mut value = HeaderValue::try_from(format!("Bearer {raw}"))
            .map_err(|_| "the token realm's token has invalid characters")?;
        value.set_sensitive(true);
        let lifetime = match answer.expires_in {
            0 => DEFAULT_TOKEN_LIFETIME,
            s => Duration::from_secs(s).min(MAX_TOKEN_LIFETIME),
        };
        Ok(Token {
            value,
            until: Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN),
        })
    }
}

fn basic(user: &str, password: &str) -> HeaderValue {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut v = HeaderValue::try_from(format!("Basic {encoded}"))
        // Base64 is always a valid header value.
        .expect("base64 is header-safe");
    v.set_sensitive(true);
    v
}

/// The challenge of a 401's `WWW-Authenticate`, if it is one we answer.
fn challenge_of(headers: &HeaderMap) -> Option<Challenge> {
    let value = headers.get(header::WWW_AUTHENTICATE)?.to_str().ok()?.trim();
    let (scheme, params) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = auth_params(params);
    let realm = params.get("realm")?.clone();
    let service = params.get("service").cloned().unwrap_or_default();
    Some(Challenge::Bearer { realm, service })
}

/// `k="v",k2=v2` (quoted values may hold commas).
fn auth_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, value.to_owned());
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let mut h = HeaderMap::new();
        h.insert(
            header::WWW_AUTHENTICATE,
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#
                .parse()
                .unwrap(),
        );
        assert_eq!(
            challenge_of(&h),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: "registry.docker.io".into()
            })
        );
        h.insert(header::WWW_AUTHENTICATE, "Basic realm=x".parse().unwrap());
        assert_eq!(challenge_of(&h), Some(Challenge::Basic));
    }

    #[test]
    fn ns_picks_the_upstream() {
        let default = Url::parse("http://127.0.0.1:5000/").unwrap();
        assert_eq!(base_for(None, &default).unwrap(), default);
        assert_eq!(base_for(Some("127.0.0.1:5000"), &default).unwrap(), default);
        assert_eq!(
            base_for(Some("docker.io"), &default).unwrap().as_str(),
            "https://registry-1.docker.io/"
        );
        assert_eq!(
            base_for(Some("ghcr.io"), &default).unwrap().as_str(),
            "https://ghcr.io/"
        );
        assert!(base_for(Some("evil.example/path"), &default).is_err());
        assert!(base_for(Some("a@b"), &default).is_err());
    }

    #[test]
    fn docker_config_credentials() {
        let json = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpwQHNz"},"reg.example:5000":{"username":"a","password":"b"}}}"#;
        let c = Credentials::from_docker_config(json).unwrap();
        assert_eq!(
            c.get("registry-1.docker.io"),
            Some(&("u".into(), "p@ss".into()))
        );
        assert_eq!(c.get("reg.example:5000"), Some(&("a".into(), "b".into())));
        assert!(!format!("{c:?}").contains("p@ss"));
        assert!(Credentials::from_docker_config(b"{").is_err());
    }
}

/// Property tests (issue 10, fuzzing): the Docker `config.json` reader, the
/// `ns` of a client and a registry's `WWW-Authenticate`, all from outside.
/// `PROPTEST_CASES` sets the cases.
#[cfg(test)]
mod fuzz {
    use base64::Engine as _;
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn fuzz_docker_configs_read_or_refuse_without_leaking(
            key in "[ -~]{0,30}",
            user in "[ -9;-~]{0,12}",
            secret in "[a-zA-Z0-9]{12}",
            form in 0..5u8,
            junk in any::<Vec<u8>>(),
        ) {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
            let entry = match form {
                0 => serde_json::json!({ "auth": token }),
                1 => serde_json::json!({ "username": user, "password": secret }),
                2 => serde_json::json!({ "auth": format!("{secret}!") }),
                3 => serde_json::json!({ "auth": 7 }),
                _ => serde_json::json!({}),
            };
            let json = serde_json::json!({ "auths": { key.clone(): entry } }).to_string();
            match Credentials::from_docker_config(json.as_bytes()) {
                Ok(c) => {
                    if form < 2 && !(form == 1 && user.is_empty()) {
                        prop_assert_eq!(c.get(&key), Some(&(user.clone(), secret.clone())));
                    }
                }
                Err(e) => {
                    prop_assert!(form >= 2, "{}", e);
                    prop_assert!(!e.contains(&secret), "the secret is in the error: {}", e);
                }
            }
            let _ = Credentials::from_docker_config(&junk);
        }

        #[test]
        fn fuzz_ns_names_a_registry_base_or_is_refused(ns in prop_oneof![any::<String>(), "[a-zA-Z0-9.:\\[\\]/@ -]{0,30}"]) {
            let default = Url::parse("https://registry.example:5000/").unwrap();
            if let Ok(url) = base_for(Some(&ns), &default) {
                prop_assert!(url.host_str().is_some() && url.path() == "/", "{}", url);
                prop_assert!(url.username().is_empty() && url.query().is_none());
            }
        }

        #[test]
        fn fuzz_www_authenticate_challenges(value in prop_oneof![
            "[ -~]{0,60}",
            "(Bearer|Basic|bearer|Digest) (realm|service|scope)=(\"[ -!#-~]{0,20}\"?|[a-z,]{0,10})(|,[a-z]{1,6}=\"[ -~]{0,10}\")",
        ]) {
            let Ok(v) = HeaderValue::from_str(&value) else { return Ok(()) };
            let mut headers = HeaderMap::new();
            headers.insert(header::WWW_AUTHENTICATE, v);
            if let Some(Challenge::Bearer { realm, .. }) = challenge_of(&headers) {
                prop_assert!(value.contains(&realm));
            }
        }
    }
}
