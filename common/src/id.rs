//! [`BlobId`]: the BLAKE3 hash that names a blob, and [`BlobRef`], the forms a
//! user may type (a BLAKE3 id or an OCI-style `sha256:` digest).

use std::{fmt, str::FromStr};

/// The id of a blob: the BLAKE3-256 hash of its bytes.
///
/// Displayed as 64 lowercase hex digits, exactly what `b3sum` prints.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId([u8; 32]);

/// Why a string is not a blob id or digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseIdError {
    /// Not 64 characters long.
    #[error("malformed id {input:?}: expected 64 hex digits, got {len} characters")]
    Length {
        /// What was given (shortened when long).
        input: String,
        /// Its length in characters.
        len: usize,
    },
    /// A character outside `0-9a-fA-F`.
    #[error("malformed id {input:?}: {ch:?} is not a hex digit")]
    NotHex {
        /// What was given (shortened when long).
        input: String,
        /// The first offending character.
        ch: char,
    },
    /// A prefix other than `blake3:` or `sha256:`.
    #[error("malformed id {input:?}: unknown prefix {prefix:?} (use blake3: or sha256:)")]
    Prefix {
        /// What was given (shortened when long).
        input: String,
        /// The prefix before the colon.
        prefix: String,
    },
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 80 {
        let head: String = s.chars().take(77).collect();
        format!("{head}...")
    } else {
        s.to_owned()
    }
}

fn parse_hex32(hex_str: &str, whole: &str) -> Result<[u8; 32], ParseIdError> {
    if let Some(ch) = hex_str.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(ParseIdError::NotHex {
            input: shorten(whole),
            ch,
        });
    }
    if hex_str.len() != 64 {
        return Err(ParseIdError::Length {
            input: shorten(whole),
            len: hex_str.chars().count(),
        });
    }
    let mut out = [0u8; 32];
    // Cannot fail: 64 ASCII hex digits were checked above.
    hex::decode_to_slice(hex_str, &mut out).expect("checked hex");
    Ok(out)
}

impl BlobId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// Wraps raw hash bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw hash bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The id as a `blake3::Hash` (constant-time equality).
    pub fn to_hash(self) -> blake3::Hash {
        blake3::Hash::from_bytes(self.0)
    }

    /// The first 10 hex digits, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..5])
    }
}

impl From<blake3::Hash> for BlobId {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        // Cannot fail: the buffer is exactly twice the input length.
        hex::encode_to_slice(self.0, &mut buf).expect("64-byte buffer");
        // Cannot fail: hex output is ASCII.
        f.write_str(std::str::from_utf8(&buf).expect("hex is ascii"))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", self.short())
    }
}

impl FromStr for BlobId {
    type Err = ParseIdError;

    /// Accepts 64 hex digits in either case, optionally prefixed `blake3:`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<BlobRef>()? {
            BlobRef::Blake3(id) => Ok(id),
            BlobRef::Sha256(_) => Err(ParseIdError::Prefix {
                input: shorten(s),
                prefix: "sha256".into(),
            }),
        }
    }
}

impl serde::Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A SHA-256 digest, the alias OCI registries use (`sha256:<hex>`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; 32]);

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(&self.0[..5]))
    }
}

impl FromStr for Sha256Digest {
    type Err = ParseIdError;

    /// 64 hex digits, without prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s, s).map(Self)
    }
}

/// What a user may name a blob by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobRef {
    /// `<hex>` or `blake3:<hex>`.
    Blake3(BlobId),
    /// `sha256:<hex>`, resolved through the control plane's alias table.
    Sha256(Sha256Digest),
}

impl FromStr for BlobRef {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        match trimmed.split_once(':') {
            None => parse_hex32(trimmed, s).map(|b| Self::Blake3(BlobId(b))),
            Some((prefix, rest)) if prefix.eq_ignore_ascii_case("blake3") => {
                parse_hex32(rest, s).map(|b| Self::Blake3(BlobId(b)))
            }
            Some((prefix, rest)) if prefix.eq_ignore_ascii_case("sha256") => {
                parse_hex32(rest, s).map(|b| Self::Sha256(Sha256Digest(b)))
            }
            Some((prefix, _)) => Err(ParseIdError::Prefix {
                input: shorten(s),
                // Shortened too: the error echoes whatever a peer sent.
                prefix: shorten(prefix),
            }),
        }
    }
}

impl fmt::Display for BlobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Blake3(id) => write!(f, "{id}"),
            Self::Sha256(d) => write!(f, "sha256:{d}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_matches_blake3_hex() {
        let id = BlobId::of(b"hello");
        assert_eq!(id.to_string(), blake3::hash(b"hello").to_hex().as_str());
    }

    #[test]
    fn parse_accepts_case_and_prefix_prints_lowercase() {
        let id = BlobId::of(b"x");
        let upper = id.to_string().to_uppercase();
        assert_eq!(upper.parse::<BlobId>().unwrap(), id);
        assert_eq!(format!("blake3:{id}").parse::<BlobId>().unwrap(), id);
        assert_eq!(upper.parse::<BlobId>().unwrap().to_string(), id.to_string());
    }

    #[test]
    fn parse_refuses_bad_input() {
        assert!(matches!(
            "abc".parse::<BlobId>(),
            Err(ParseIdError::Length { len: 3, .. })
        ));
        let bad = format!("{}g", "0".repeat(63));
        assert!(matches!(
            bad.parse::<BlobId>(),
            Err(ParseIdError::NotHex { ch: 'g', .. })
        ));
        assert!(matches!(
            format!("md5:{}", "0".repeat(64)).parse::<BlobRef>(),
            Err(ParseIdError::Prefix { .. })
        ));
        assert!("".parse::<BlobId>().is_err());
        assert!("0".repeat(65).parse::<BlobId>().is_err());
        // A sha256 digest is a blob reference, but not a BLAKE3 id.
        assert!(
            format!("sha256:{}", "0".repeat(64))
                .parse::<BlobId>()
                .is_err()
        );
        assert!(matches!(
            format!("sha256:{}", "a".repeat(64)).parse::<BlobRef>(),
            Ok(BlobRef::Sha256(_))
        ));
    }
}

/// Property tests (issue 10, fuzzing): every string either parses into an
/// id that prints back to itself or is refused with a short, typed error.
/// `PROPTEST_CASES` sets the cases per property (256 by default).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    /// Mostly near-misses of real forms, some anything at all.
    fn id_like() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "(blake3:|sha256:|BLAKE3:|Sha256:|md5:|:|)[0-9a-fA-Fg ]{0,66}",
            "[ \t]{0,2}[0-9a-f]{64}[ \t]{0,2}",
            ".{0,300}:[0-9a-f]{64}",
        ]
    }

    proptest! {
        #[test]
        fn fuzz_blob_refs_parse_or_refuse_clearly(s in id_like()) {
            for result in [
                s.parse::<BlobRef>().map(|r| r.to_string()),
                s.parse::<BlobId>().map(|r| r.to_string()),
                s.parse::<Sha256Digest>().map(|r| r.to_string()),
            ] {
                match result {
                    Ok(shown) => {
                        let again: BlobRef = shown.parse().unwrap();
                        prop_assert_eq!(again.to_string(), shown);
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        prop_assert!(msg.starts_with("malformed id"), "{}", msg);
                        // The input is echoed shortened (80 characters, each
                        // escaped in at most 10): an error is one bounded line.
                        prop_assert!(msg.chars().count() < 2000, "{} chars", msg.len());
                        prop_assert!(!msg.contains('\n'));
                    }
                }
            }
        }

        #[test]
        fn fuzz_every_written_form_names_the_same_bytes(
            bytes in any::<[u8; 32]>(),
            upper in any::<bool>(),
            form in 0..4u8,
            pad in "[ \t]{0,2}",
        ) {
            let hex = hex::encode(bytes);
            let typed = if upper { hex.to_uppercase() } else { hex.clone() };
            let text = match form {
                0 => typed,
                1 => format!("blake3:{typed}"),
                2 => format!("BLAKE3:{typed}"),
                _ => format!("sha256:{typed}"),
            };
            match format!("{pad}{text}{pad}").parse::<BlobRef>().unwrap() {
                BlobRef::Blake3(id) => {
                    prop_assert!(form < 3);
                    prop_assert_eq!(id.as_bytes(), &bytes);
                    prop_assert_eq!(id.to_string(), hex.clone());
                    prop_assert_eq!(id.to_string().parse::<BlobId>().unwrap(), id);
                }
                BlobRef::Sha256(d) => {
                    prop_assert_eq!(form, 3);
                    prop_assert_eq!(d.0, bytes);
                    prop_assert_eq!(d.to_string(), hex.clone());
                    prop_assert_eq!(format!("sha256:{d}").parse::<BlobRef>().unwrap(), BlobRef::Sha256(d));
                }
            }
        }

        #[test]
        fn fuzz_one_wrong_character_is_refused(
            bytes in any::<[u8; 32]>(),
            at in 0usize..64,
            ch in any::<char>().prop_filter("not hex", |c| !c.is_ascii_hexdigit() && *c != ':'),
        ) {
            let mut hex: Vec<char> = hex::encode(bytes).chars().collect();
            hex[at] = ch;
            let s: String = hex.into_iter().collect();
            // Surrounding white space is trimmed; anything else is an error.
            if s.trim().len() == s.len() || s.trim().chars().count() != 64 {
                prop_assert!(s.parse::<BlobRef>().is_err(), "{:?}", s);
            }
        }
    }

    #[test]
    fn issue10_fuzz_a_long_unknown_prefix_is_shortened_in_the_error() {
        let s = format!("{}:{}", "x".repeat(100_000), "0".repeat(64));
        let msg = s.parse::<BlobRef>().unwrap_err().to_string();
        assert!(msg.len() < 400, "{} bytes", msg.len());
    }
}
