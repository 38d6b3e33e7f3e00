//! [`UrlFetch`]: a fetch by URL as the CLI asked for it, parsed, its
//! credentials kept out of every message and of the record's key.

use nebula_common::BlobRef;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use url::Url;

use super::{Target, http};

/// A fetch by URL, as the CLI asked for it.
#[derive(Clone)]
pub struct UrlFetch {
    /// The origin URL (http or https), userinfo included if the user gave it.
    pub url: Url,
    /// Headers for the origin only.
    pub headers: HeaderMap,
    /// The content the user expects, if they said.
    pub digest: Option<BlobRef>,
}

// Headers and userinfo are credentials: never printed.
impl std::fmt::Debug for UrlFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlFetch")
            .field("url", &http::redacted(&self.url))
            .field("headers", &self.headers.len())
            .field("digest", &self.digest)
            .finish()
    }
}

/// Why a fetch request by URL is malformed.
#[derive(Debug, thiserror::Error)]
pub enum UrlFetchError {
    /// The URL does not parse or is not http(s).
    #[error("{0}")]
    Url(String),
    /// A header is not `Name: value`.
    #[error("header {0:?} is not `Name: value`")]
    Header(String),
    /// The digest is not `sha256:<hex>` or `blake3:<hex>`.
    #[error("--digest: {0}")]
    Digest(String),
}

impl UrlFetch {
    /// Parses the CLI's URL, `Name: value` headers and optional digest.
    pub fn parse(url: &str, headers: &[String], digest: &str) -> Result<Self, UrlFetchError> {
        let url =
            // The URL itself is not repeated: it may carry credentials.
            Url::parse(url.trim()).map_err(|e| UrlFetchError::Url(format!("not a valid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(UrlFetchError::Url(
                "only http:// and https:// URLs with a host can be fetched".into(),
            ));
        }
        let mut map = HeaderMap::new();
        for h in headers {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| UrlFetchError::Header(shown_header(h)))?;
            let name: HeaderName = name
                .trim()
                .parse()
                .map_err(|_| UrlFetchError::Header(shown_header(h)))?;
            let mut value: HeaderValue = value
                .trim()
                .parse()
                .map_err(|_| UrlFetchError::Header(shown_header(h)))?;
            value.set_sensitive(true);
            map.append(name, value);
        }
        let digest = match digest.trim() {
            "" => None,
            d if d.starts_with("sha256:") || d.starts_with("blake3:") => Some(
                d.parse::<BlobRef>()
                    .map_err(|e| UrlFetchError::Digest(e.to_string()))?,
            ),
            _ => {
                return Err(UrlFetchError::Digest(
                    "give sha256:<64 hex digits> or blake3:<64 hex digits>".into(),
                ));
            }
        };
        Ok(Self {
            url,
            headers: map,
            digest,
        })
    }

    /// The URL the control plane knows it by: no userinfo, no fragment.
    pub fn key(&self) -> String {
        let mut url = self.url.clone();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_fragment(None);
        url.into()
    }

    pub(super) fn target(&self) -> Target {
        let basic = (!self.url.username().is_empty() || self.url.password().is_some())
            .then(|| (decode(self.url.username()), self.url.password().map(decode)));
        let mut url = self.url.clone();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_fragment(None);
        Target {
            url,
            headers: self.headers.clone(),
            basic,
        }
    }
}

/// A header for an error message: its name only (its value may be a secret).
fn shown_header(h: &str) -> String {
    match h.split_once(':') {
        Some((name, _)) => format!("{}: …", name.trim()),
        None => "…".into(),
    }
}

/// Userinfo as the user meant it (`%40` is `@`; `+` stays `+`).
fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}
