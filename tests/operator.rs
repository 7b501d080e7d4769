//! The operator's view: the dashboard in a real headless Chromium (driven over WebDriver by
//! chromedriver), `outrider status` as a real process, `/metrics` checked by promtool, and
//! the shipped alert rules and Grafana dashboard checked against promtool and the metrics
//! a real Outrider exports.

mod support;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use outrider::app::App;
use serde_json::{Value, json};
use support::*;

/// A chromedriver on a free loopback port with one headless Chromium session.
struct Browser {
    driver: std::process::Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let mut driver = std::process::Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (Debian: chromium-driver)");
        let mut lines = lines_of(driver.stdout.take().unwrap());
        let port = within(async {
            while let Some(line) = lines.recv().await {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').parse::<u16>().unwrap();
                }
            }
            panic!("chromedriver exited before it listened");
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            _profile: profile,
        };
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,860",
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args }
        }}});
        let created = browser.call("POST", "/session", caps).await;
        browser.session = created["sessionId"].as_str().expect("a session").to_string();
        browser.call("POST", &browser.path("/timeouts"), json!({ "script": 20_000 })).await;
        browser
    }

    fn path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// One WebDriver command; its `value`.
    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let req = Request::builder().method(method).uri(format!("{}{path}", self.base));
        let req = match body {
            Value::Null => req.body(empty()),
            body => req.header("content-type", "application/json").body(full(Bytes::from(body.to_string()))),
        }
        .unwrap();
        let resp = within(client().request(req)).await.expect("chromedriver answers");
        let status = resp.status();
        let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {value}");
        value["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call("POST", &self.path("/url"), json!({ "url": url })).await;
    }

    async fn eval(&self, script: &str) -> Value {
        self.call("POST", &self.path("/execute/sync"), json!({ "script": script, "args": [] })).await
    }

    /// Resolves when `condition` (a JS expression) holds in the page, watching the DOM's
    /// mutations rather than polling; fails after the script timeout (20 s).
    async fn until(&self, condition: &str) {
        let script = format!(
            "const done = arguments[0]; const ok = () => {{ try {{ return !!({condition}); }} catch (e) {{ return false; }} }};\n\
             if (ok()) return done(true);\n\
             const seen = new MutationObserver(() => {{ if (ok()) {{ seen.disconnect(); done(true); }} }});\n\
             seen.observe(document.documentElement, {{ subtree: true, childList: true, attributes: true, characterData: true }});"
        );
        let value =
            self.call("POST", &self.path("/execute/async"), json!({ "script": script, "args": [] })).await;
        assert_eq!(value, json!(true), "{condition}");
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let png = self.call("GET", &self.path("/screenshot"), Value::Null).await;
        base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap()
    }

    async fn quit(self) {
        let path = format!("/session/{}", self.session);
        let req = Request::delete(format!("{}{path}", self.base)).body(empty()).unwrap();
        let _ = within(client().request(req)).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

async fn three_backends_one_failing_on_demand() -> (Vec<Backend>, Arc<std::sync::atomic::AtomicU16>, App) {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let (bad, status) = status_backend(200, "c").await;
    let outlier = "    outlier_detection:\n      consecutive_failures: 3\n      base_ejection: 300s\n      max_ejection_percent: 50\n\
                   \x20   retries:\n      max_attempts: 1\n";
    let yaml = one_service("http", outlier, &[(a.addr, 1), (b.addr, 1), (bad.addr, 1)]);
    let app = start_app(&yaml).await;
    (vec![a, b, bad], status, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_endpoints_and_an_ejection_live_in_a_real_browser() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let (bad, status) = status_backend(200, "c").await;
    let (broken, _) = status_backend(503, "broken").await;
    let yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\nshutdown:\n  drain_window: 0s\n\
         listeners:\n  - {{ name: front, bind: 127.0.0.1:0, service: svc }}\n  - {{ name: old, bind: 127.0.0.1:0, service: legacy }}\n\
         services:\n  svc:\n    outlier_detection: {{ consecutive_failures: 3, base_ejection: 300s, max_ejection_percent: 50 }}\n\
         \x20   retries: {{ max_attempts: 1 }}\n    endpoints:\n      - addr: {}\n        tags: {{ zone: a }}\n\
         \x20     - addr: {}\n        tags: {{ zone: b }}\n      - addr: {}\n        tags: {{ zone: c }}\n\
         \x20 legacy:\n    circuit_breaker: {{ failure_ratio: 0.5, min_requests: 5, open_for: 300s }}\n\
         \x20   outlier_detection: {{ consecutive_failures: 0 }}\n    retries: {{ max_attempts: 1 }}\n\
         \x20   endpoints:\n      - addr: {}\n",
        a.addr, b.addr, bad.addr, broken.addr
    );
    let app = start_app(&yaml).await;
    let backends = [a, b, bad];
    let front = format!("http://{}/", app.listener_addr("front").await.unwrap());
    assert_eq!(spread_ok(&front, 60, &[]).await.len(), 3, "every endpoint answers");
    let load = Load::start(&front, 1);
    let browser = Browser::start().await;
    browser.open(&format!("http://{}/", app.admin_addr())).await;

    let row = |addr: std::net::SocketAddr| {
        format!("document.querySelector('[data-service=\"svc\"] tr[data-endpoint=\"{addr}\"]')")
    };
    let all_active = backends
        .iter()
        .map(|b| format!("{}?.dataset.state === 'active'", row(b.addr)))
        .collect::<Vec<_>>()
        .join(" && ");
    browser.until(&all_active).await;
    assert_eq!(browser.eval("return document.title").await, json!("Outrider"));
    let header = browser.eval("return document.querySelector('[data-service=\"svc\"] h2').textContent").await;
    assert_eq!(header, json!("svc"));
    let rows = "return document.querySelectorAll('[data-service=\"svc\"] tr[data-endpoint]').length";
    assert_eq!(browser.eval(rows).await, json!(3));
    // The chart grows a point a second while the page stays open.
    let points = "document.querySelector('[data-chart=\"requests/s\"] polyline').getAttribute('points').split(' ').length";
    browser.until(&format!("{points} >= 3")).await;

    // No reload from here on: a marker set in the page must survive the ejection.
    browser.eval("window.__stillTheSamePage = true; return null").await;
    let updates_before = browser.eval("return Number(document.body.dataset.updates)").await.as_u64().unwrap();
    status.store(503, Ordering::SeqCst);
    let bad = backends[2].addr;
    let client = client();
    within(async {
        while app.balancer("svc").unwrap().describe().iter().all(|e| e.state != "ejected") {
            get(&client, &front).await;
        }
    })
    .await;
    browser.until(&format!("{}?.dataset.state === 'ejected'", row(bad))).await;
    let row_text = browser.eval(&format!("return {}.textContent", row(bad))).await;
    assert!(row_text.as_str().unwrap().contains("ejected"), "{row_text}");
    let style = browser
        .eval(&format!("return getComputedStyle({}.querySelector('td')).backgroundColor", row(bad)))
        .await;
    assert_eq!(style, json!("rgb(253, 236, 234)"), "an ejected endpoint's row is marked");
    assert_eq!(
        browser.eval("return window.__stillTheSamePage === true").await,
        json!(true),
        "the page was not reloaded"
    );
    let updates_after = browser.eval("return Number(document.body.dataset.updates)").await.as_u64().unwrap();
    assert!(updates_after > updates_before, "{updates_before} → {updates_after}");
    for other in &backends[..2] {
        browser.until(&format!("{}?.dataset.state === 'active'", row(other.addr))).await;
    }

    // An open breaker outlines its service and says so in its badge.
    let old = format!("http://{}/", app.listener_addr("old").await.unwrap());
    within(async {
        while app.metrics_text().contains("outrider_circuit_breaker_state{service=\"legacy\"} 0") {
            get(&client, &old).await;
        }
    })
    .await;
    let legacy = "document.querySelector('[data-service=\"legacy\"]')";
    browser.until(&format!("{legacy}.classList.contains('breaker-open')")).await;
    browser.until(&format!("{legacy}.querySelector('[data-breaker]').dataset.breaker === 'open'")).await;
    let badge = browser.eval(&format!("return {legacy}.querySelector('[data-breaker]').textContent")).await;
    assert_eq!(badge, json!("breaker open"));

    // A failed reload shows in a banner, with its error; the page stays the same page.
    assert!(!app.reload_text("services: [").await);
    browser.until("getComputedStyle(document.getElementById('reload-error')).display === 'block'").await;
    let banner = browser.eval("return document.getElementById('reload-error').textContent").await;
    assert!(banner.as_str().unwrap().starts_with("The last config reload failed"), "{banner}");
    assert_eq!(browser.eval("return document.getElementById('reload').textContent").await, json!("failed"));
    assert!(app.metrics_text().contains("outrider_config_last_reload_failed 1"));
    assert_eq!(browser.eval("return window.__stillTheSamePage === true").await, json!(true));

    load.stop().await;
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = std::env::var("OUTRIDER_SCREENSHOT")
        .unwrap_or_else(|_| format!("{}/dashboard.png", env!("CARGO_TARGET_TMPDIR")));
    std::fs::write(&path, png).unwrap();
    browser.quit().await;
}

/// Runs `outrider ARGS` to completion: (exit code, stdout, stderr).
async fn outrider(args: Vec<String>) -> (i32, String, String) {
    outrider_env(args, None).await
}

/// The same, with `OUTRIDER_ADMIN` set to `admin`.
async fn outrider_env(args: Vec<String>, admin: Option<String>) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_outrider"));
        command.args(args).env_remove("NO_COLOR").env_remove("OUTRIDER_ADMIN");
        if let Some(admin) = admin {
            command.env("OUTRIDER_ADMIN", admin);
        }
        command.output().unwrap()
    });
    let out = within(out).await.unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outrider_status_prints_services_and_endpoints_and_json_for_scripts() {
    let (backends, status, app) = three_backends_one_failing_on_demand().await;
    let front = format!("http://{}/", app.listener_addr("front").await.unwrap());
    status.store(503, Ordering::SeqCst);
    let client = client();
    within(async {
        while app.balancer("svc").unwrap().describe().iter().all(|e| e.state != "ejected") {
            get(&client, &front).await;
        }
    })
    .await;
    let admin = app.admin_addr().to_string();
    // The gauges the alert rules read count the same states.
    let metrics = app.metrics_text();
    for sample in [
        "outrider_endpoints{service=\"svc\",state=\"active\"} 2",
        "outrider_endpoints{service=\"svc\",state=\"ejected\"} 1",
        "outrider_endpoints{service=\"svc\",state=\"unhealthy\"} 0",
        "outrider_endpoints_ejected{service=\"svc\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == sample), "{sample}:\n{metrics}");
    }

    let (code, table, _) = outrider(vec!["status".into(), "--admin".into(), admin.clone()]).await;
    assert_eq!(code, 0);
    assert!(!table.contains('\x1b'), "no colour when stdout is not a terminal:\n{table}");
    assert!(table.starts_with("outrider 0.1.0 · config generation 1 · last reload ok · ready"), "{table}");
    let service = table.lines().find(|l| l.starts_with("svc ")).expect("a line for svc");
    assert!(service.contains("weighted_round_robin") && service.contains("2/3 active"), "{table}");
    for b in &backends[..2] {
        let line = table.lines().find(|l| l.contains(&b.addr.to_string())).unwrap();
        assert!(line.contains(" active "), "{line}");
    }
    let line = table.lines().find(|l| l.contains(&backends[2].addr.to_string())).unwrap();
    assert!(line.contains(" ejected "), "{line}");

    // The address from the environment, as a Pod spec would set it.
    let (code, json, _) = outrider_env(vec!["status".into(), "--json".into()], Some(admin.clone())).await;
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&json).unwrap();
    let svc = &json["services"][0];
    assert_eq!(svc["name"], "svc");
    assert!(svc.get("chart").is_none(), "no chart series for scripts");
    let states: Vec<&str> =
        svc["endpoints"].as_array().unwrap().iter().map(|e| e["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["ejected", "active", "active"], "endpoints that need attention first");
    assert!(svc["totals"]["requests"].as_u64().unwrap() >= 3, "{svc}");
    assert_eq!(svc["totals"]["ejections"], 1, "{svc}");

    // On a terminal (a pty from util-linux's `script`) the states are coloured, unless NO_COLOR.
    let on_terminal = |no_color: bool| {
        let command = format!("{} status --admin {admin}", env!("CARGO_BIN_EXE_outrider"));
        let mut script = std::process::Command::new("script");
        script.args(["-qec", &command, "/dev/null"]).env_remove("NO_COLOR");
        if no_color {
            script.env("NO_COLOR", "1");
        }
        tokio::task::spawn_blocking(move || script.output().expect("script runs (util-linux)"))
    };
    let coloured = String::from_utf8(within(on_terminal(false)).await.unwrap().stdout).unwrap();
    assert!(
        coloured.contains("\x1b[32mactive\x1b[0m") && coloured.contains("\x1b[31mejected\x1b[0m"),
        "{coloured}"
    );
    let plain = String::from_utf8(within(on_terminal(true)).await.unwrap().stdout).unwrap();
    assert!(plain.contains("ejected") && !plain.contains('\x1b'), "{plain}");

    // The defaults the README documents.
    let (code, help, _) = outrider(vec!["status".into(), "--help".into()]).await;
    assert_eq!(code, 0);
    let help = help.split_whitespace().collect::<Vec<_>>().join(" "); // unwrapped
    for default in ["[env: OUTRIDER_ADMIN=]", "[default: 127.0.0.1:9901]", "[default: 2s]"] {
        assert!(help.contains(default), "{default}:\n{help}");
    }

    // --watch refreshes until stopped.
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_outrider"))
        .args(["status", "--watch", "--interval", "100ms", "--admin", &admin])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = lines_of(watch.stdout.take().unwrap());
    within(async {
        let mut headers = 0;
        while headers < 2 {
            headers += usize::from(lines.recv().await.unwrap().starts_with("outrider 0.1.0"));
        }
    })
    .await;
    watch.kill().unwrap();
    watch.wait().unwrap();
}

#[tokio::test]
async fn outrider_status_says_clearly_when_the_admin_api_does_not_answer() {
    let dead = refused_addr().to_string();
    let (code, out, err) = outrider(vec!["status".into(), "--admin".into(), dead.clone()]).await;
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains(&format!("cannot read the admin API at http://{dead}")), "{err}");
    let (code, _, err) = outrider(vec!["status".into(), "--admin".into(), "not an address".into()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("is not host:port"), "{err}");
}

/// A backend that reports its load (ORCA text form), so `client_weighted` learns a weight.
async fn reporting_backend() -> Backend {
    Backend::start(|_req| async {
        let mut resp = text(200, "reporting");
        let report = http::HeaderValue::from_static("TEXT cpu_utilization=0.5, rps_fractional=10");
        resp.headers_mut().insert("endpoint-load-metrics", report);
        resp
    })
    .await
}

/// The sample names in exposition text (`name{...} value` or `name value`).
fn sample_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// Every metric name the alert rules and the Grafana dashboard query must be exported by a
/// real Outrider with every kind of discovery and TLS material loaded, and `/metrics` must
/// pass promtool's checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_grafana_query_only_metrics_outrider_exports_and_promtool_accepts_them() {
    use support::dns::Dnsmasq;
    use support::etcd::Etcd;
    use support::tls::Ca;
    let etcd = Etcd::start().await;
    let dns = Dnsmasq::start("127.0.0.1 inventory.test\n", 1, &[]).await;
    let ca = Ca::new("upstream");
    let client_cert = ca.leaf("client", &["outrider.test"]);
    let backend = reporting_backend().await;
    let yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\nshutdown:\n  drain_window: 0s\n\
         etcd:\n  endpoints: [{}]\n  dial_timeout: 500ms\n  request_timeout: 1s\n\
         dns:\n  servers: [\"{}\"]\n  timeout: 300ms\n  min_refresh: 100ms\n  max_refresh: 1s\n\
         listeners:\n  - name: front\n    bind: 127.0.0.1:0\n    service: svc\n\
         services:\n  svc:\n    load_balancing: client_weighted\n    client_weighted: {{ blackout: 0s, update_period: 100ms }}\n\
         \x20   endpoints:\n      - addr: {}\n\
         \x20 secure:\n    tls:\n      ca: {}\n      cert: {}\n      key: {}\n    endpoints:\n      - addr: {}\n\
         \x20 pay:\n    discovery: etcd\n\
         \x20 inventory:\n    discovery: dns\n    dns:\n      name: inventory.test\n      port: 80\n",
        etcd.url,
        dns.addr,
        backend.addr,
        ca.cert.display(),
        client_cert.cert.display(),
        client_cert.key.display(),
        refused_addr(),
    );
    let app = start_app(&yaml).await;
    let front = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let client = client();
    // Requests until the learned weight, the etcd watch and a DNS answer all show.
    let wanted = [
        "outrider_endpoint_learned_weight{",
        "outrider_discovery_watching{service=\"pay\"} 1",
        "outrider_dns_answers{service=\"inventory\"} 1",
    ];
    let text = within(async {
        loop {
            get(&client, &front).await;
            let text = app.metrics_text();
            if wanted.iter().all(|w| text.contains(w)) {
                return text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let exported = sample_names(&text);

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let grafana = std::fs::read_to_string(dir.join("grafana/outrider.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&grafana).expect("the Grafana dashboard is JSON");
    assert_eq!(dashboard["uid"], "outrider-sidecars");
    let alerts = std::fs::read_to_string(dir.join("prometheus/alerts.yaml")).unwrap();
    let name = regex_lite::Regex::new(r"outrider_[a-z0-9_]+").unwrap();
    for (file, content) in [("grafana/outrider.json", &grafana), ("prometheus/alerts.yaml", &alerts)] {
        let used: std::collections::BTreeSet<&str> = name.find_iter(content).map(|m| m.as_str()).collect();
        assert!(used.len() >= 8, "{file}: {used:?}");
        let missing: Vec<_> = used.iter().filter(|n| !exported.contains(**n)).collect();
        assert!(missing.is_empty(), "{file} queries metrics Outrider does not export: {missing:?}\n{text}");
    }
    // Every panel queries Prometheus through the dashboard's data source variable.
    for panel in dashboard["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
        assert!(!panel["targets"].as_array().unwrap().is_empty(), "{}", panel["title"]);
    }

    let check = promtool(&["check", "metrics"], Some(text)).await;
    assert!(check.0, "promtool check metrics:\n{}", check.1);
}

/// Runs promtool (Debian: prometheus) with `stdin`; (succeeded, stdout + stderr).
async fn promtool(args: &[&str], stdin: Option<String>) -> (bool, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let run = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new("promtool")
            .args(&args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool runs (Debian: prometheus)");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    });
    let out = within(run).await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test]
async fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "alerts.yaml"], None).await;
    assert!(ok && out.contains("SUCCESS: 10 rules found"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "alerts_test.yaml"], None).await;
    assert!(ok && out.contains("SUCCESS"), "{out}");
}

#[tokio::test]
async fn metrics_are_openmetrics_when_the_scrape_asks_and_prometheus_text_otherwise() {
    let backend = Backend::named("a").await;
    let app = start_app(&one_service("http", "", &[(backend.addr, 1)])).await;
    let front = format!("http://{}/", app.listener_addr("front").await.unwrap());
    get(&client(), &front).await;
    let url = format!("http://{}/metrics", app.admin_addr());
    let scrape = |accept: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut req = Request::get(url);
            if let Some(a) = accept {
                req = req.header("accept", a);
            }
            let resp = within(client().request(req.body(empty()).unwrap())).await.unwrap();
            let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
            let body = within(resp.into_body().collect()).await.unwrap().to_bytes();
            (ct, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    let (ct, text) = scrape(None).await;
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(text.contains("# TYPE outrider_requests_total counter\n"), "{text}");
    assert!(text.contains("# TYPE outrider_build_info gauge\n") && !text.contains("# EOF"), "{text}");
    // What Prometheus sends when it prefers OpenMetrics.
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                      text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    for accept in ["application/openmetrics-text; version=1.0.0", prometheus] {
        let (ct, text) = scrape(Some(accept)).await;
        assert_eq!(ct, "application/openmetrics-text; version=1.0.0; charset=utf-8");
        assert!(text.contains("# TYPE outrider_requests counter\n") && text.ends_with("# EOF\n"), "{text}");
    }
    let (ct, _) = scrape(Some("text/plain")).await;
    assert!(ct.starts_with("text/plain; version=0.0.4"));
    // The same samples either way.
    let (_, om) = scrape(Some("application/openmetrics-text")).await;
    let (_, plain) = scrape(None).await;
    assert_eq!(sample_names(&om), sample_names(&plain));
}
