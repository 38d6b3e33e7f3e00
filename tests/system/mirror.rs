//! The registry mirror (issue 13): a real `docker-registry` started by the
//! test, an OCI image built here and pushed with `skopeo`, real daemons
//! serving `--registry-mirror`, pulls with `skopeo` (and `ctr`) through them;
//! every layer digest and the manifest bytes checked, and the registry's
//! bytes counted by a proxy in front of it.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use sha2::Digest as _;

use crate::support::{BIN, Daemon, TestCluster, nebula, run_bounded, wait_until};

#[path = "../../examples/common/registry.rs"]
mod registry;

use registry::{OciImage, Proxy, Registry, TokenAuth, skopeo};

const MIB: usize = 1 << 20;
const NAME: &str = "team/app/web";

/// A registry with one image pushed, behind a counting proxy.
struct Upstream {
    image: OciImage,
    proxy: Proxy,
    registry: Registry,
}

impl Upstream {
    fn start(dir: &Path, layers: &[usize], auth: Option<TokenAuth>) -> Self {
        let registry = Registry::start(&dir.join("registry"));
        let image = OciImage::build(&dir.join("image"), "v1", layers, 13);
        image.push(&format!("{}/{NAME}:v1", registry.addr));
        let proxy = Proxy::start(registry.addr, auth);
        Self {
            image,
            proxy,
            registry,
        }
    }

    /// Daemon flags for a mirror whose default upstream is the proxy.
    fn mirror_flags(&self) -> Vec<&'static str> {
        let upstream: &'static str =
            Box::leak(format!("http://{}", self.proxy.addr).into_boxed_str());
        vec![
            "--registry-mirror",
            "127.0.0.1:0",
            "--mirror-upstream",
            upstream,
            "--origin-timeout",
            "2s",
        ]
    }
}

fn mirror_of(d: &Daemon) -> SocketAddr {
    d.proc.mirror.expect("started with --registry-mirror")
}

/// `skopeo copy` from the mirror into an OCI layout at `out`.
fn pull(mirror: SocketAddr, reference: &str, out: &Path) {
    let out = skopeo(&[
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{mirror}/{NAME}{reference}"),
        &format!("oci:{}:pulled", out.display()),
    ]);
    assert!(
        out.status.success(),
        "skopeo pull through the mirror failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pulled layout holds exactly the image: its manifest bytes, and each
/// blob with the bytes its digest names.
fn check_pulled(out: &Path, image: &OciImage) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], image.manifest_digest);
    let blob = |digest: &str| std::fs::read(out.join("blobs/sha256").join(&digest[7..])).unwrap();
    assert_eq!(
        blob(&image.manifest_digest),
        image.manifest,
        "manifest bytes"
    );
    for b in image.layers.iter().chain([&image.config]) {
        let data = blob(&b.digest);
        assert_eq!(data.len() as u64, b.size, "size of {}", b.digest);
        assert_eq!(
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data))),
            b.digest
        );
    }
}

/// One request on a fresh connection: status, head, body, and whether the
/// body was whole (as long as its Content-Length) when the server closed.
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    // A reset connection is an answer too: what came before it is kept.
    let _ = s.read_to_end(&mut raw);
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "{method} {path}: no head in {:?}",
                String::from_utf8_lossy(&raw)
            )
        });
    let head = String::from_utf8_lossy(&raw[..at]).to_ascii_lowercase();
    let body = raw[at + 4..].to_vec();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let length: Option<usize> = header_of(&head, "content-length").and_then(|v| v.parse().ok());
    let whole = length.is_none_or(|n| method == "HEAD" || body.len() == n);
    Answer {
        status,
        head,
        body,
        whole,
    }
}

struct Answer {
    status: u16,
    /// Lowercased.
    head: String,
    body: Vec<u8>,
    whole: bool,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        header_of(&self.head, name)
    }
}

fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim().to_owned())
    })
}

fn layer_bytes(image: &OciImage, i: usize) -> Vec<u8> {
    std::fs::read(
        image
            .layout
            .join("blobs/sha256")
            .join(&image.layers[i].digest[7..]),
    )
    .unwrap()
}

fn metric(d: &Daemon, series: &str) -> f64 {
    d.proc.metrics().0.get(series).copied().unwrap_or(0.0)
}

#[test]
fn mirror_pulls_an_image_by_tag_then_a_second_daemon_pulls_it_from_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path(), &[3 * MIB, 5 * MIB + 123, 1000], None);
    let flags = up.mirror_flags();
    let fleet = TestCluster::start_with(BIN, 2, |_| (flags.clone(), Vec::new()));
    let (d0, d1) = (&fleet.daemons[0], &fleet.daemons[1]);
    let one_copy = up.image.blob_bytes() as f64;

    let ping = request(mirror_of(d0), "GET", "/v2/", &[]);
    assert_eq!(ping.status, 200);
    assert_eq!(
        ping.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );

    pull(mirror_of(d0), ":v1", &fleet.path("by-tag"));
    check_pulled(&fleet.path("by-tag"), &up.image);
    let after_first = up.proxy.registry_sent() as f64;
    assert!(
        after_first >= one_copy,
        "the registry sent {after_first} bytes, the image is {one_copy}"
    );

    // The second daemon by digest: its blobs come from the first, not the registry.
    for b in up.image.layers.iter().chain([&up.image.config]) {
        assert!(
            fleet.wait_providers(&b.digest, 1),
            "the fleet never listed {}",
            b.digest
        );
    }
    pull(
        mirror_of(d1),
        &format!("@{}", up.image.manifest_digest),
        &fleet.path("by-digest"),
    );
    check_pulled(&fleet.path("by-digest"), &up.image);
    let total = up.proxy.registry_sent() as f64;
    // One copy of the blobs, plus manifests and heads (a few KiB).
    assert!(
        total <= one_copy * 1.05 + 64.0 * 1024.0,
        "the registry sent {total} bytes for two pulls of a {one_copy}-byte image"
    );
    let from_peers = metric(d1, "nebula_mirror_fetched_bytes_total{source=\"peer\"}");
    assert!(
        from_peers >= up.image.layers.iter().map(|l| l.size).sum::<u64>() as f64 * 0.99,
        "the second mirror fetched {from_peers} bytes from peers"
    );
    assert!(
        metric(
            d1,
            "nebula_mirror_requests_total{kind=\"blob\",result=\"ok\"}"
        ) >= 4.0
    );
    assert!(
        metric(
            d0,
            "nebula_mirror_requests_total{kind=\"manifest\",result=\"ok\"}"
        ) >= 1.0
    );

    // A blob now held here, by range: exact bytes, exact Content-Range.
    let layer = layer_bytes(&up.image, 1);
    let path = format!("/v2/{NAME}/blobs/{}", up.image.layers[1].digest);
    let r = request(
        mirror_of(d1),
        "GET",
        &path,
        &[("Range", "bytes=1000-1999999")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 1000-1999999/{}", layer.len()))
    );
    assert!(r.whole);
    assert_eq!(r.body, &layer[1000..2_000_000]);

    // An unknown tag: the registry's 404, as the distribution API says it.
    let r = request(
        mirror_of(d0),
        "GET",
        &format!("/v2/{NAME}/manifests/nope"),
        &[],
    );
    assert_eq!(r.status, 404);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    assert!(
        metric(
            d0,
            "nebula_mirror_requests_total{kind=\"manifest\",result=\"not_found\"}"
        ) >= 1.0
    );
}

#[test]
fn mirror_head_starts_no_download_and_ranges_of_a_fresh_blob_stream() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path(), &[6 * MIB + 77], None);
    let mut flags = up.mirror_flags();
    flags.extend(["--mirror-tag-ttl", "10m"]);
    let fleet = TestCluster::start_with(BIN, 1, |_| (flags.clone(), Vec::new()));
    let d0 = &fleet.daemons[0];
    let mirror = mirror_of(d0);
    let layer = layer_bytes(&up.image, 0);
    let path = format!("/v2/{NAME}/blobs/{}", up.image.layers[0].digest);

    // A tag within --mirror-tag-ttl: the registry is asked once.
    let manifest = format!("/v2/{NAME}/manifests/v1");
    let accept = [("Accept", "application/vnd.oci.image.manifest.v1+json")];
    let first = request(mirror, "GET", &manifest, &accept);
    assert_eq!((first.status, &first.body), (200, &up.image.manifest));
    let asked = up.proxy.registry_sent();
    let again = request(mirror, "GET", &manifest, &accept);
    assert_eq!(again.body, up.image.manifest);
    assert_eq!(
        again.header("docker-content-digest"),
        Some(up.image.manifest_digest.clone())
    );
    assert_eq!(
        up.proxy.registry_sent(),
        asked,
        "a cached tag went to the registry"
    );

    let before = up.proxy.registry_sent();
    let r = request(mirror, "HEAD", &path, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(layer.len().to_string()));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(up.image.layers[0].digest.clone())
    );
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));
    std::thread::sleep(Duration::from_secs(2));
    let sent = up.proxy.registry_sent() - before;
    assert!(
        sent < 8 * 1024,
        "a HEAD made the registry send {sent} bytes"
    );
    assert_eq!(
        metric(d0, "nebula_received_bytes_total{source=\"origin\"}"),
        0.0
    );
    for state in ["complete", "partial"] {
        let held = metric(d0, &format!("nebula_store_blobs{{state=\"{state}\"}}"));
        assert_eq!(held, 0.0, "a HEAD stored a {state} blob");
    }

    // A blob nobody has: 404 with the distribution error.
    let unknown = format!("/v2/{NAME}/blobs/sha256:{}", "0".repeat(64));
    assert_eq!(request(mirror, "HEAD", &unknown, &[]).status, 404);
    let r = request(mirror, "GET", &unknown, &[]);
    assert_eq!(r.status, 404);
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["errors"][0]["code"], "BLOB_UNKNOWN");
    assert_eq!(
        request(mirror, "GET", &format!("/v2/{NAME}/blobs/md5:00"), &[]).status,
        400
    );

    // A range of a blob held nowhere yet: streamed from the download it starts.
    let (a, b) = (3 * MIB as u64 - 5, 5 * MIB as u64 + 9);
    let r = request(
        mirror,
        "GET",
        &path,
        &[("Range", &format!("bytes={a}-{b}"))],
    );
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {a}-{b}/{}", layer.len()))
    );
    assert!(r.whole);
    assert_eq!(r.body, &layer[a as usize..=b as usize]);
    let r = request(mirror, "GET", &path, &[("Range", "bytes=-100")]);
    assert_eq!((r.status, &r.body[..]), (206, &layer[layer.len() - 100..]));
    let r = request(
        mirror,
        "GET",
        &path,
        &[("Range", &format!("bytes={}-", layer.len()))],
    );
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{}", layer.len()))
    );
    let r = request(mirror, "GET", &path, &[]);
    assert_eq!((r.status, r.whole), (200, true));
    assert!(r.body == layer, "the whole blob differs");
    // One copy from the registry for all of it.
    let total = (up.proxy.registry_sent() - before) as f64;
    assert!(
        total <= layer.len() as f64 * 1.05 + 16.0 * 1024.0,
        "the registry sent {total} bytes"
    );
}

#[test]
fn mirror_aborts_when_the_registry_dies_mid_layer_and_serves_whole_layers_from_peers() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = Upstream::start(dir.path(), &[4 * MIB, 24 * MIB], None);
    let flags = up.mirror_flags();
    let fleet = TestCluster::start_with(BIN, 2, |_| (flags.clone(), Vec::new()));
    let (d0, d1) = (&fleet.daemons[0], &fleet.daemons[1]);
    let small = format!("/v2/{NAME}/blobs/{}", up.image.layers[0].digest);
    let big = format!("/v2/{NAME}/blobs/{}", up.image.layers[1].digest);

    // The second daemon holds the small layer whole.
    let r = request(mirror_of(d1), "GET", &small, &[]);
    assert_eq!((r.status, r.whole), (200, true));
    assert!(fleet.wait_providers(&up.image.layers[0].digest, 1));

    // Both stream the big layer at once from a slow registry: one downloads
    // it, the other follows, so the fleet holds it in part when the
    // registry dies midway.
    up.proxy.set_rate(4 * MIB as u64);
    let before = up.proxy.registry_sent();
    let clients: Vec<_> = [mirror_of(d0), mirror_of(d1)]
        .into_iter()
        .map(|mirror| {
            let path = big.clone();
            std::thread::spawn(move || request(mirror, "GET", &path, &[]))
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || up.proxy.registry_sent()
            > before + 8 * MIB as u64),
        "the download never got going"
    );
    up.registry.kill();
    let layer = layer_bytes(&up.image, 1);
    let mut longest = 0;
    for client in clients {
        let r = client.join().unwrap();
        assert_eq!(r.status, 200);
        assert!(
            !r.whole && r.body.len() < 24 * MIB,
            "the mirror ended a layer it could not finish cleanly ({} bytes)",
            r.body.len()
        );
        // What came is the layer's own prefix.
        assert_eq!(r.body, &layer[..r.body.len()]);
        longest = longest.max(r.body.len());
    }
    // Streamed: bytes came while the layer was still arriving.
    assert!(
        longest >= MIB,
        "only {longest} bytes came before the registry died"
    );
    assert!(metric(d0, "nebula_mirror_aborted_total") >= 1.0);

    // With the registry gone, a layer the fleet holds whole still comes, from the peer.
    let r = request(mirror_of(d0), "GET", &small, &[]);
    assert_eq!((r.status, r.whole), (200, true));
    assert!(r.body == layer_bytes(&up.image, 0));
    assert!(metric(d0, "nebula_mirror_fetched_bytes_total{source=\"peer\"}") >= 4.0 * MIB as f64);
}

#[test]
fn mirror_answers_the_registry_token_flow_with_docker_config_credentials() {
    token_flow(true);
}

#[test]
fn mirror_answers_the_registry_token_flow_anonymously() {
    token_flow(false);
}

/// A registry that wants a bearer token from its realm (behind basic
/// credentials from `--mirror-auth` when `credentials`): the pull works, a
/// token is fetched and reused, and no secret reaches a log.
fn token_flow(credentials: bool) {
    let dir = tempfile::tempdir().unwrap();
    let token = format!("tok-{}", rand::random::<u64>());
    let password = format!("pw-{}", rand::random::<u64>());
    let auth = TokenAuth {
        token: token.clone(),
        basic: credentials.then(|| ("puller".into(), password.clone())),
    };
    let up = Upstream::start(dir.path(), &[2 * MIB, 300], Some(auth));
    let plain = up.mirror_flags();
    let mut flags = plain.clone();
    if credentials {
        use base64::Engine as _;
        let config = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("puller:{password}"));
        let json = serde_json::json!({ "auths": { up.proxy.addr.to_string(): { "auth": auth } } });
        std::fs::write(&config, json.to_string()).unwrap();
        flags.push("--mirror-auth");
        flags.push(Box::leak(config.display().to_string().into_boxed_str()));
    }
    // The second daemon has no credentials.
    let fleet = TestCluster::start_with(BIN, 2, |i| {
        (
            if i == 0 { flags.clone() } else { plain.clone() },
            Vec::new(),
        )
    });
    let d0 = &fleet.daemons[0];

    pull(mirror_of(d0), ":v1", &fleet.path("pulled"));
    check_pulled(&fleet.path("pulled"), &up.image);
    assert!(
        up.proxy.refused() >= 1,
        "the registry never asked for a token"
    );
    assert!(up.proxy.tokens_issued() >= 1);
    assert!(up.proxy.authorized() >= 3);
    // Cached: not one token per request.
    assert!(up.proxy.tokens_issued() < up.proxy.authorized());
    if credentials {
        // Without them, the registry's refusal is the client's answer.
        let path = format!("/v2/{NAME}/manifests/v1");
        let r = request(mirror_of(&fleet.daemons[1]), "GET", &path, &[]);
        assert_eq!(r.status, 401);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    }
    for log in [
        d0.proc.log_text(),
        fleet.daemons[1].proc.log_text(),
        fleet.control.proc.log_text(),
    ] {
        assert!(
            !log.contains(&token) && !log.contains(&password),
            "a secret was logged"
        );
    }
}

#[test]
fn containerd_pulls_through_the_hosts_toml_nebula_mirror_wrote() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "containerd needs root: run the tests as root (sudo -E cargo test --test system mirror::)"
    );
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path(), &[2 * MIB, MIB + 1], None);
    let flags = up.mirror_flags();
    let fleet = TestCluster::start_with(BIN, 1, |_| (flags.clone(), Vec::new()));
    let d0 = &fleet.daemons[0];
    let registry = up.proxy.addr.to_string();
    let certs = dir.path().join("certs.d");

    let mut cmd = nebula();
    cmd.args(["mirror", "containerd", "--registry", &registry, "--dir"])
        .arg(&certs)
        .args(["--mirror", &format!("http://{}", mirror_of(d0))]);
    let out = run_bounded(cmd, Duration::from_secs(10));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hosts = std::fs::read_to_string(certs.join(&registry).join("hosts.toml")).unwrap();
    assert!(
        hosts.contains(&format!("[host.\"http://{}\"]", mirror_of(d0))),
        "{hosts}"
    );

    let containerd = Containerd::start(&dir.path().join("ctd"));
    let out = containerd.ctr(&[
        "images",
        "pull",
        "--snapshotter",
        "native",
        "--hosts-dir",
        certs.to_str().unwrap(),
        &format!("{registry}/{NAME}:v1"),
    ]);
    assert!(
        out.status.success(),
        "ctr pull failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ls = containerd.ctr(&["images", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains(&up.image.manifest_digest));
    // Every blob came through the mirror.
    assert!(
        metric(
            d0,
            "nebula_mirror_requests_total{kind=\"blob\",result=\"ok\"}"
        ) >= 3.0
    );
    assert!(
        metric(
            d0,
            "nebula_mirror_requests_total{kind=\"manifest\",result=\"ok\"}"
        ) >= 1.0
    );
    let content = containerd.ctr(&["content", "ls", "-q"]);
    let content = String::from_utf8_lossy(&content.stdout);
    for l in &up.image.layers {
        assert!(content.contains(&l.digest), "containerd lacks {}", l.digest);
    }
}

/// A containerd of its own: state, root and socket in a temporary directory,
/// the CRI plugin off; SIGKILLed when dropped.
struct Containerd {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  disable = true\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = match Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot start containerd ({e}); run tests/install-deps.sh (apt-get install -y containerd)"
            ),
        };
        let me = Self { child, socket };
        let up = wait_until(Duration::from_secs(20), || {
            me.ctr(&["version"]).status.success()
        });
        assert!(
            up,
            "containerd did not come up; log:\n{}",
            std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
        );
        me
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).args(args);
        run_bounded(cmd, Duration::from_secs(120))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn mirror_flags_refuse_bad_input_with_exit_code_2() {
    let cases: [&[&str]; 4] = [
        &[
            "mirror",
            "containerd",
            "--registry",
            "https://ghcr.io",
            "--print",
        ],
        &[
            "mirror",
            "containerd",
            "--registry",
            "ghcr.io",
            "--mirror",
            "127.0.0.1:5000/x",
            "--print",
        ],
        &[
            "daemon",
            "--registry-mirror",
            "127.0.0.1:0",
            "--mirror-upstream",
            "ftp://r.example",
        ],
        &[
            "daemon",
            "--registry-mirror",
            "127.0.0.1:0",
            "--mirror-auth",
            "/nonexistent/config.json",
        ],
    ];
    for args in cases {
        let mut cmd = nebula();
        cmd.args(args);
        let out = run_bounded(cmd, Duration::from_secs(10));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with("error:") && err.lines().count() <= 2,
            "{args:?}: {err}"
        );
    }
    let mut cmd = nebula();
    cmd.args(["mirror", "containerd", "--registry", "docker.io", "--print"]);
    let out = run_bounded(cmd, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("/etc/containerd/certs.d/docker.io/hosts.toml"),
        "{text}"
    );
    assert!(
        text.contains("server = \"https://registry-1.docker.io\""),
        "{text}"
    );
    assert!(
        text.contains("[host.\"http://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]"),
        "{text}"
    );
}
