//! Live overlays from a real etcd: weights and draining, settings, invalid overlays, delete,
//! etcd down, and the `outrider overlay` command.

mod support;

use std::time::{Duration, Instant};

use outrider::app::App;
use support::etcd::Etcd;
use support::*;

const KEY: &str = "outrider/overlay/pay";

fn config(etcd: &Etcd, a: &Backend, b: &Backend) -> String {
    format!(
        "admin:\n  bind: 127.0.0.1:0\nshutdown:\n  drain_window: 0s\n\
         etcd:\n  endpoints: [{}]\n  dial_timeout: 500ms\n  request_timeout: 1s\n  overlay_prefix: outrider/overlay/\n\
         listeners:\n  - name: front\n    bind: 127.0.0.1:0\n    service: pay\n\
         services:\n  pay:\n    endpoints:\n      - addr: {}\n      - addr: {}\n",
        etcd.url, a.addr, b.addr
    )
}

/// Sends `n` requests; how many each backend answered, as (a, b).
async fn split(app: &App, n: usize) -> (usize, usize) {
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let client = client();
    let (mut a, mut b) = (0, 0);
    for _ in 0..n {
        let (status, _, body) = get(&client, &url).await;
        assert_eq!(status, 200, "{body}");
        if body == "a" { a += 1 } else { b += 1 }
    }
    (a, b)
}

fn weights(app: &App) -> Vec<(u32, &'static str)> {
    app.balancer("pay").unwrap().describe().iter().map(|e| (e.weight, e.state)).collect()
}

/// Waits until the endpoints' (weight, state) are `want`; how long that took.
async fn until_weights(app: &App, want: &[(u32, &str)]) -> Duration {
    let started = Instant::now();
    within(async {
        while weights(app) != want {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    started.elapsed()
}

fn generation_of(app: &App) -> u64 {
    app.status().borrow().generation
}

async fn admin_config(app: &App) -> serde_json::Value {
    let (_, _, body) = get(&client(), &format!("http://{}/config", app.admin_addr())).await;
    serde_json::from_str(&body).unwrap()
}

/// Waits until `/config` shows an error containing `needle` for `service`'s overlay.
async fn overlay_error(app: &App, service: &str, needle: &str) -> String {
    within(async {
        loop {
            let c = admin_config(app).await;
            if let Some(e) =
                c["overlays"]["services"][service]["error"].as_str().filter(|e| e.contains(needle))
            {
                return e.to_string();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlay_moves_the_split_within_a_second_and_delete_restores_the_file() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let app = start_app(&config(&etcd, &a, &b)).await;
    assert_eq!(split(&app, 10).await, (5, 5));
    let generation = generation_of(&app);

    let mut took = Vec::new();
    let started = Instant::now();
    kv.put(KEY, format!("weights:\n  \"{}\": 0\n", a.addr), None).await.unwrap();
    until_weights(&app, &[(0, "draining"), (1, "active")]).await;
    took.push(started.elapsed());
    assert_eq!(split(&app, 10).await, (0, 10), "a drained endpoint gets nothing");
    assert!(generation_of(&app) > generation, "an applied overlay is a new generation");

    let started = Instant::now();
    kv.put(
        KEY,
        format!(r#"{{"weights": {{"{}": 3}}, "load_balancing": "weighted_round_robin"}}"#, a.addr),
        None,
    )
    .await
    .unwrap();
    until_weights(&app, &[(3, "active"), (1, "active")]).await;
    took.push(started.elapsed());
    assert_eq!(split(&app, 40).await, (30, 10));
    let overlays = &admin_config(&app).await["overlays"];
    let view = &overlays["services"]["pay"];
    assert_eq!(view["applied"], true, "{overlays}");
    let overrides: Vec<_> =
        view["overrides"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let overrides: std::collections::BTreeSet<String> = overrides.into_iter().map(String::from).collect();
    assert_eq!(overrides, [format!("weights.{}", a.addr), "load_balancing".to_string()].into(), "{view}");

    let started = Instant::now();
    kv.delete(KEY, None).await.unwrap();
    until_weights(&app, &[(1, "active"), (1, "active")]).await;
    took.push(started.elapsed());
    assert_eq!(split(&app, 10).await, (5, 5));
    println!("overlay put/delete -> applied: {took:?}");
    assert!(took.iter().all(|t| *t < Duration::from_secs(1)), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_overlay_changes_nothing_and_is_reported_with_its_key_and_line() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let app = start_app(&config(&etcd, &a, &b)).await;
    kv.put(KEY, "retries:\n  max_attempts: 3\n", None).await.unwrap();
    within(async {
        while app.config().services["pay"].resilience.retries.max_attempts != 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let generation = generation_of(&app);

    // Valid YAML, invalid values: the file's messages, located in the overlay.
    kv.put(KEY, "retries:\n  max_attempts: 3\ntimeouts:\n  connect: soon\n", None).await.unwrap();
    let error = overlay_error(&app, "pay", "").await;
    assert!(
        error.contains("etcd key outrider/overlay/pay: timeouts.connect (line 4, column 3)")
            && error.contains("not a duration"),
        "{error}"
    );
    assert_eq!(generation_of(&app), generation, "nothing applied");
    assert_eq!(
        app.config().services["pay"].resilience.retries.max_attempts,
        3,
        "the last good overlay stays"
    );
    let (_, _, metrics) = get(&client(), &format!("http://{}/metrics", app.admin_addr())).await;
    assert!(metrics.contains("outrider_overlay_refused_total 1"), "{metrics}");

    // Unknown settings and other services' problems are refused the same way.
    kv.put(KEY, "colour: blue\n", None).await.unwrap();
    overlay_error(&app, "pay", "colour").await;
    kv.put("outrider/overlay/nosuch", "load_balancing: least_request\n", None).await.unwrap();
    overlay_error(&app, "nosuch", "no service \"nosuch\"").await;
    assert_eq!(split(&app, 10).await, (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_keeps_the_overlay_across_a_file_reload() {
    let mut etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let yaml = config(&etcd, &a, &b);
    let app = start_app(&yaml).await;
    kv.put(KEY, format!("weights:\n  \"{}\": 0\n", a.addr), None).await.unwrap();
    until_weights(&app, &[(0, "draining"), (1, "active")]).await;

    etcd.kill();
    // A file edit while etcd is away: the overlay still lies over the new file.
    assert!(app.reload_text(&yaml.replace("drain_window: 0s", "drain_window: 1s")).await);
    assert_eq!(weights(&app), [(0, "draining"), (1, "active")]);
    assert_eq!(split(&app, 10).await, (0, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overlay_command_validates_before_it_writes() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrider.yaml");
    std::fs::write(&path, config(&etcd, &a, &b)).unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_outrider"))
            .arg("overlay")
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };
    let drain = format!("{}=0", a.addr);
    let (code, out) = cli(&["set", "pay", "--weight", &drain, "--set", "retries.max_attempts=3"]);
    assert_eq!(code, Some(0), "{out}");
    let stored = kv.get(KEY, None).await.unwrap();
    let doc: serde_json::Value = serde_json::from_slice(stored.kvs()[0].value()).unwrap();
    assert_eq!(doc["weights"][a.addr.to_string()], 0);
    assert_eq!(doc["retries"]["max_attempts"], 3);

    let (code, out) = cli(&["set", "pay", "--set", "retries.max_attempts=99"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("not written")
            && out.contains("retries.max_attempts")
            && out.contains("between 1 and 10"),
        "{out}"
    );
    let unchanged = kv.get(KEY, None).await.unwrap();
    assert_eq!(unchanged.kvs()[0].value(), stored.kvs()[0].value(), "a refused overlay is not written");

    let (code, out) = cli(&["set", "pay", "--unset", &format!("weights.{}", a.addr)]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = cli(&["get", "pay"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("max_attempts") && !out.contains(&a.addr.to_string()), "{out}");
    let (code, out) = cli(&["delete", "pay"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(kv.get(KEY, None).await.unwrap().kvs().is_empty());
}

/// Subset v1 (a) and v2 (b), split by the file 95/5.
fn canary_config(etcd: &Etcd, a: &Backend, b: &Backend) -> String {
    format!(
        "admin:\n  bind: 127.0.0.1:0\nshutdown:\n  drain_window: 0s\n\
         etcd:\n  endpoints: [{}]\n  dial_timeout: 500ms\n  request_timeout: 1s\n  overlay_prefix: outrider/overlay/\n\
         listeners:\n  - name: front\n    bind: 127.0.0.1:0\n    service: pay\n\
         services:\n  pay:\n    routes:\n      - name: canary\n        split:\n\
         \x20         - {{ to: {{ version: v1 }}, weight: 95 }}\n          - {{ to: {{ version: v2 }}, weight: 5 }}\n\
         \x20   endpoints:\n      - {{ addr: \"{}\", tags: {{ version: v1 }} }}\n      - {{ addr: \"{}\", tags: {{ version: v2 }} }}\n",
        etcd.url, a.addr, b.addr
    )
}

/// Waits until the canary route's split weights are `want`.
async fn until_split(app: &App, want: [u64; 2]) {
    let url = format!("http://{}/explain?service=pay", app.admin_addr());
    within(async {
        loop {
            let (_, _, body) = get(&client(), &url).await;
            let e: serde_json::Value = serde_json::from_str(&body).unwrap();
            let weights: Vec<u64> = e["route"]["split"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["weight"].as_u64().unwrap())
                .collect();
            if weights == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_moves_fleet_wide_through_the_overlay() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    // Two Outriders, as two pods of the caller would run.
    let apps =
        [start_app(&canary_config(&etcd, &a, &b)).await, start_app(&canary_config(&etcd, &a, &b)).await];
    let canary = |v1: u32, v2: u32| {
        format!(
            "routes:\n  - name: canary\n    split:\n      - {{ to: {{ version: v1 }}, weight: {v1} }}\n      - {{ to: {{ version: v2 }}, weight: {v2} }}\n"
        )
    };
    kv.put(KEY, canary(50, 50), None).await.unwrap();
    for app in &apps {
        until_split(app, [50, 50]).await;
        let (on_a, on_b) = split(app, 200).await;
        assert!(on_a > 60 && on_b > 60, "50/50: {on_a}/{on_b}");
    }
    kv.put(KEY, canary(0, 100), None).await.unwrap();
    for app in &apps {
        until_split(app, [0, 100]).await;
        assert_eq!(split(app, 50).await, (0, 50), "100% on the canary");
    }
    kv.delete(KEY, None).await.unwrap();
    for app in &apps {
        until_split(app, [95, 5]).await;
    }
}
