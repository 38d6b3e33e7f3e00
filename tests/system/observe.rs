//! Observability against real clusters: `/metrics` figures checked against
//! what happened, the Grafana dashboard's queries against a real scrape, the
//! live page's data and its guard, and the page itself in headless Chromium.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    daemon::{fetch_report, sum_sources},
    support::{
        BIN, Control, Metrics, Proc, TestCluster, file_id, http_request, nebula, random_file,
        wait_output, wait_until,
    },
};

const MIB: usize = 1 << 20;

fn peer_id(d: &crate::support::Daemon) -> String {
    d.status()["peer_id"].as_str().unwrap().to_owned()
}

/// A seed and three fetchers: every figure matches the transfer; then a
/// killed daemon moves from healthy to unhealthy or expired.
#[test]
fn metrics_match_a_real_swarm_fetch_and_a_kill() {
    let mut c = TestCluster::start(BIN, 4);
    let size = 24 * MIB;
    let src = c.path("src.bin");
    let id = random_file(&src, size, 31).to_string();
    c.daemons[0].add(&src);
    let seed = peer_id(&c.daemons[0]);
    assert!(c.wait_providers(&id, 1));

    let fetches: Vec<_> = (1..4)
        .map(|i| c.daemons[i].spawn_fetch(&id, &c.path(&format!("out{i}.bin"))))
        .collect();
    let reports: Vec<_> = fetches
        .into_iter()
        .map(|f| fetch_report(&wait_output(f, Duration::from_secs(120))))
        .collect();

    let chunks = size.div_ceil(MIB) as f64;
    let mut received_total = 0.0;
    let mut from_seed = 0u64;
    for (n, report) in reports.iter().enumerate() {
        let i = n + 1;
        assert_eq!(file_id(&c.path(&format!("out{i}.bin"))).to_string(), id);
        assert_eq!(sum_sources(report), size as u64);
        from_seed += report["sources"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["peer_id"] == seed.as_str())
            .map(|s| s["bytes"].as_u64().unwrap())
            .sum::<u64>();
        let m = c.daemons[i].proc.metrics();
        let received = m.get(r#"nebula_received_bytes_total{source="peer"}"#);
        assert_eq!(received, size as f64, "daemon {i}: bytes from peers");
        assert_eq!(
            m.get(r#"nebula_received_bytes_total{source="origin"}"#),
            0.0
        );
        assert_eq!(m.get("nebula_chunks_verified_total"), chunks);
        assert_eq!(m.get("nebula_chunks_rejected_total"), 0.0);
        assert_eq!(m.get(r#"nebula_fetches_total{result="ok"}"#), 1.0);
        assert_eq!(m.get("nebula_fetch_duration_seconds_count"), 1.0);
        assert_eq!(m.get("nebula_chunk_latency_seconds_count"), chunks);
        assert_eq!(
            m.get(r#"nebula_store_bytes{state="complete"}"#),
            size as f64
        );
        assert_eq!(m.get(r#"nebula_store_blobs{state="complete"}"#), 1.0);
        received_total += received;
    }
    // What the fetchers got from each other is what they did not get from
    // the seed, and somebody served every byte of it.
    let served: Vec<f64> = c
        .daemons
        .iter()
        .map(|d| d.proc.metrics().get("nebula_served_bytes_total"))
        .collect();
    assert!(
        served[0] >= from_seed as f64,
        "seed served {} < {from_seed} received from it",
        served[0]
    );
    let among_fetchers: f64 = served[1..].iter().sum();
    assert!(
        among_fetchers >= received_total - from_seed as f64,
        "fetchers served {among_fetchers}, yet {} came from fetchers",
        received_total - from_seed as f64
    );
    let served_total: f64 = served.iter().sum();
    assert!(served_total >= received_total && served_total <= 1.5 * received_total);
    // The seed fetched nothing; its one blob was added.
    let m = c.daemons[0].proc.metrics();
    assert_eq!(m.get(r#"nebula_received_bytes_total{source="peer"}"#), 0.0);
    assert_eq!(m.get(r#"nebula_fetches_total{result="ok"}"#), 0.0);

    let cp = c.control.proc.metrics();
    assert_eq!(cp.get(r#"nebula_control_peers{state="healthy"}"#), 4.0);
    assert_eq!(cp.get("nebula_control_blobs"), 1.0);
    assert!(
        cp.get(r#"nebula_control_rpcs_total{method="ControlPlane/FindProviders",code="OK"}"#)
            >= 3.0
    );
    assert!(
        cp.get(r#"nebula_control_rpcs_total{method="ControlPlane/Register",code="OK"}"#) >= 4.0
    );
    assert!(
        cp.get(r#"nebula_control_rpc_duration_seconds_count{method="ControlPlane/Heartbeat"}"#)
            >= 1.0
    );
    let (status, _) = http_request(c.daemons[1].proc.http(), "GET", "/readyz", None, &[]);
    assert_eq!(status, 200);
    let (status, _) = http_request(c.control.proc.http(), "GET", "/healthz", None, &[]);
    assert_eq!(status, 200);

    // Kill a daemon: the fleet gauges follow, and the prober's failures count.
    c.daemons[3].proc.kill();
    let mut last = Metrics::default();
    let moved = wait_until(Duration::from_secs(20), || {
        last = c.control.proc.metrics();
        last.get(r#"nebula_control_peers{state="healthy"}"#) == 3.0
            && last.get("nebula_control_probe_failures_total") >= 1.0
    });
    assert!(moved, "control plane never saw the kill: {:?}", last.0);
    // The lease lapses (3 s in tests) and the sweeper counts it.
    let expired = wait_until(Duration::from_secs(20), || {
        last = c.control.proc.metrics();
        last.get("nebula_control_lease_expiries_total") >= 1.0
    });
    assert!(expired, "lease expiry not counted: {:?}", last.0);
    assert_eq!(last.get(r#"nebula_control_peers{state="unhealthy"}"#), 0.0);
    c.daemons.truncate(3);
}

/// Every metric the Grafana dashboard queries exists in a real scrape.
#[test]
fn every_dashboard_metric_exists_in_a_scrape() {
    let dashboard = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/nebula.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 6, "dashboard has {} queries", exprs.len());
    let mut names: Vec<String> = exprs
        .iter()
        .flat_map(|e| metric_names(e))
        .collect::<Vec<_>>();
    names.sort();
    names.dedup();
    assert!(names.len() >= 8, "dashboard queries few metrics: {names:?}");

    let c = TestCluster::start(BIN, 2);
    let src = c.path("src.bin");
    let id = random_file(&src, 3 * MIB, 32).to_string();
    c.daemons[0].add(&src);
    assert!(c.wait_providers(&id, 1));
    fetch_report(&wait_output(
        c.daemons[1].spawn_fetch(&id, &c.path("out.bin")),
        Duration::from_secs(60),
    ));
    let daemon = c.daemons[1].proc.metrics();
    let control = c.control.proc.metrics();
    for name in &names {
        assert!(
            daemon.has_family(name) || control.has_family(name),
            "the dashboard queries {name}, which no scrape has"
        );
    }
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The `nebula_…` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("nebula_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// A control plane with an admin token, and its HTTP endpoint.
fn guarded_control(dir: &Path, token: &str) -> Proc {
    let mut cmd = nebula();
    cmd.args([
        "control",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--admin-token",
        token,
        "--log-format",
        "json",
    ])
    .env("RUST_LOG", "debug");
    Proc::spawn(cmd, dir.join("control.log")).0
}

/// The page is open; its data answers only with the admin token; the token
/// never reaches the log; JSON logs are one object per line.
#[test]
fn live_page_data_needs_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let control = guarded_control(dir.path(), "pagesecret");
    let http = control.http();
    let (status, page) = http_request(http, "GET", "/", None, &[]);
    assert_eq!(status, 200);
    assert!(page.contains("<title>Nebula Stream"), "{page}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page loads nothing from elsewhere"
    );
    let (status, body) = http_request(http, "GET", "/api/peers", None, &[]);
    assert_eq!(status, 401, "{body}");
    let (status, _) = http_request(
        http,
        "GET",
        "/api/peers",
        None,
        &[("Authorization", "Bearer wrong")],
    );
    assert_eq!(status, 401);
    let bearer = [("Authorization", "Bearer pagesecret")];
    let (status, body) = http_request(http, "GET", "/api/peers", None, &bearer);
    assert_eq!(status, 200, "{body}");
    let peers: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(peers["peers"].as_array().unwrap().len(), 0);
    let (status, _) = http_request(
        http,
        "GET",
        &format!("/api/swarm/{}", "ab".repeat(32)),
        None,
        &bearer,
    );
    assert_eq!(status, 404);
    let (status, body) = http_request(http, "GET", "/api/swarm/nothex", None, &bearer);
    assert_eq!(status, 400, "{body}");
    // Scrapers need no token; readiness answers.
    let (status, _) = http_request(http, "GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    let (status, _) = http_request(http, "GET", "/readyz", None, &[]);
    assert_eq!(status, 200);

    // Without an admin token, the data is off on TCP for every caller (any
    // local user can reach a loopback port); the page still loads.
    let open = Control::start(BIN, dir.path());
    let open_http = open.proc.http();
    assert_eq!(http_request(open_http, "GET", "/", None, &[]).0, 200);
    for path in [
        "/api/peers".to_owned(),
        format!("/api/swarm/{}", "ab".repeat(32)),
    ] {
        for headers in [&[][..], &[("Authorization", "Bearer guess")][..]] {
            let (status, body) = http_request(open_http, "GET", &path, None, headers);
            assert_eq!(status, 403, "{path}: {body}");
            assert!(body.contains("--admin-token"), "{body}");
        }
    }

    let log = control.log_text();
    assert!(
        !log.contains("pagesecret"),
        "the admin token reached the log"
    );
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}

/// A fetch's log lines carry its `fetch` span with the blob; a serving
/// stream's carry the `exchange` span with the peer.
#[test]
fn json_logs_carry_fetch_and_exchange_spans() {
    let c = TestCluster::start_with(BIN, 2, |_| {
        (
            vec!["--log-format", "json"],
            vec![("RUST_LOG", "info,nebula_peer=debug")],
        )
    });
    let src = c.path("src.bin");
    let id = random_file(&src, 2 * MIB, 33).to_string();
    c.daemons[0].add(&src);
    assert!(c.wait_providers(&id, 1));
    // A blob nobody has fails, with a WARN line in its fetch span.
    let missing = "cd".repeat(32);
    let out = c.daemons[1].cli(&["fetch", &missing, "--timeout", "1s"]);
    assert!(!out.status.success());
    fetch_report(&wait_output(
        c.daemons[1].spawn_fetch(&id, &c.path("out.bin")),
        Duration::from_secs(60),
    ));
    let fetcher = parse_json_log(&c.daemons[1].proc.log_text());
    let failed = fetcher
        .iter()
        .find(|v| v["fields"]["message"] == "fetch failed")
        .expect("no `fetch failed` line");
    assert_eq!(failed["level"], "WARN");
    assert_eq!(failed["span"]["name"], "fetch");
    assert_eq!(failed["span"]["blob"], missing.as_str());
    let fetcher_id = peer_id(&c.daemons[1]);
    let wait = wait_until(Duration::from_secs(10), || {
        parse_json_log(&c.daemons[0].proc.log_text())
            .iter()
            .any(|v| v["span"]["name"] == "exchange" && v["span"]["peer"] == fetcher_id.as_str())
    });
    assert!(
        wait,
        "no log line in an exchange span naming the fetching peer"
    );
}

fn parse_json_log(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A chromedriver process with one headless Chromium session; both end
/// when dropped.
struct Browser {
    driver: std::process::Child,
    addr: SocketAddr,
    session: String,
}

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

impl Browser {
    fn start(dir: &Path) -> Self {
        for program in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(program).exists(),
                "{program} is missing: install it with `apt-get install -y chromium chromium-driver` \
                 (the README's test command does)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::fs::File::create(dir.join("chromedriver.log")).unwrap();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut browser = Self {
            driver,
            addr,
            session: String::new(),
        };
        let up = wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(addr).is_ok()
                && http_request(addr, "GET", "/status", None, &[]).0 == 200
        });
        assert!(up, "chromedriver did not start");
        let profile = dir.join("chromium-profile");
        let caps = serde_json::json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        "--window-size=1280,900",
                        format!("--user-data-dir={}", profile.display()),
                    ]
                }
            }}
        });
        let v = browser.call("POST", "/session", Some(caps));
        browser.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_owned();
        browser
    }

    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
        let body = body.map(|b| b.to_string());
        let (status, text) = http_request(self.addr, method, path, body.as_deref(), &[]);
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: {status} {e}: {text}"));
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn open(&self, url: &str) {
        let path = format!("/session/{}/url", self.session);
        self.call("POST", &path, Some(serde_json::json!({ "url": url })));
    }

    fn eval(&self, script: &str) -> serde_json::Value {
        let path = format!("/session/{}/execute/sync", self.session);
        self.call(
            "POST",
            &path,
            Some(serde_json::json!({ "script": script, "args": [] })),
        )
    }

    fn screenshot(&self, to: &Path) {
        use base64::Engine as _;
        let path = format!("/session/{}/screenshot", self.session);
        let png = self.call("GET", &path, None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(to, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ =
                std::panic::catch_unwind(|| http_request(self.addr, "DELETE", &path, None, &[]));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// What the page shows: peers in the fleet table, swarm rows, filled cells.
fn page_state(browser: &Browser) -> (Vec<String>, Vec<String>, u64) {
    let v = browser.eval(
        "return {
            fleet: [...document.querySelectorAll('#peers tbody tr')].map(r => r.dataset.peer),
            rows: [...document.querySelectorAll('#swarm .row')].map(r => r.dataset.peer),
            filled: document.querySelectorAll('#swarm .cell.on').length,
        };",
    );
    let list = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    (
        list("fleet"),
        list("rows"),
        v["filled"].as_u64().unwrap_or(0),
    )
}

/// Headless Chromium loads the live page during a real, rate-limited swarm
/// fetch: it lists every peer, and the chunk map fills between two reads.
#[test]
fn live_page_shows_a_swarm_filling_in_a_real_browser() {
    // The page's data needs the admin token (without one it is off on TCP).
    let c = TestCluster::start_flagged(BIN, 4, &["--admin-token", "browsertoken"], |_| {
        (vec!["--upload-limit", "4MiB/s"], vec![])
    });
    let size = 64 * MIB;
    let src = c.path("src.bin");
    let id = random_file(&src, size, 34).to_string();
    c.daemons[0].add(&src);
    assert!(c.wait_providers(&id, 1));
    let peers: Vec<String> = c.daemons.iter().map(peer_id).collect();

    let browser = Browser::start(c.dir.path());
    let fetches: Vec<_> = (1..4)
        .map(|i| c.daemons[i].spawn_fetch(&id, &c.path(&format!("out{i}.bin"))))
        .collect();
    browser.open(&format!("http://{}/#{id}", c.control.proc.http()));
    // The operator types the token into the page's field.
    browser.eval(
        "const t = document.getElementById('token');
         t.value = 'browsertoken';
         t.dispatchEvent(new Event('change'));
         return true;",
    );

    let mut first = (Vec::new(), Vec::new(), 0);
    let shown = wait_until(Duration::from_secs(20), || {
        first = page_state(&browser);
        peers
            .iter()
            .all(|p| first.0.contains(p) && first.1.contains(p))
            && first.2 > 0
    });
    assert!(
        shown,
        "the page never showed every peer and a chunk: {first:?}"
    );
    // The seed's row alone fills 64 cells; fetchers add theirs as chunks land.
    let total = (peers.len() * size / MIB) as u64;
    assert!(
        first.2 < total,
        "everything was already done at the first read"
    );
    let mut second = first.clone();
    let grew = wait_until(Duration::from_secs(20), || {
        second = page_state(&browser);
        second.2 > first.2
    });
    assert!(
        grew,
        "filled cells did not grow: {} then {}",
        first.2, second.2
    );
    let shot = c.dir.path().join("live-page.png");
    browser.screenshot(&shot);
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);
    if let Some(keep) = std::env::var_os("NEBULA_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, PathBuf::from(keep)).unwrap();
    }
    println!("filled cells: {} then {} of {total}", first.2, second.2);

    for (n, f) in fetches.into_iter().enumerate() {
        fetch_report(&wait_output(f, Duration::from_secs(180)));
        assert_eq!(
            file_id(&c.path(&format!("out{}.bin", n + 1))).to_string(),
            id
        );
    }
    // Once every copy is complete, the page fills every cell.
    let mut last = second;
    let full = wait_until(Duration::from_secs(10), || {
        last = page_state(&browser);
        last.2 == total
    });
    assert!(full, "the page did not fill: {} of {total}", last.2);
}
