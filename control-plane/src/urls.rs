//! Origin URLs as keys: what the control plane remembers a URL by.
//!
//! Peers send URLs without userinfo (credentials never reach the control
//! plane; a URL that still has some is refused). The key is the URL with its
//! fragment and the operator's ignored query parameters removed (for signed
//! URLs, whose signature differs per request), the rest kept in order.

use url::Url;

/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 8192;

/// Why a URL cannot be a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not a URL at all.
    #[error("not a valid URL: {0}")]
    Invalid(String),
    /// Not http or https.
    #[error("only http and https URLs can be fetched, not {0}:")]
    Scheme(String),
    /// The URL carries a user name or password.
    #[error("the URL carries credentials; send them as a header to the origin only")]
    Credentials,
    /// Longer than [`MAX_URL_LEN`].
    #[error("the URL is longer than {MAX_URL_LEN} bytes")]
    TooLong,
}

/// The key form of `raw`: fragment and `ignore`d query parameters (compared
/// without regard to case) removed.
pub fn normalize(raw: &str, ignore: &[String]) -> Result<String, UrlError> {
    if raw.len() > MAX_URL_LEN {
        return Err(UrlError::TooLong);
    }
    let mut url = Url::parse(raw).map_err(|e| UrlError::Invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlError::Scheme(url.scheme().to_owned()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::Credentials);
    }
    url.set_fragment(None);
    if url.query().is_some() {
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| !ignore.iter().any(|i| i.eq_ignore_ascii_case(k)))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
    }
    Ok(url.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_parameters_and_fragments_leave_the_key() {
        let ignore = vec!["X-Amz-Signature".to_owned(), "x-amz-date".to_owned()];
        let a = normalize(
            "https://o.example/m.bin?v=2&X-Amz-Signature=abc&X-Amz-Date=1#frag",
            &ignore,
        )
        .unwrap();
        let b = normalize("https://o.example/m.bin?v=2&x-amz-signature=zzz", &ignore).unwrap();
        assert_eq!(a, "https://o.example/m.bin?v=2");
        assert_eq!(a, b);
        assert_eq!(
            normalize("http://o.example/a?X-Amz-Signature=1", &ignore).unwrap(),
            "http://o.example/a"
        );
        // Without the operator's list, every parameter counts.
        assert_ne!(
            normalize("http://o.example/a?s=1", &[]).unwrap(),
            normalize("http://o.example/a?s=2", &[]).unwrap()
        );
    }

    #[test]
    fn credentials_and_other_schemes_are_refused() {
        assert_eq!(
            normalize("https://user:pw@o.example/a", &[]),
            Err(UrlError::Credentials)
        );
        assert!(matches!(
            normalize("ftp://o.example/a", &[]),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            normalize("not a url", &[]),
            Err(UrlError::Invalid(_))
        ));
        let long = format!("http://o.example/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(normalize(&long, &[]), Err(UrlError::TooLong));
    }
}
