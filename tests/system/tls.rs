//! TLS on every gRPC server and client (issue 10, row 8): certificates are
//! made here with rcgen, for 127.0.0.1 and localhost; each test starts real
//! `nebula` processes and checks what a user or an eavesdropper sees.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Output,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::{
    daemon::fetch_report,
    support::{
        BIN, Control, Daemon, TlsFiles, file_id, https_request, nebula, random_file, run_bounded,
        wait_output, wait_until,
    },
};

const MIB: usize = 1 << 20;
const JOIN: &str = "join-token-that-must-not-leak";
const ADMIN: &str = "admin-token-that-must-not-leak";

/// A certificate authority of one test, writing PEM files into its directory.
pub(crate) struct Pki {
    dir: PathBuf,
    name: &'static str,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub(crate) fn new(dir: &Path, name: &'static str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
        Self {
            dir: dir.to_owned(),
            name,
            ca,
        }
    }

    pub(crate) fn ca(&self) -> String {
        self.path("ca.pem")
    }

    fn path(&self, file: &str) -> String {
        let path = self.dir.join(format!("{}-{file}", self.name));
        path.to_str().unwrap().to_owned()
    }

    /// Issues `who` a certificate for 127.0.0.1 and localhost, for serving
    /// and for client auth alike; returns the certificate and key files.
    pub(crate) fn issue(&self, who: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, who);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (
            self.path(&format!("{who}.pem")),
            self.path(&format!("{who}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// `--tls-cert`, `--tls-key` and `--tls-ca` of a member named `who`.
    fn member(&self, who: &str) -> Vec<String> {
        let (cert, key) = self.issue(who);
        [
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &self.ca(),
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nebula-tls")
        .tempdir()
        .unwrap()
}

/// A TLS control plane with both tokens and `extra` flags.
fn control(dir: &Path, pki: &Pki, extra: &[&str]) -> Control {
    let mut args = pki.member("control");
    args.extend(["--join-token", JOIN, "--admin-token", ADMIN].map(str::to_owned));
    let mut args = strs(&args);
    args.extend(extra);
    let control = Control::start_with(BIN, dir, "127.0.0.1:0".parse().unwrap(), &args);
    assert!(control.url().starts_with("https://"), "{}", control.url());
    control
}

/// A daemon of `pki`'s fleet with the join token and `extra` flags.
fn daemon(dir: &Path, name: &str, control: &str, tls: &[String], extra: &[&str]) -> Daemon {
    let mut args = strs(tls);
    args.extend(["--join-token", JOIN]);
    args.extend(extra);
    Daemon::start(BIN, dir, name, control, &args, &[])
}

/// `nebula admin ARGS --control URL --admin-token … TLS`.
fn admin(url: &str, args: &[&str], tls: &[&str]) -> Output {
    let mut cmd = nebula();
    cmd.arg("admin")
        .args(args)
        .args(["--control", url, "--admin-token", ADMIN])
        .args(tls);
    run_bounded(cmd, Duration::from_secs(30))
}

/// The exit code and the one `error:` line of a failed command.
fn failure(out: &Output) -> (i32, String) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr:?}");
    (out.status.code().unwrap_or(-1), lines[0].to_owned())
}

/// The peers `admin peers --json` lists, with their states.
fn peer_states(url: &str, tls: &[&str]) -> Vec<String> {
    let out = admin(url, &["peers", "--json"], tls);
    assert!(
        out.status.success(),
        "admin peers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["state"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Waits until `d` has tried to register and been refused.
fn wait_refused(d: &Daemon) {
    let tried = wait_until(Duration::from_secs(20), || {
        d.status()["registration_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty())
    });
    assert!(
        tried,
        "the daemon tried to register; log:\n{}",
        d.proc.log_text()
    );
}

/// Fetches `id` on `to` and checks the bytes written hash to it.
fn fetch_and_check(to: &Daemon, id: &str, out: &Path) {
    let report = fetch_report(&wait_output(
        to.spawn_fetch(id, out),
        Duration::from_secs(120),
    ));
    assert_eq!(report["id"], id, "{report}");
    assert_eq!(
        file_id(out).to_string(),
        id,
        "the bytes written hash to the id"
    );
}

/// A TLS control plane and three TLS daemons: a blob spreads and every copy
/// hashes to its id; the control plane's probes pass over TLS.
#[test]
fn a_tls_fleet_fetches_the_same_bytes() {
    let dir = tempdir();
    let fleet = Pki::new(dir.path(), "fleet");
    let control = control(dir.path(), &fleet, &[]);
    let daemons: Vec<Daemon> = (0..3)
        .map(|i| {
            let name = format!("d{i}");
            daemon(dir.path(), &name, &control.url(), &fleet.member(&name), &[])
        })
        .collect();
    for d in &daemons {
        d.wait_registered();
    }
    let registered = Instant::now();
    let src = dir.path().join("blob.bin");
    let id = random_file(&src, 24 * MIB, 8).to_string();
    assert_eq!(daemons[0].add(&src), id);
    let fetches: Vec<_> = daemons[1..]
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let out = dir.path().join(format!("out{i}.bin"));
            (d.spawn_fetch(&id, &out), out)
        })
        .collect();
    for (child, out) in fetches {
        let report = fetch_report(&wait_output(child, Duration::from_secs(120)));
        assert_eq!(report["id"], id.as_str(), "{report}");
        assert_eq!(
            file_id(&out).to_string(),
            id,
            "the bytes written hash to the id"
        );
    }
    // Probes run every 500 ms; three failures would mark a peer unhealthy.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(registered.elapsed()));
    let ca = fleet.ca();
    let states = peer_states(&control.url(), &["--tls-ca", &ca]);
    assert_eq!(states, ["HEALTHY"; 3], "every peer passes its TLS probes");
    let metrics = control.proc.metrics();
    assert_eq!(metrics.get("nebula_control_probe_failures_total"), 0.0);
}

/// In a TLS fleet the HTTP endpoints (metrics and health, the live page,
/// the registry mirror) answer HTTPS with the fleet's certificates, and a
/// plaintext request gets no answer.
#[test]
fn the_http_endpoints_of_a_tls_fleet_answer_https_only() {
    let dir = tempdir();
    let fleet = Pki::new(dir.path(), "fleet");
    let control = control(dir.path(), &fleet, &[]);
    let d = daemon(
        dir.path(),
        "d0",
        &control.url(),
        &fleet.member("d0"),
        &["--registry-mirror", "127.0.0.1:0"],
    );
    d.wait_registered();
    let tls = TlsFiles {
        ca: PathBuf::from(fleet.ca()),
        identity: None,
    };
    let mirror = d.proc.mirror.expect("a mirror address");
    for (what, addr, path, says) in [
        (
            "control /metrics",
            control.proc.http(),
            "/metrics",
            "nebula_control_",
        ),
        ("control /healthz", control.proc.http(), "/healthz", "ok"),
        (
            "daemon /metrics",
            d.proc.http(),
            "/metrics",
            "nebula_chunks_verified",
        ),
        ("daemon /readyz", d.proc.http(), "/readyz", ""),
        ("mirror /v2/", mirror, "/v2/", ""),
    ] {
        let (status, body) = https_request(addr, &tls, "GET", path);
        assert_eq!(status, 200, "{what}: {body}");
        assert!(body.contains(says), "{what}: {body}");
        assert!(
            plaintext_unanswered(addr, path),
            "{what} answered a plaintext request"
        );
    }
    // The helpers the other tests use speak HTTPS to TLS processes.
    assert!(d.proc.metrics().has_family("nebula_chunks_verified"));
}

/// Sends `GET path` in plaintext to `addr`: true if no HTTP answer comes
/// back within 5 s (the server closes, or answers with TLS).
fn plaintext_unanswered(addr: SocketAddr, path: &str) -> bool {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    for _ in 0..16 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    !got.starts_with(b"HTTP/")
}

/// Bytes recorded by a [`Relay`], shared with its copying thread.
type Log = Arc<Mutex<Vec<u8>>>;

/// A TCP relay that records every byte it forwards, per connection and
/// direction: what an eavesdropper on the path sees.
struct Relay {
    addr: SocketAddr,
    /// Per connection: client to server, server to client.
    streams: Arc<Mutex<Vec<[Log; 2]>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let streams: Arc<Mutex<Vec<[Log; 2]>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (Arc::clone(&streams), Arc::clone(&stop));
        std::thread::spawn(move || {
            for conn in listener.incoming().take(64) {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                    continue;
                };
                let logs: [Log; 2] = Default::default();
                seen.lock().unwrap().push(logs.clone());
                let [up, down] = logs;
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), up);
                pipe(server, client, down);
            }
        });
        Self {
            addr,
            streams,
            stop,
        }
    }

    /// What crossed so far: per connection, each direction.
    fn captured(&self) -> Vec<[Vec<u8>; 2]> {
        self.streams
            .lock()
            .unwrap()
            .iter()
            .map(|logs| logs.each_ref().map(|l| l.lock().unwrap().clone()))
            .collect()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` to `to`, recording the bytes, until either side closes
/// (or a minute of silence).
fn pipe(mut from: TcpStream, mut to: TcpStream, log: Log) {
    std::thread::spawn(move || {
        let _ = from.set_read_timeout(Some(Duration::from_secs(60)));
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Walks `bytes` as TLS records (type 20–23, version 3.x, length) up to the
/// last whole record; returns the record types. Panics on anything else: a
/// byte in clear.
fn tls_records(bytes: &[u8]) -> Vec<u8> {
    let mut kinds = Vec::new();
    let mut at = 0;
    while at + 5 <= bytes.len() {
        let head = &bytes[at..at + 5];
        assert!(
            matches!(head[0], 20..=23) && head[1] == 3,
            "byte {at} does not start a TLS record: {head:02x?}"
        );
        kinds.push(head[0]);
        at += 5 + usize::from(u16::from_be_bytes([head[3], head[4]]));
    }
    kinds
}

/// What a server answers to the HTTP/2 client preface and an empty SETTINGS
/// frame: a plaintext gRPC server would send its own SETTINGS frame.
fn answer_to_h2(addr: SocketAddr) -> Vec<u8> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let mut answer = vec![0u8; 64];
    let n = conn.read(&mut answer).unwrap();
    answer.truncate(n);
    answer
}

/// Everything a daemon and its control plane say crosses as TLS records, the
/// join token never in clear; plaintext HTTP/2 clients get a TLS alert, and
/// the CLI over http:// says to use https://.
#[test]
fn nothing_crosses_a_tls_fleet_in_clear() {
    let dir = tempdir();
    let fleet = Pki::new(dir.path(), "fleet");
    let control = control(dir.path(), &fleet, &[]);
    let relay = Relay::start(control.addr);
    let via_relay = format!("https://{}", relay.addr);
    let d = daemon(dir.path(), "d0", &via_relay, &fleet.member("d0"), &[]);
    d.wait_registered();
    let streams = relay.captured();
    assert!(!streams.is_empty(), "the daemon dialed through the relay");
    for [up, down] in &streams {
        let (sent, received) = (tls_records(up), tls_records(down));
        assert_eq!(sent.first(), Some(&22), "a client hello first");
        assert!(sent.contains(&23), "the calls went as application data");
        assert!(received.contains(&23));
        for bytes in [up, down] {
            for secret in [JOIN, "authorization", "nebula.v1"] {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret} crossed in clear"
                );
            }
        }
    }
    for addr in [control.addr, d.addr] {
        let answer = answer_to_h2(addr);
        assert!(
            answer.len() >= 2 && answer[0] == 21 && answer[1] == 3,
            "{addr} answers plaintext HTTP/2 with a TLS alert, not a SETTINGS frame: {answer:02x?}"
        );
    }
    let plaintext = control.url().replacen("https://", "http://", 1);
    let (code, line) = failure(&admin(&plaintext, &["peers"], &[]));
    assert_eq!(code, 1, "{line}");
    assert!(
        line.contains("answers with TLS") && line.contains("https://"),
        "{line}"
    );
}

/// A daemon that trusts another CA cannot verify the control plane, never
/// registers, and `nebula status` says why; the fleet is unaffected.
#[test]
fn a_daemon_trusting_another_ca_cannot_register() {
    let dir = tempdir();
    let fleet = Pki::new(dir.path(), "fleet");
    let other = Pki::new(dir.path(), "other");
    let control = control(dir.path(), &fleet, &[]);
    let url = control.url();
    let honest = daemon(dir.path(), "honest", &url, &fleet.member("honest"), &[]);
    let rogue = daemon(dir.path(), "rogue", &url, &other.member("rogue"), &[]);
    honest.wait_registered();
    wait_refused(&rogue);
    let (code, line) = failure(&rogue.cli(&["status"]));
    assert_eq!(code, 1, "{line}");
    assert!(
        line.contains("UnknownIssuer") && line.contains("not signed by the CA given with --tls-ca"),
        "{line}"
    );
    let ca = fleet.ca();
    assert_eq!(peer_states(&url, &["--tls-ca", &ca]), ["HEALTHY"]);
}

/// Under `--tls-client-auth`, the control plane and the daemons refuse
/// clients without a certificate of the fleet CA, and the fleet works.
#[test]
fn client_auth_admits_only_fleet_certificates() {
    let dir = tempdir();
    let fleet = Pki::new(dir.path(), "fleet");
    let other = Pki::new(dir.path(), "other");
    let control = control(dir.path(), &fleet, &["--tls-client-auth"]);
    let url = control.url();
    let mtls = ["--tls-client-auth"];
    let d0 = daemon(dir.path(), "d0", &url, &fleet.member("d0"), &mtls);
    let d1 = daemon(dir.path(), "d1", &url, &fleet.member("d1"), &mtls);
    // Trusts the fleet CA but shows another CA's certificate.
    let (rogue_cert, rogue_key) = other.issue("rogue");
    let ca = fleet.ca();
    let rogue_tls = [
        "--tls-cert",
        &rogue_cert,
        "--tls-key",
        &rogue_key,
        "--tls-ca",
        &ca,
    ];
    let rogue_tls: Vec<String> = rogue_tls.map(str::to_owned).to_vec();
    let rogue = daemon(dir.path(), "rogue", &url, &rogue_tls, &mtls);
    d0.wait_registered();
    d1.wait_registered();
    let registered = Instant::now();

    let src = dir.path().join("blob.bin");
    let id = random_file(&src, 8 * MIB, 3).to_string();
    assert_eq!(d0.add(&src), id);
    fetch_and_check(&d1, &id, &dir.path().join("out.bin"));

    let (admin_cert, admin_key) = fleet.issue("operator");
    let with_cert = [
        "--tls-ca",
        &ca,
        "--tls-cert",
        &admin_cert,
        "--tls-key",
        &admin_key,
    ];
    let rogue_cert_flags = [
        "--tls-ca",
        &ca,
        "--tls-cert",
        &rogue_cert,
        "--tls-key",
        &rogue_key,
    ];
    for server in [url.clone(), format!("https://{}", d0.addr)] {
        let (code, line) = failure(&admin(&server, &["peers"], &["--tls-ca", &ca]));
        assert_eq!(code, 1, "{line}");
        assert!(line.contains("client certificate"), "{server}: {line}");
        let (code, line) = failure(&admin(&server, &["peers"], &rogue_cert_flags));
        assert_eq!(code, 1, "{server} refuses another CA's certificate: {line}");
    }
    // With a fleet certificate the daemon's port gets as far as gRPC: it
    // answers that it is no control plane.
    let (_, line) = failure(&admin(
        &format!("https://{}", d0.addr),
        &["peers"],
        &with_cert,
    ));
    assert!(line.contains("not a Nebula control plane"), "{line}");

    wait_refused(&rogue);
    assert!(!rogue.cli(&["status"]).status.success());
    // The prober shows the control plane's certificate to the daemons.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(registered.elapsed()));
    assert_eq!(peer_states(&url, &with_cert), ["HEALTHY"; 2]);
    assert_eq!(
        control
            .proc
            .metrics()
            .get("nebula_control_probe_failures_total"),
        0.0
    );
}

/// Wrong TLS set-ups are refused before any network call, as one line with
/// exit code 2.
#[test]
fn tls_misconfigurations_are_usage_errors() {
    let dir = tempdir();
    let fleet = Pki::new(dir.path(), "fleet");
    let other = Pki::new(dir.path(), "other");
    let (cert, key) = fleet.issue("d");
    let (_, other_key) = other.issue("x");
    let ca = fleet.ca();
    let store = dir.path().join("store");
    let store = store.display();
    let socket = dir.path().join("none.sock");
    let socket = socket.display();
    let id = "0".repeat(64);
    // Nothing listens on port 9: a call would fail with exit 1, not 2.
    let https = "https://127.0.0.1:9";
    let admin = format!("admin peers --control {https}");
    let cases = [
        (admin.clone(), "--tls-ca"),
        (
            format!("daemon --store {store} --listen 127.0.0.1:0 --control {https}"),
            "--tls-ca",
        ),
        (
            format!("fetch {id} --socket {socket} --store {store} --control {https}"),
            "--tls-ca",
        ),
        (
            format!("admin peers --control http://127.0.0.1:9 --tls-ca {ca}"),
            "use https://",
        ),
        (
            format!("{admin} --tls-ca /nonexistent.pem"),
            "cannot read --tls-ca",
        ),
        (
            format!("{admin} --tls-ca {key}"),
            "no PEM-encoded CA certificate",
        ),
        (
            format!("{admin} --tls-ca {ca} --tls-key {key}"),
            "--tls-key needs --tls-cert",
        ),
        (
            format!("{admin} --tls-ca {ca} --tls-cert {cert} --tls-key {other_key}"),
            "does not match",
        ),
        (
            format!("control --listen 127.0.0.1:0 --tls-cert {cert} --tls-ca {ca}"),
            "missing: --tls-key",
        ),
        (
            "control --listen 127.0.0.1:0 --tls-client-auth".to_owned(),
            "--tls-client-auth needs",
        ),
    ];
    // Temporary paths hold no spaces.
    for (args, says) in cases {
        let mut cmd = nebula();
        cmd.args(args.split_whitespace());
        let (code, line) = failure(&run_bounded(cmd, Duration::from_secs(30)));
        assert_eq!(code, 2, "{args:?}: {line}");
        assert!(
            line.contains(says),
            "{args:?}: {line:?} should say {says:?}"
        );
    }
}
