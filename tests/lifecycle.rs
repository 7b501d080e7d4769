//! Readiness, admin pages and graceful shutdown: in process, and on the real binary.

mod support;

use support::*;
use tokio::net::TcpStream;

#[tokio::test]
async fn admin_pages_describe_the_running_config() {
    let a = Backend::named("a").await;
    let app = start_app(&one_service("http", "", &[(a.addr, 3)])).await;
    let admin = app.admin_addr();
    let client = client();
    assert_eq!(get(&client, &format!("http://{admin}/live")).await.0, 200);
    let (status, _, body) = get(&client, &format!("http://{admin}/ready")).await;
    assert_eq!(status, 200, "{body}");
    let (_, _, body) = get(&client, &format!("http://{admin}/config")).await;
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["generation"], 1);
    assert_eq!(config["hash"].as_str().unwrap().len(), 16);
    assert!(config["listeners"]["front"].as_str().unwrap().starts_with("127.0.0.1:"));
    let (_, _, body) = get(&client, &format!("http://{admin}/upstreams")).await;
    let up: serde_json::Value = serde_json::from_str(&body).unwrap();
    let endpoint = &up["services"]["svc"]["endpoints"][0];
    assert_eq!(endpoint["addr"], a.addr.to_string());
    assert_eq!(endpoint["weight"], 3);
    assert_eq!(endpoint["in_flight"], 0);
    assert_eq!(get(&client, &format!("http://{admin}/nope")).await.0, 404);
}

#[tokio::test]
async fn post_shutdown_stops_the_proxy() {
    let a = Backend::named("a").await;
    let app = start_app(&one_service("http", "", &[(a.addr, 1)])).await;
    let req = http::Request::post(format!("http://{}/shutdown", app.admin_addr())).body(empty()).unwrap();
    let resp = within(client().request(req)).await.unwrap();
    assert_eq!(resp.status(), 202);
    within(app.finished()).await;
    assert!(app.readiness().is_err());
}

fn free_port() -> u16 {
    free_addr().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_refuses_then_exits_zero() {
    let Held { backend: slow, gate, mut arrived } = Held::start("done", Some("/slow")).await;
    let (admin, front) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let yaml = format!(
        "admin:\n  bind: {admin}\nshutdown:\n  drain_window: 2s\n  grace_period: 20s\n\
         listeners:\n  - name: front\n    bind: {front}\n    service: svc\n\
         services:\n  svc:\n    endpoints:\n      - addr: {}\n",
        slow.addr
    );
    let mut outrider = Binary::spawn(&yaml);
    outrider.logged("outrider started").await;
    let client = client();
    assert_eq!(get(&client, &format!("http://{admin}/ready")).await.0, 200);

    let in_flight = {
        let (client, url) = (client.clone(), format!("http://{front}/slow"));
        tokio::spawn(async move { get(&client, &url).await })
    };
    within(arrived.recv()).await.unwrap();
    outrider.sigterm();

    // Draining: not ready, but new connections are still proxied.
    outrider.logged("shutdown: not ready").await;
    assert_eq!(get(&client, &format!("http://{admin}/ready")).await.0, 503);
    let fresh = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<TestBody>();
    assert_eq!(get(&fresh, &format!("http://{front}/")).await.0, 200, "proxying during the drain window");

    // After the drain window the listener is closed: connections are refused.
    outrider.logged("listener closed").await;
    assert!(TcpStream::connect(&front).await.is_err(), "connection accepted after the drain window");

    // The request that was in flight all along still completes.
    gate.add_permits(1);
    let (status, _, body) = within(in_flight).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "done"));
    assert_eq!(outrider.exit_code().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_admin_port_backs_off_and_recovers() {
    let a = Backend::named("a").await;
    let admin = format!("127.0.0.1:{}", free_port());
    let yaml = one_service("http", "", &[(a.addr, 1)])
        .replace("127.0.0.1:0\nshutdown", &format!("{admin}\nshutdown"));
    let mut outrider = Binary::spawn_with(&yaml, Some(48));
    outrider.logged("outrider started").await;
    // Hold more connections than the process has descriptors left: accept starts failing.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(within(TcpStream::connect(&admin)).await.unwrap());
    }
    outrider.logged("accept failed").await;
    // Nothing to await: the defect was a flood. Count what one second of EMFILE produces.
    let window = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    let mut lines = 0;
    while let Ok(Some(line)) = tokio::time::timeout_at(window, outrider.log.recv()).await {
        lines += usize::from(line.contains("accept failed"));
    }
    assert!(lines <= 2, "{lines} 'accept failed' lines in one second: the accept loop spins");
    drop(held);
    let (status, _, _) = get(&client(), &format!("http://{admin}/live")).await;
    assert_eq!(status, 200, "the admin port serves again once descriptors are free");
}
