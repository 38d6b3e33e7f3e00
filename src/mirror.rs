//! `nebula mirror containerd`: points containerd at the daemon's registry
//! mirror, one `hosts.toml` per registry.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::output::{bad_input, print_line};

/// The first line of every file this command writes: a file that starts
/// with it is ours, and is replaced without a backup.
const MARKER: &str = "# Written by `nebula mirror containerd`";
/// Backups tried before giving up (`hosts.toml.bak`, `.bak.1`, …).
const MAX_BACKUPS: usize = 100;

/// Flags of `nebula mirror`.
#[derive(Debug, clap::Args)]
pub(crate) struct MirrorArgs {
    #[command(subcommand)]
    command: MirrorCommand,
}

#[derive(Debug, clap::Subcommand)]
enum MirrorCommand {
    /// Write containerd's hosts.toml for each registry: the daemon's mirror
    /// first, the registry itself as the fallback.
    Containerd(ContainerdArgs),
}

#[derive(Debug, clap::Args)]
struct ContainerdArgs {
    /// A registry to pull through the mirror, as containerd names it
    /// (`docker.io`, `ghcr.io`, `HOST:PORT`); repeat (or separate with
    /// commas) for several.
    #[arg(
        long = "registry",
        env = "NEBULA_REGISTRY",
        value_name = "HOST",
        value_delimiter = ',',
        required = true
    )]
    registries: Vec<String>,
    /// containerd's hosts directory (its `config_path`).
    #[arg(
        long,
        env = "NEBULA_CONTAINERD_DIR",
        default_value = "/etc/containerd/certs.d"
    )]
    dir: PathBuf,
    /// The daemon's `--registry-mirror`, as containerd should reach it.
    #[arg(long, env = "NEBULA_MIRROR", default_value = "http://127.0.0.1:5000")]
    mirror: String,
    /// The fleet CA (PEM) containerd trusts for an `https://` mirror: a
    /// daemon with TLS serves its mirror with its fleet certificate.
    #[arg(long, env = "NEBULA_MIRROR_CA", value_name = "PEM")]
    mirror_ca: Option<PathBuf>,
    /// A fleet certificate and its key (PEM) containerd shows an `https://`
    /// mirror whose daemon runs with `--tls-client-auth`; given together.
    #[arg(
        long,
        env = "NEBULA_MIRROR_CERT",
        value_name = "PEM",
        requires = "mirror_key"
    )]
    mirror_cert: Option<PathBuf>,
    /// The key of `--mirror-cert`.
    #[arg(
        long,
        env = "NEBULA_MIRROR_KEY",
        value_name = "PEM",
        requires = "mirror_cert"
    )]
    mirror_key: Option<PathBuf>,
    /// Print the files instead of writing them.
    #[arg(long, env = "NEBULA_PRINT", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    print: bool,
}

pub(crate) fn run(args: MirrorArgs) -> anyhow::Result<()> {
    match args.command {
        MirrorCommand::Containerd(args) => containerd(args),
    }
}

fn containerd(args: ContainerdArgs) -> anyhow::Result<()> {
    let mirror = mirror_url(&args.mirror).map_err(|e| bad_input(e.to_string()))?;
    let https = mirror.starts_with("https://");
    let absolute = |flag: &str, path: &Option<PathBuf>| -> anyhow::Result<Option<PathBuf>> {
        match path {
            Some(_) if !https => Err(bad_input(format!(
                "{flag} is for an https:// mirror (a daemon with TLS serves one)"
            ))),
            Some(path) => std::fs::canonicalize(path)
                .map(Some)
                .map_err(|e| bad_input(format!("{flag} {}: {e}", path.display()))),
            None => Ok(None),
        }
    };
    let tls = MirrorTls {
        ca: absolute("--mirror-ca", &args.mirror_ca)?,
        client: absolute("--mirror-cert", &args.mirror_cert)?
            .zip(absolute("--mirror-key", &args.mirror_key)?),
    };
    let mut files = Vec::new();
    for registry in &args.registries {
        let registry = registry_host(registry).map_err(|e| bad_input(e.to_string()))?;
        let path = args.dir.join(&registry).join("hosts.toml");
        files.push((path, hosts_toml(&registry, &mirror, &tls)));
    }
    for (path, text) in files {
        if args.print {
            print_line(format!("# {}\n{text}", path.display()))?;
            continue;
        }
        match write(&path, &text)? {
            Some(backup) => print_line(format!(
                "wrote {} (the file it replaced is {})",
                path.display(),
                backup.display()
            ))?,
            None => print_line(format!("wrote {}", path.display()))?,
        }
    }
    Ok(())
}

/// A flag of `nebula mirror containerd` naming no usable mirror or registry.
#[derive(Debug, thiserror::Error)]
enum FlagError {
    /// `--mirror` is not an `http(s)://HOST:PORT` URL.
    #[error("--mirror: {reason}")]
    Mirror {
        /// What the mirror's URL parser said.
        reason: String,
    },
    /// `--registry` is not a host as containerd names its directories.
    #[error(
        "--registry {given:?}: give the registry host as containerd names it, e.g. docker.io or registry.example:5000"
    )]
    Registry {
        /// The value as given.
        given: String,
    },
}

/// `http(s)://HOST:PORT`, as containerd's `[host."…"]` key.
fn mirror_url(s: &str) -> Result<String, FlagError> {
    let url = nebula_peer::MirrorConfig::parse_upstream(s)
        .map_err(|reason| FlagError::Mirror { reason })?;
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// A registry as containerd's directory names it: `host[:port]`, lowercase.
fn registry_host(s: &str) -> Result<String, FlagError> {
    let host = s.trim().to_ascii_lowercase();
    let valid = !host.is_empty()
        && !host.starts_with('.')
        && host != ".."
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    if !valid {
        return Err(FlagError::Registry {
            given: s.to_owned(),
        });
    }
    Ok(host)
}

/// The registry's own endpoint: Docker Hub's API lives on registry-1.docker.io.
fn server_of(registry: &str) -> String {
    match registry {
        "docker.io" => nebula_peer::mirror::upstream::DOCKER_HUB.to_owned(),
        other => format!("https://{other}"),
    }
}

/// What containerd needs to reach an `https://` mirror: the CA to trust, and
/// the certificate and key to show under client auth.
#[derive(Debug, Default)]
struct MirrorTls {
    ca: Option<PathBuf>,
    client: Option<(PathBuf, PathBuf)>,
}

fn hosts_toml(registry: &str, mirror: &str, tls: &MirrorTls) -> String {
    let mut text = format!(
        "{MARKER}: pulls go to the Nebula mirror first,\n\
         # and to the registry itself when the mirror fails.\n\
         server = \"{server}\"\n\
         \n\
         [host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        server = server_of(registry)
    );
    let quoted = |p: &Path| format!("{:?}", p.display().to_string());
    if let Some(ca) = &tls.ca {
        text.push_str(&format!("  ca = {}\n", quoted(ca)));
    }
    if let Some((cert, key)) = &tls.client {
        text.push_str(&format!(
            "  client = [[{}, {}]]\n",
            quoted(cert),
            quoted(key)
        ));
    }
    text
}

/// Writes `text` to `path` atomically; a file it replaces that this command
/// did not write is kept as a backup, whose path is answered.
fn write(path: &Path, text: &str) -> anyhow::Result<Option<PathBuf>> {
    let dir = path.parent().context("hosts.toml has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut backup = None;
    match std::fs::read_to_string(path) {
        Ok(old) if old == text => return Ok(None),
        Ok(old) if old.starts_with(MARKER) => {}
        Ok(_) => {
            let name = |n: usize| match n {
                0 => path.with_extension("toml.bak"),
                n => path.with_extension(format!("toml.bak.{n}")),
            };
            let free = (0..MAX_BACKUPS)
                .map(name)
                .find(|p| !p.exists())
                .with_context(|| format!("too many backups of {} already", path.display()))?;
            std::fs::copy(path, &free)
                .with_context(|| format!("cannot back up {}", path.display()))?;
            backup = Some(free);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let mut tmp = tempfile_in(dir)?;
    tmp.1
        .write_all(text.as_bytes())
        .and_then(|()| tmp.1.sync_all())
        .with_context(|| format!("cannot write {}", tmp.0.display()))?;
    std::fs::rename(&tmp.0, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(backup)
}

/// A new file beside the destination, for an atomic rename.
fn tempfile_in(dir: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let path = dir.join(format!(".hosts.toml.{}.tmp", std::process::id()));
    let file = std::fs::File::create(&path)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    Ok((path, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_files_name_the_mirror_first_and_the_registry_as_server() {
        let t = hosts_toml("docker.io", "http://127.0.0.1:5000", &MirrorTls::default());
        assert!(
            t.contains("server = \"https://registry-1.docker.io\""),
            "{t}"
        );
        assert!(t.contains(
            "[host.\"http://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]"
        ));
        let tls = MirrorTls {
            ca: Some("/etc/nebula/ca.pem".into()),
            client: Some(("/etc/nebula/host.pem".into(), "/etc/nebula/host.key".into())),
        };
        let t = hosts_toml("ghcr.io", "https://127.0.0.1:5000", &tls);
        assert!(
            t.ends_with(concat!(
                "capabilities = [\"pull\", \"resolve\"]\n",
                "  ca = \"/etc/nebula/ca.pem\"\n",
                "  client = [[\"/etc/nebula/host.pem\", \"/etc/nebula/host.key\"]]\n"
            )),
            "{t}"
        );
        assert_eq!(server_of("ghcr.io"), "https://ghcr.io");
        assert!(registry_host("https://ghcr.io").is_err());
        assert!(registry_host("..").is_err());
        assert_eq!(
            registry_host("Reg.example:5000").unwrap(),
            "reg.example:5000"
        );
        assert_eq!(
            mirror_url("http://127.0.0.1:5000").unwrap(),
            "http://127.0.0.1:5000"
        );
    }

    #[test]
    fn replaced_files_are_backed_up_once() {
        let dir = std::env::temp_dir().join(format!("nebula-hosts-{}", std::process::id()));
        let path = dir.join("docker.io/hosts.toml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "server = \"https://mine\"\n").unwrap();
        let text = hosts_toml("docker.io", "http://127.0.0.1:5000", &MirrorTls::default());
        let backup = write(&path, &text).unwrap().unwrap();
        assert_eq!(
            std::fs::read_to_string(&backup).unwrap(),
            "server = \"https://mine\"\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        // Ours again: replaced with no second backup.
        let text2 = hosts_toml("docker.io", "http://127.0.0.1:5001", &MirrorTls::default());
        assert_eq!(write(&path, &text2).unwrap(), None);
        assert!(!path.with_extension("toml.bak.1").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
