//! Fuzzing the control plane's parsers: peer ids, origin URLs as
//! keys, and `--state` Redis URLs. No panic; what is accepted prints back
//! or normalizes to itself; refusals are one line and echo no password.
//! `PROPTEST_CASES` sets the cases per property.

use nebula_control::{PeerId, RedisConfig, urls};
use proptest::prelude::*;

proptest! {
    #[test]
    fn fuzz_peer_ids_round_trip_or_are_refused_in_one_line(
        s in prop_oneof![any::<String>(), "[a-zA-Z0-9._:-]{0,140}", "[a-z]{1,5}[ \n\t/é][a-z]{0,5}"],
    ) {
        match s.parse::<PeerId>() {
            Ok(id) => prop_assert_eq!(id.to_string(), s),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(!msg.is_empty() && !msg.contains('\n'), "{:?}", msg);
            }
        }
    }

    #[test]
    fn fuzz_url_keys_are_normal_and_carry_no_credentials(
        raw in prop_oneof![
            any::<String>(),
            "(http|https|ftp|HTTP)://(|u:p@|:p@)[a-z0-9.\\[\\]:]{0,20}(|/[a-zA-Z%0-9/.]{0,20})(|\\?[a-zA-Z_=&%]{0,30})(|#[a-z]{0,5})",
        ],
        ignore in prop::collection::vec("[a-zA-Z_-]{1,8}", 0..3),
    ) {
        match urls::normalize(&raw, &ignore) {
            Ok(key) => {
                let url = url::Url::parse(&key).unwrap();
                prop_assert!(matches!(url.scheme(), "http" | "https"));
                prop_assert!(url.username().is_empty() && url.password().is_none());
                prop_assert!(url.fragment().is_none());
                // A key is its own key.
                prop_assert_eq!(urls::normalize(&key, &ignore).unwrap(), key.clone());
            }
            Err(e) => prop_assert!(!e.to_string().contains('\n')),
        }
    }

    #[test]
    fn fuzz_state_urls_parse_or_refuse_without_the_password(
        url in prop_oneof![
            any::<String>(),
            "(redis|rediss|redis\\+sentinel|rediss\\+sentinel|http|)://(|u:|:)[a-z0-9.:,\\[\\]]{0,30}(|/[a-z0-9/]{0,12})",
        ],
        with_password in any::<bool>(),
    ) {
        let url = if with_password {
            url.replacen("://", "://user:Pa55w0rdXYZ@", 1)
        } else {
            url
        };
        if let Err(e) = RedisConfig::new(&url) {
            let msg = e.to_string();
            prop_assert!(!msg.contains("Pa55w0rdXYZ"), "{}", msg);
            prop_assert!(!msg.contains('\n'), "{:?}", msg);
        }
    }
}
