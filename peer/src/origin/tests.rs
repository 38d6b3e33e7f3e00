//! Tests of fetches by URL.

use super::*;

#[test]
fn requests_parse_and_keep_credentials_out_of_the_key() {
    let r = UrlFetch::parse(
        "https://user:p%40ss@o.example/a?x=1#frag",
        &["Authorization: Bearer s3cret".into()],
        "sha256:".to_owned().as_str(),
    );
    assert!(matches!(r, Err(UrlFetchError::Digest(_))));
    let r = UrlFetch::parse(
        "https://user:p%40ss@o.example/a?x=1#frag",
        &["Authorization: Bearer s3cret".into()],
        "",
    )
    .unwrap();
    assert_eq!(r.key(), "https://o.example/a?x=1");
    let t = r.target();
    assert_eq!(t.basic, Some(("user".into(), Some("p@ss".into()))));
    assert_eq!(t.url.as_str(), "https://o.example/a?x=1");
    assert!(!format!("{r:?}").contains("s3cret"));
    assert!(!format!("{r:?}").contains("p%40ss"));
    let bad = UrlFetch::parse("https://o.example/a", &["Bearer s3cret".into()], "");
    let msg = bad.unwrap_err().to_string();
    assert!(!msg.contains("s3cret"), "{msg}");
    assert!(UrlFetch::parse("ftp://o.example/a", &[], "").is_err());
}

/// Property tests (fuzzing): what `nebula fetch URL` is given.
/// `PROPTEST_CASES` sets the cases.
mod fuzz {
    use proptest::prelude::*;
    use url::Url;

    use super::*;

    proptest! {
        #[test]
        fn fuzz_url_fetches_parse_or_refuse_without_echoing_secrets(
            url in prop_oneof![
                any::<String>(),
                "(http|https|ftp|file|)://(|u:p@|us%40er:pa%3Ass@)[a-z0-9.:\\[\\]]{0,20}(|/[a-z/]{0,10})(|\\?a=b)(|#frag)",
            ],
            header in prop_oneof!["[ -~]{0,30}", "[A-Za-z-]{1,10}: ?[ -~]{0,20}"],
            digest in prop_oneof!["[ -~]{0,10}", "(sha256|blake3|md5):[0-9a-f]{62,65}"],
        ) {
            match UrlFetch::parse(&url, std::slice::from_ref(&header), &digest) {
                Ok(fetch) => {
                    let key = fetch.key();
                    let parsed = Url::parse(&key).unwrap();
                    prop_assert!(parsed.username().is_empty() && parsed.password().is_none());
                    prop_assert!(parsed.fragment().is_none());
                    prop_assert!(matches!(parsed.scheme(), "http" | "https"));
                    let shown = format!("{fetch:?}");
                    prop_assert!(!shown.contains("pa%3Ass"), "{}", shown);
                }
                Err(e) => {
                    let msg = e.to_string();
                    // A header's value may be a token: only its name is shown.
                    if let Some((_, value)) = header.split_once(':')
                        && value.trim().len() > 3
                    {
                        prop_assert!(!msg.contains(value.trim()), "{}", msg);
                    }
                    prop_assert!(!msg.contains('\n'));
                }
            }
        }
    }
}
