//! A real registry for the tests and the benchmark: `docker-registry` (the CNCF distribution
//! registry, Debian package `docker-registry`) on a free loopback port with its storage in a
//! temporary directory; an OCI image layout built here (uncompressed tar layers) and pushed with
//! `skopeo`; and a loopback TCP proxy in front of the registry that counts the bytes the registry
//! sends, can be slowed to one rate for all connections, and can stand in for a token-auth
//! registry (401 with a `Bearer` challenge, a `/token` realm, optionally behind basic
//! credentials).
//!
//! Included with `#[path]` by the whole-system tests and the benchmark.

#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sha2::Digest as _;

/// A `docker-registry` process; SIGKILLed by pid when dropped.
#[derive(Debug)]
pub(crate) struct Registry {
    child: Option<Child>,
    pub(crate) addr: SocketAddr,
    pub(crate) dir: PathBuf,
}

impl Registry {
    /// Starts one on a free port with its storage under `dir`; panics (never skips) when
    /// `docker-registry` is missing.
    pub(crate) fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = match Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "docker-registry is not installed; run tests/install-deps.sh (apt-get install -y docker-registry skopeo)"
            ),
            Err(e) => panic!("cannot start docker-registry: {e}"),
        };
        let registry = Self {
            child: Some(child),
            addr,
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {addr}; log:\n{}",
                std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// SIGKILLs it.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A content-addressed blob of an image.
#[derive(Debug, Clone)]
pub(crate) struct BlobDesc {
    /// `sha256:<hex>`.
    pub(crate) digest: String,
    pub(crate) size: u64,
}

/// An OCI image layout on disk: uncompressed tar layers of pseudo-random bytes, a config, a
/// manifest and `index.json` naming it by `tag`.
#[derive(Debug, Clone)]
pub(crate) struct OciImage {
    pub(crate) layout: PathBuf,
    pub(crate) tag: String,
    pub(crate) manifest: Vec<u8>,
    pub(crate) manifest_digest: String,
    pub(crate) config: BlobDesc,
    pub(crate) layers: Vec<BlobDesc>,
}

impl OciImage {
    /// Builds one layer per entry of `layer_sizes` (bytes of file content in it).
    pub(crate) fn build(layout: &Path, tag: &str, layer_sizes: &[usize], seed: u64) -> Self {
        use rand::{RngCore, SeedableRng};
        let blobs = layout.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, &size) in layer_sizes.iter().enumerate() {
            let tmp = blobs.join(format!("layer-{i}.tmp"));
            let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
            let mut hasher = sha2::Sha256::new();
            let mut write = |b: &[u8]| {
                hasher.update(b);
                out.write_all(b).unwrap();
            };
            write(&tar_header(&format!("layer{i}/data.bin"), size as u64));
            let mut buf = vec![0u8; 1 << 20];
            let mut left = size;
            while left > 0 {
                let n = left.min(buf.len());
                rng.fill_bytes(&mut buf[..n]);
                write(&buf[..n]);
                left -= n;
            }
            let pad = (512 - size % 512) % 512;
            write(&vec![0u8; pad + 1024]);
            out.flush().unwrap();
            drop(out);
            let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
            let total = std::fs::metadata(&tmp).unwrap().len();
            std::fs::rename(&tmp, blobs.join(&digest[7..])).unwrap();
            diff_ids.push(digest.clone());
            layers.push(BlobDesc {
                digest,
                size: total,
            });
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }))
        .unwrap();
        let config = put(&blobs, &config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.digest, "size": config.size,
            },
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": l.digest, "size": l.size,
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        let m = put(&blobs, &manifest);
        std::fs::write(
            layout.join("index.json"),
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "manifests": [{
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": m.digest, "size": m.size,
                    "annotations": { "org.opencontainers.image.ref.name": tag },
                }],
            }))
            .unwrap(),
        )
        .unwrap();
        std::fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        Self {
            layout: layout.to_owned(),
            tag: tag.to_owned(),
            manifest,
            manifest_digest: m.digest,
            config,
            layers,
        }
    }

    /// The layers' and config's bytes together.
    pub(crate) fn blob_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum::<u64>() + self.config.size
    }

    /// Pushes it to `docker://<dest>` (e.g. `127.0.0.1:5000/team/app:v1`), digests kept.
    pub(crate) fn push(&self, dest: &str) {
        let out = skopeo(&[
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("oci:{}:{}", self.layout.display(), self.tag),
            &format!("docker://{dest}"),
        ]);
        assert!(
            out.status.success(),
            "skopeo push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `skopeo ARGS…`, bounded in time; panics (never skips) when skopeo is missing.
pub(crate) fn skopeo(args: &[&str]) -> std::process::Output {
    let child = match Command::new("skopeo")
        .args(args)
        // No blob-info cache shared with other runs: digests are checked as sent.
        .env(
            "XDG_DATA_HOME",
            std::env::temp_dir().join("nebula-skopeo-cache"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("skopeo is not installed; run tests/install-deps.sh (apt-get install -y skopeo)")
        }
        Err(e) => panic!("cannot start skopeo: {e}"),
    };
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            rx.recv().unwrap().unwrap()
        }
    }
}

fn put(blobs: &Path, bytes: &[u8]) -> BlobDesc {
    let hex = hex::encode(sha2::Sha256::digest(bytes));
    std::fs::write(blobs.join(&hex), bytes).unwrap();
    BlobDesc {
        digest: format!("sha256:{hex}"),
        size: bytes.len() as u64,
    }
}

/// A ustar header for a regular file.
fn tar_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[148..156].copy_from_slice(b"        ");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// What the proxy asks of clients, as a token-auth registry would.
#[derive(Debug, Clone)]
pub(crate) struct TokenAuth {
    /// The token `/token` hands out; anything else is refused with 401.
    pub(crate) token: String,
    /// Basic credentials `/token` requires, if any.
    pub(crate) basic: Option<(String, String)>,
}

#[derive(Debug, Default)]
struct ProxyState {
    /// Bytes the registry sent through the proxy (heads and bodies).
    from_registry: AtomicU64,
    /// Tokens handed out.
    tokens_issued: AtomicU64,
    /// Requests refused for want of a valid token.
    refused: AtomicU64,
    /// Requests forwarded with the valid token.
    authorized: AtomicU64,
    /// Bytes per second for all connections together; 0: unlimited.
    rate: AtomicU64,
    /// When the paced sender may next send.
    next_send: Mutex<Option<Instant>>,
    stopped: AtomicBool,
}

/// A loopback TCP proxy in front of a registry: one request per connection (it answers
/// `Connection: close`), counting and optionally pacing what the registry sends.
#[derive(Debug)]
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    state: Arc<ProxyState>,
}

impl Proxy {
    /// Forwards to `target`; with `auth`, acts as a token-auth registry.
    pub(crate) fn start(target: SocketAddr, auth: Option<TokenAuth>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState::default());
        let s = Arc::clone(&state);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (s, auth) = (Arc::clone(&s), auth.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, target, addr, &s, auth.as_ref());
                });
            }
        });
        Self { addr, state }
    }

    /// Bytes the registry sent through the proxy so far.
    pub(crate) fn registry_sent(&self) -> u64 {
        self.state.from_registry.load(Ordering::Relaxed)
    }

    pub(crate) fn tokens_issued(&self) -> u64 {
        self.state.tokens_issued.load(Ordering::Relaxed)
    }

    pub(crate) fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::Relaxed)
    }

    pub(crate) fn authorized(&self) -> u64 {
        self.state.authorized.load(Ordering::Relaxed)
    }

    /// Paces what the registry sends to `bytes_per_sec` for all connections (0: unlimited).
    pub(crate) fn set_rate(&self, bytes_per_sec: u64) {
        self.state.rate.store(bytes_per_sec, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn serve(
    mut client: TcpStream,
    target: SocketAddr,
    me: SocketAddr,
    s: &ProxyState,
    auth: Option<&TokenAuth>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte)? == 0 || head.len() > 64 << 10 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(auth) = auth {
        if path.starts_with("/token") {
            let ok = match &auth.basic {
                None => true,
                Some((u, p)) => {
                    use base64::Engine as _;
                    let want = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
                    header("authorization") == Some(format!("Basic {want}").as_str())
                }
            };
            if !ok {
                return answer(&mut client, "401 Unauthorized", "", "{}");
            }
            s.tokens_issued.fetch_add(1, Ordering::Relaxed);
            let body = format!(r#"{{"token":"{}","expires_in":300}}"#, auth.token);
            return answer(
                &mut client,
                "200 OK",
                "Content-Type: application/json\r\n",
                &body,
            );
        }
        if header("authorization") != Some(format!("Bearer {}", auth.token).as_str()) {
            s.refused.fetch_add(1, Ordering::Relaxed);
            let challenge = format!(
                "Www-Authenticate: Bearer realm=\"http://{me}/token\",service=\"test-registry\",scope=\"repository:x:pull\"\r\nContent-Type: application/json\r\n"
            );
            return answer(
                &mut client,
                "401 Unauthorized",
                &challenge,
                r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
            );
        }
        s.authorized.fetch_add(1, Ordering::Relaxed);
    }
    let mut upstream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    // One request per connection: the registry closes after answering.
    let mut forwarded = format!("{request_line}\r\n");
    for (k, v) in &headers {
        if k != "connection" && k != "authorization" {
            forwarded.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    upstream.write_all(forwarded.as_bytes())?;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = upstream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        pace(s, n as u64);
        s.from_registry.fetch_add(n as u64, Ordering::Relaxed);
        client.write_all(&buf[..n])?;
    }
}

fn answer(client: &mut TcpStream, status: &str, headers: &str, body: &str) -> std::io::Result<()> {
    write!(
        client,
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Waits until `n` more bytes may go out at the shared rate.
fn pace(s: &ProxyState, n: u64) {
    let rate = s.rate.load(Ordering::Relaxed);
    if rate == 0 {
        return;
    }
    let at = {
        let mut next = s.next_send.lock().unwrap();
        let now = Instant::now();
        let start = next.map_or(now, |t| t.max(now));
        *next = Some(start + Duration::from_secs_f64(n as f64 / rate as f64));
        start
    };
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}
