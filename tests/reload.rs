//! Hot reload through the real file watcher while traffic flows.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use support::*;

fn config(a: std::net::SocketAddr, wa: u32, b: std::net::SocketAddr, wb: u32) -> String {
    one_service("http", "", &[(a, wa), (b, wb)])
}

/// Replaces the file atomically (write + rename), as ConfigMap volumes and careful tools do.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_no_request_and_applies_weights() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrider.yaml");
    std::fs::write(&path, config(a.addr, 1, b.addr, 1)).unwrap();
    let app = start_app_with_file(&path).await;
    outrider::watch::spawn(app.clone(), path.clone()).unwrap();
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        tokio::spawn(async move {
            let client = client();
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get(&url).body(empty()).unwrap();
                match client.request(req).await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    let mut status = app.status();
    for i in 0..20u32 {
        let before = status.borrow_and_update().clone();
        if i % 2 == 0 {
            write_atomically(&path, &config(a.addr, i + 2, b.addr, 1));
            within(status.wait_for(|s| s.generation > before.generation)).await.unwrap();
        } else {
            write_atomically(&path, &config(a.addr, 0, b.addr, 1)); // weight 0: invalid
            within(status.wait_for(|s| s.reload_failures > before.reload_failures)).await.unwrap();
            assert_eq!(app.status().borrow().generation, before.generation, "invalid file must not apply");
        }
    }
    stop.store(true, Ordering::Relaxed);
    within(load).await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during reloads");
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert_eq!(app.status().borrow().generation, 11);
    assert_eq!(status.borrow().reload_failures, 10);
    assert!(status.borrow().last_reload_error.as_deref().unwrap().contains("endpoints[0].weight"));

    // Weights change takes effect: 3:1 gives exactly 300:100 over 400 sequential requests.
    let before = app.status().borrow().generation;
    write_atomically(&path, &config(a.addr, 3, b.addr, 1));
    within(status.wait_for(|s| s.generation > before)).await.unwrap();
    let client = client();
    let (mut to_a, mut to_b) = (0, 0);
    for _ in 0..400 {
        match get(&client, &url).await.2.as_str() {
            "a" => to_a += 1,
            "b" => to_b += 1,
            other => panic!("unexpected body {other}"),
        }
    }
    assert_eq!((to_a, to_b), (300, 100));
}

#[tokio::test]
async fn reload_keeps_endpoint_state_and_listener_of_unchanged_parts() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let app = start_app(&config(a.addr, 1, b.addr, 1)).await;
    let front = app.listener_addr("front").await.unwrap();
    let state_before = app.balancer("svc").unwrap().snapshot().endpoints[0].state.clone();
    let mut next = outrider::config::Config::parse(&config(a.addr, 5, b.addr, 1)).unwrap();
    next.services.get_mut("svc").unwrap().timeouts.request = std::time::Duration::from_secs(3);
    assert!(app.reload(next).await.unwrap());
    assert_eq!(app.listener_addr("front").await, Some(front), "listener kept its socket");
    let snap = app.balancer("svc").unwrap().snapshot();
    assert!(Arc::ptr_eq(&snap.endpoints[0].state, &state_before), "endpoint state kept");
    assert_eq!(snap.endpoints[0].weight, 5);
}

#[tokio::test]
async fn reload_adds_and_removes_listeners() {
    let a = Backend::named("a").await;
    let app = start_app(&one_service("http", "", &[(a.addr, 1)])).await;
    let old = app.listener_addr("front").await.unwrap();
    let yaml = one_service("http", "", &[(a.addr, 1)])
        .replace("name: front\n    bind: 127.0.0.1:0", "name: second\n    bind: 127.0.0.2:0");
    assert!(app.reload(outrider::config::Config::parse(&yaml).unwrap()).await.unwrap());
    let new = app.listener_addr("second").await.expect("new listener bound");
    assert_eq!(get(&client(), &format!("http://{new}/")).await.2, "a");
    assert_eq!(app.listener_addr("front").await, None);
    within(async {
        while tokio::net::TcpStream::connect(old).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Writes `text` in place, as `cat > file` or an editor without atomic save does: truncate,
/// write the first part, pause (a slow writer), write the rest, close.
fn write_in_place_slowly(path: &Path, text: &str, pause: std::time::Duration) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let cut = text.len() / 2;
    f.write_all(&text.as_bytes()[..cut]).unwrap();
    f.flush().unwrap();
    std::thread::sleep(pause);
    f.write_all(&text.as_bytes()[cut..]).unwrap();
}

async fn watched_app(text: &str) -> (tempfile::TempDir, std::path::PathBuf, outrider::app::App) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrider.yaml");
    std::fs::write(&path, text).unwrap();
    let app = start_app_with_file(&path).await;
    outrider::watch::spawn(app.clone(), path.clone()).unwrap();
    (dir, path, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_file_is_refused_and_every_listener_keeps_serving() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let (_dir, path, app) = watched_app(&config(a.addr, 1, b.addr, 1)).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    let load = Load::start(&url, 4);
    let mut status = app.status();
    std::fs::write(&path, "").unwrap(); // `: > outrider.yaml`
    within(status.wait_for(|s| s.reload_failures == 1)).await.unwrap();
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "requests failed after an empty config was written ({ok} succeeded)");
    assert_eq!(app.status().borrow().generation, 1, "the empty file must not apply");
    assert!(status.borrow().last_reload_error.as_deref().unwrap().contains("no settings"));
    let ready = get(&client(), &format!("http://{}/ready", app.admin_addr())).await;
    assert_eq!(ready.0, 200, "the old config still serves: ready");
    assert_eq!(get(&client(), &url).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_in_place_writes_never_apply_a_half_written_file() {
    let backends = [Backend::named("a").await, Backend::named("b").await, Backend::named("c").await];
    let text = |w: u32| {
        let eps: Vec<_> = backends.iter().map(|b| (b.addr, w)).collect();
        one_service("http", "", &eps) // endpoints last: the first half is a valid 1-endpoint config
    };
    let (_dir, path, app) = watched_app(&text(1)).await;
    let url = format!("http://{}/", app.listener_addr("front").await.unwrap());
    // Records the endpoint count of every generation that gets applied.
    let mut status = app.status();
    let applied = {
        let (app, mut status) = (app.clone(), app.status());
        tokio::spawn(async move {
            let mut counts = Vec::new();
            while counts.len() < 8 && status.changed().await.is_ok() {
                counts.push(app.balancer("svc").unwrap().describe().len());
            }
            counts
        })
    };
    let load = Load::start(&url, 4);
    for w in 2..10u32 {
        let before = status.borrow_and_update().generation;
        // Longer than the old 100 ms settle, so a watcher reacting to writes would read half.
        write_in_place_slowly(&path, &text(w), std::time::Duration::from_millis(150));
        within(status.wait_for(|s| s.generation > before)).await.unwrap();
    }
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "{failed} requests failed, {ok} succeeded");
    let counts = within(applied).await.unwrap();
    assert_eq!(counts, vec![3; 8], "a generation applied a truncated file");
    assert_eq!(status.borrow().reload_failures, 0, "a half-written file was even read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_reads_a_changed_file_once_instead_of_spinning() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let (_dir, path, app) = watched_app(&config(a.addr, 1, b.addr, 1)).await;
    let mut status = app.status();
    write_atomically(&path, &config(a.addr, 0, b.addr, 1)); // invalid: weight 0
    within(status.wait_for(|s| s.reload_failures == 1)).await.unwrap();
    // Nothing to await here: the defect was *more* events. Watch a window 10× the old spin
    // period; a watcher woken by its own reads would count this file again and again.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(status.borrow().reload_failures, 1, "the unchanged invalid file was re-read");
    write_atomically(&path, &config(a.addr, 2, b.addr, 1));
    within(status.wait_for(|s| s.generation == 2)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!((status.borrow().generation, status.borrow().reload_failures), (2, 1));
}
