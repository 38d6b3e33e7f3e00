//! Flag value types shared by several commands.

use std::time::Duration;

use anyhow::Context as _;

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

/// Parses a duration such as `500ms`, `10s`, `2m` or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (try 10s, 500ms, 2m)"))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `--control`: one control-plane URL or several replicas' as
/// `URL,URL,…`, each `http://host[:port]`, `https://…`, or the shorthand
/// `host:port`. Anything else (no host, another scheme, a bare word,
/// an unparsable URI) is refused at once, before any network call, rather
/// than retried as a host name.
pub(crate) fn parse_control_url(s: &str) -> Result<String, String> {
    let urls = s
        .split(',')
        .map(parse_one_control_url)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(urls.join(","))
}

/// One entry of `--control`.
fn parse_one_control_url(s: &str) -> Result<String, String> {
    let raw = s.trim();
    if raw.is_empty() {
        return Err("empty URL (expected http://HOST:PORT)".into());
    }
    let url = if raw.contains("://") {
        raw.to_owned()
    } else {
        // The shorthand must name a port: a bare word is a typo, not a host.
        let port = raw.rsplit_once(':').map(|(_, p)| p);
        if port.is_none_or(|p| p.parse::<u16>().is_err()) {
            return Err(format!(
                "{raw:?} is not a URL (expected http://HOST:PORT or HOST:PORT)"
            ));
        }
        format!("http://{raw}")
    };
    let uri: tonic::transport::Uri = url
        .parse()
        .map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{raw:?}: the scheme must be http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{raw:?} names no host"));
    }
    Ok(url)
}

/// Parses a byte rate such as `20MiB/s` (see `nebula_common::rate`).
pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    nebula_common::rate::parse_rate(s).map_err(|e| e.to_string())
}

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
    fn control_urls() {
        assert_eq!(parse_control_url("h:7700").unwrap(), "http://h:7700");
        assert_eq!(parse_control_url(" https://h ").unwrap(), "https://h");
        assert_eq!(
            parse_control_url("a:1, http://b:2").unwrap(),
            "http://a:1,http://b:2"
        );
        for bad in [
            "",
            "a:1,",
            "a:1,notaurl",
            "notaurl",
            "http://[::1",
            "ftp://x",
            "http://",
            "h:port",
        ] {
            assert!(parse_control_url(bad).is_err(), "{bad:?}");
        }
    }
}
