//! Flag value types shared by several commands.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use nebula_proto::tls::{self, PemKind, TlsConfig, TlsError};

use crate::output::bad_input;

/// How servers write their logs on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the fields of the enclosing spans.
    Json,
}

/// Flags every server (`control`, `daemon`) takes.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeFlags {
    /// Serve /metrics, /healthz and /readyz over HTTP on this address (off by
    /// default; the control plane also serves its live page at /).
    #[arg(long, env = "NEBULA_HTTP_LISTEN")]
    pub(crate) http_listen: Option<String>,
    /// Log format on stderr: text, or json (one object per line).
    #[arg(long, env = "NEBULA_LOG_FORMAT", value_enum, default_value = "text")]
    pub(crate) log_format: LogFormat,
    /// Close a connection that sends no TLS or HTTP/2 greeting within this long.
    #[arg(long, env = "NEBULA_HANDSHAKE_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub(crate) handshake_timeout: std::time::Duration,
    /// Close a connection that has had no call open for this long.
    #[arg(long, env = "NEBULA_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "2m")]
    pub(crate) idle_timeout: std::time::Duration,
    /// Connections one IP address may hold at once; more are closed.
    #[arg(long, env = "NEBULA_CONNECTIONS_PER_ADDRESS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) connections_per_address: u32,
    #[command(flatten)]
    pub(crate) tls: ServerTlsFlags,
}

impl ServeFlags {
    /// Binds `--http-listen`, when given.
    pub(crate) async fn bind_http(&self) -> anyhow::Result<Option<tokio::net::TcpListener>> {
        let Some(addr) = &self.http_listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--http-listen)"))?;
        Ok(Some(listener))
    }
}

/// TLS flags of every command that dials a control plane (`admin`, and the
/// servers below).
#[derive(Debug, Default, clap::Args)]
pub(crate) struct TlsFlags {
    /// This process's certificate, PEM (leaf first): served by `control` and
    /// `daemon`, shown to servers that require client certificates.
    #[arg(long, global = true, env = "NEBULA_TLS_CERT", value_name = "PEM")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, PEM.
    #[arg(long, global = true, env = "NEBULA_TLS_KEY", value_name = "PEM")]
    pub(crate) tls_key: Option<PathBuf>,
    /// The fleet CA, PEM: the only root trusted for the other side's
    /// certificate. Every https:// URL needs it (for public CAs, give the
    /// system bundle, e.g. /etc/ssl/certs/ca-certificates.crt).
    #[arg(long, global = true, env = "NEBULA_TLS_CA", value_name = "PEM")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Check every certificate against this name instead of the host dialed
    /// (peers are dialed by IP:PORT).
    #[arg(long, global = true, env = "NEBULA_TLS_DOMAIN", value_name = "NAME")]
    pub(crate) tls_domain: Option<String>,
}

/// TLS flags of the commands that serve (`control`, `daemon`, one-shot `fetch`).
#[derive(Debug, Default, clap::Args)]
pub(crate) struct ServerTlsFlags {
    #[command(flatten)]
    pub(crate) tls: TlsFlags,
    /// Refuse clients without a certificate signed by --tls-ca (mutual TLS).
    #[arg(long, env = "NEBULA_TLS_CLIENT_AUTH", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) tls_client_auth: bool,
}

/// Reads a PEM file named by a flag; a missing or unreadable file is bad input.
fn read_pem(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| bad_input(format!("cannot read {flag} {}: {e}", path.display())))
}

impl TlsFlags {
    fn any(&self) -> bool {
        self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_ca.is_some()
            || self.tls_domain.is_some()
    }

    /// The TLS settings of a client: `None` without any flag; otherwise
    /// --tls-ca, with --tls-cert and --tls-key together or not at all.
    /// Every file is read and checked here, before any network call.
    pub(crate) fn load(&self) -> anyhow::Result<Option<TlsConfig>> {
        if !self.any() {
            return Ok(None);
        }
        let Some(ca_path) = &self.tls_ca else {
            return Err(bad_input(
                "TLS flags need --tls-ca PEM (the fleet CA that signed the other side's certificate)",
            ));
        };
        let files = |kind: PemKind| match kind {
            PemKind::Ca => ("--tls-ca", Some(ca_path)),
            PemKind::Certificate => ("--tls-cert", self.tls_cert.as_ref()),
            PemKind::Key => ("--tls-key", self.tls_key.as_ref()),
        };
        let invalid = |e: TlsError| match e.pem_kind().map(files) {
            Some((flag, Some(path))) => bad_input(format!("{flag} {}: {e}", path.display())),
            _ => bad_input(format!("TLS: {e}")),
        };
        let mut tls = TlsConfig::new(read_pem("--tls-ca", ca_path)?).map_err(invalid)?;
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let (cert, key) = (read_pem("--tls-cert", cert)?, read_pem("--tls-key", key)?);
                tls = tls.with_identity(cert, key).map_err(invalid)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(bad_input("--tls-cert needs --tls-key (its private key)"));
            }
            (None, Some(_)) => {
                return Err(bad_input("--tls-key needs --tls-cert (its certificate)"));
            }
        }
        if let Some(name) = &self.tls_domain {
            tls = tls
                .with_domain(name.clone())
                .map_err(|e| bad_input(format!("--tls-domain: {e}")))?;
        }
        Ok(Some(tls))
    }
}

impl ServerTlsFlags {
    /// The TLS settings of a server: `None` without any flag; otherwise all
    /// of --tls-cert, --tls-key and --tls-ca (it serves with the certificate
    /// and dials with the CA), checked before anything binds.
    pub(crate) fn load(&self) -> anyhow::Result<Option<TlsConfig>> {
        if !self.tls.any() {
            if self.tls_client_auth {
                return Err(bad_input(
                    "--tls-client-auth needs --tls-cert, --tls-key and --tls-ca",
                ));
            }
            return Ok(None);
        }
        let missing: Vec<&str> = [
            ("--tls-cert", self.tls.tls_cert.is_none()),
            ("--tls-key", self.tls.tls_key.is_none()),
            ("--tls-ca", self.tls.tls_ca.is_none()),
        ]
        .into_iter()
        .filter_map(|(flag, absent)| absent.then_some(flag))
        .collect();
        if !missing.is_empty() {
            return Err(bad_input(format!(
                "TLS on a server needs --tls-cert, --tls-key and --tls-ca (missing: {})",
                missing.join(", ")
            )));
        }
        Ok(self
            .tls
            .load()?
            .map(|t| t.with_client_auth(self.tls_client_auth)))
    }
}

/// Checks that every `--control` URL agrees with the TLS flags, before any
/// call: `https://` needs --tls-ca, and with TLS on, `http://` would send the
/// tokens in clear.
pub(crate) fn check_control_tls(control: &str, tls: Option<&TlsConfig>) -> anyhow::Result<()> {
    for url in control.split(',') {
        match (tls::is_https(url), tls) {
            (true, None) => {
                return Err(bad_input(format!(
                    "--control {url} is https:// but TLS is not configured: pass --tls-ca PEM \
                     (the CA that signed the control plane's certificate)"
                )));
            }
            (false, Some(_)) => {
                return Err(bad_input(format!(
                    "--control {url} is plaintext but TLS is configured (--tls-*): use https://"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// What a failed call means, when TLS explains it: the hint for a TLS alert
/// or certificate error in `text`.
pub(crate) fn tls_hint(text: &str, tls: Option<&TlsConfig>) -> Option<&'static str> {
    if text.contains("CertificateRequired") {
        Some(
            "the server requires a client certificate: pass --tls-cert and --tls-key issued by the fleet CA",
        )
    } else if text.contains("UnknownIssuer") {
        Some("the server's certificate is not signed by the CA given with --tls-ca")
    } else if text.contains("not valid for name") {
        Some("a certificate must name the host dialed (a SAN), or pass --tls-domain NAME")
    } else if text.contains("Expired") {
        Some("a certificate has expired")
    } else {
        // Under TLS 1.3 the server checks a client certificate after the
        // client has finished its handshake: its refusal reaches the client
        // as an alert, or, when the client writes first, as a closed pipe.
        let refused = [
            "broken pipe",
            "BadCertificate",
            "UnknownCA",
            "reset by peer",
            "canceled",
        ]
        .iter()
        .any(|t| text.contains(t));
        match tls.map(TlsConfig::has_identity) {
            Some(true) if refused => {
                Some("the server may have refused --tls-cert: is it issued by the fleet CA?")
            }
            Some(false) if refused => Some(
                "the server may require a client certificate: pass --tls-cert and --tls-key issued by the fleet CA",
            ),
            _ => None,
        }
    }
}

/// Adds what TLS says about a failed call to the control plane: the hint of
/// [`tls_hint`], or, for a transport failure over `http://`, that the server
/// answers with TLS (a plaintext client gets only an HTTP/2 protocol error).
/// Bad input and failures that are not the transport's are left alone.
pub(crate) async fn explain_tls_failure(
    control: &str,
    tls: Option<&TlsConfig>,
    err: anyhow::Error,
) -> anyhow::Error {
    if err.chain().any(|e| e.is::<crate::output::BadInput>()) {
        return err;
    }
    let line = crate::output::chain_line(&err);
    if let Some(hint) = tls_hint(&line, tls) {
        return anyhow::anyhow!("{line}; {hint}");
    }
    let transport = ["h2 protocol error", "transport error", "connection"]
        .iter()
        .any(|t| line.contains(t));
    if tls.is_none() && transport {
        for url in control.split(',') {
            if tls::speaks_tls(url, Duration::from_secs(2)).await {
                return anyhow::anyhow!(
                    "{line}; {url} answers with TLS: use --control https://… with --tls-ca PEM"
                );
            }
        }
    }
    err
}

/// A duration flag that does not parse.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ParseDurationError {
    /// A bare number of seconds out of range.
    #[error("invalid duration {input:?} (try 10s, 500ms, 2m)")]
    Seconds {
        /// The flag's value.
        input: String,
    },
    /// Months or years, which have no fixed length.
    #[error("invalid duration {input:?}: months and years have no fixed length (use d or h)")]
    Approximate {
        /// The flag's value.
        input: String,
    },
    /// Not a duration humantime reads.
    #[error("invalid duration {input:?}: {reason} (try 10s, 500ms, 2m)")]
    Unreadable {
        /// The flag's value.
        input: String,
        /// What humantime said.
        reason: humantime::DurationError,
    },
}

/// Parses a duration as humantime reads it (`500ms`, `10s`, `15m`,
/// `1.5h`, `1h 30m`, `2days`), or a bare number of seconds (`3`, `0.5`).
/// Months and years are refused: they have no fixed length.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, ParseDurationError> {
    let input = s.trim();
    if !input.is_empty() && input.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return input
            .parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| ParseDurationError::Seconds {
                input: input.to_owned(),
            });
    }
    let approximate = input.split(|c: char| !c.is_alphabetic()).any(|unit| {
        matches!(
            unit,
            "M" | "month" | "months" | "y" | "yr" | "yrs" | "year" | "years"
        )
    });
    if approximate {
        return Err(ParseDurationError::Approximate {
            input: input.to_owned(),
        });
    }
    humantime::parse_duration(input).map_err(|reason| ParseDurationError::Unreadable {
        input: input.to_owned(),
        reason,
    })
}

/// Parses `--control` (see `nebula_control::client::parse_control_urls`).
pub(crate) use nebula_control::client::parse_control_urls as parse_control_url;

/// Parses a byte rate such as `20MiB/s` (see `nebula_common::rate`).
pub(crate) use nebula_common::rate::parse_rate;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn durations_in_every_form_accepted_before_and_humantime_forms() {
        for (given, want) in [
            ("1.5s", 1500),
            ("0.5", 500),
            ("10 s", 10_000),
            (" 2m ", 120_000),
            ("1h", 3_600_000),
            ("1h 30m", 5_400_000),
            ("15min", 900_000),
            ("2days", 172_800_000),
        ] {
            assert_eq!(
                parse_duration(given).unwrap(),
                Duration::from_millis(want),
                "{given:?}"
            );
        }
        for bad in ["", "s", "1 month", "2M", "1e3", "inf", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}

/// Property tests (issue 10, fuzzing): the CLI's own parsers.
/// `PROPTEST_CASES` sets the cases.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn fuzz_durations_parse_or_refuse_without_panicking(
            s in prop_oneof![
                any::<String>(),
                "[ ]?[0-9]{0,30}(|\\.[0-9]{0,5})[ ]?(|ms|s|m|h|d|x)[ ]?",
            ],
        ) {
            if let Err(e) = parse_duration(&s) {
                prop_assert!(e.to_string().starts_with("invalid duration"), "{}", e);
            }
        }

        #[test]
        fn fuzz_durations_round_trip_in_every_unit(n in 0u64..10_000_000, unit in 0..4usize) {
            let (suffix, ms) = [("ms", 1u64), ("s", 1000), ("m", 60_000), ("h", 3_600_000)][unit];
            let d = parse_duration(&format!("{n}{suffix}")).unwrap();
            prop_assert_eq!(d.as_millis(), u128::from(n) * u128::from(ms));
        }

        #[test]
        fn fuzz_control_urls_parse_or_refuse_clearly(
            s in prop_oneof![
                any::<String>(),
                "(|http://|https://|ftp://|//)[a-z0-9.:\\[\\]@/ -]{0,30}(|,)[a-z0-9.:/]{0,20}",
            ],
        ) {
            match parse_control_url(&s) {
                Ok(url) => {
                    // What is accepted is normal: parsing it again changes nothing.
                    prop_assert_eq!(parse_control_url(&url).unwrap(), url.clone());
                    for one in url.split(',') {
                        prop_assert!(one.starts_with("http://") || one.starts_with("https://"));
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    prop_assert!(!e.is_empty() && !e.contains('\n'), "{}", e);
                }
            }
        }
    }

    #[test]
    fn issue10_fuzz_a_huge_duration_is_refused_not_a_panic() {
        for s in ["99999999999999999999999h", "1e400", "18446744073709551616s"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }
}
