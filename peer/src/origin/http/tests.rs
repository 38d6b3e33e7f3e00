//! Tests of origin downloads' parsing.

use super::*;

#[test]
fn content_ranges_are_parsed_strictly() {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_RANGE, "bytes 0-99/1000".parse().unwrap());
    assert_eq!(content_range(&h), Some((0, 99, 1000)));
    h.insert(header::CONTENT_RANGE, "bytes 5-4/1000".parse().unwrap());
    assert_eq!(content_range(&h), None);
    h.insert(header::CONTENT_RANGE, "bytes 0-1000/1000".parse().unwrap());
    assert_eq!(content_range(&h), None);
    h.insert(header::CONTENT_RANGE, "bytes */0".parse().unwrap());
    assert_eq!(content_range_total(&h), Some(0));
}

#[test]
fn urls_are_shown_without_credentials_or_query_values() {
    let url = Url::parse("https://u:p@o.example:8443/a/b?X-Amz-Signature=s").unwrap();
    assert_eq!(redacted(&url), "https://o.example:8443/a/b?…");
    let url = Url::parse("http://o.example/a").unwrap();
    assert_eq!(redacted(&url), "http://o.example/a");
}
