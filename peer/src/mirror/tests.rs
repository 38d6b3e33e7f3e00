//! Tests of the registry mirror.

use super::*;

#[test]
fn paths_parse() {
    assert_eq!(
        parse_resource("a/b/c/manifests/v1.0"),
        Some(Resource::Manifest {
            name: "a/b/c",
            reference: "v1.0"
        })
    );
    let d = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(
        parse_resource(&format!("library/alpine/blobs/{d}")),
        Some(Resource::Blob {
            name: "library/alpine",
            digest: &d
        })
    );
    assert!(parse_digest(&d).is_some());
    assert!(parse_digest("sha512:00").is_none());
    assert_eq!(parse_resource("a/../b/manifests/x"), None);
    assert_eq!(parse_resource("A/manifests/x"), None);
    assert_eq!(parse_resource("a/tags/list"), None);
    assert_eq!(parse_resource("/manifests/x"), None);
    // A component named like a resource kind is part of the name.
    assert_eq!(
        parse_resource(&format!("x/manifests/y/blobs/{d}")),
        Some(Resource::Blob {
            name: "x/manifests/y",
            digest: &d
        })
    );
}

#[test]
fn upstream_urls_are_checked() {
    assert!(MirrorConfig::parse_upstream("http://127.0.0.1:5000").is_ok());
    assert!(MirrorConfig::parse_upstream("https://r.example/v2").is_err());
    assert!(MirrorConfig::parse_upstream("ftp://r.example").is_err());
    assert!(MirrorConfig::parse_upstream("https://u:p@r.example").is_err());
}

/// Property tests (fuzzing): registry paths, references and
/// digests as clients send them. `PROPTEST_CASES` sets the cases.
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn path_like() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z0-9._/-]{0,20}/(manifests|blobs)/[A-Za-z0-9._:+/-]{0,80}",
            "[a-zA-Z0-9._/-]{0,10}(/manifests/|/blobs/)(|sha256:[0-9a-f]{64})",
        ]
    }

    proptest! {
        #[test]
        fn fuzz_registry_paths_parse_to_valid_parts(rest in path_like()) {
            match parse_resource(&rest) {
                None => {}
                Some(Resource::Manifest { name, reference: last })
                | Some(Resource::Blob { name, digest: last }) => {
                    prop_assert!(!name.is_empty() && !last.is_empty() && !last.contains('/'));
                    prop_assert!(name.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
                    prop_assert!(!name.bytes().any(|b| b.is_ascii_uppercase()));
                    let kind = if matches!(parse_resource(&rest), Some(Resource::Manifest { .. })) {
                        "manifests"
                    } else {
                        "blobs"
                    };
                    // The parts put together again are the same resource.
                    let again = format!("{name}/{kind}/{last}");
                    prop_assert_eq!(parse_resource(&again), parse_resource(&rest));
                }
            }
        }

        #[test]
        fn fuzz_digests_are_lowercase_sha256_only(
            s in prop_oneof![any::<String>(), "(sha256:|SHA256:|sha512:|)[0-9a-fA-F]{62,66}"],
        ) {
            if let Some(d) = parse_digest(&s) {
                prop_assert_eq!(format!("sha256:{d}"), s);
            }
        }

        #[test]
        fn fuzz_upstreams_are_bare_http_origins(
            s in prop_oneof![
                any::<String>(),
                "(http|https|ftp|)://[a-z0-9.:@\\[\\]]{0,20}(|/|/v2/|\\?q=1|#f)",
            ],
        ) {
            if let Ok(url) = MirrorConfig::parse_upstream(&s) {
                prop_assert!(matches!(url.scheme(), "http" | "https"));
                prop_assert!(url.host_str().is_some() && url.path() == "/" && url.username().is_empty());
                prop_assert_eq!(MirrorConfig::parse_upstream(url.as_str()).unwrap(), url);
            }
        }
    }
}
