//! Shared test helpers: real HTTP backends on 127.0.0.1:0, real clients, and an in-process
//! Outrider started from YAML text.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use outrider::app::App;
use outrider::config::Config;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

pub type TestBody = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Handler =
    Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<TestBody>> + Send>> + Send + Sync>;

/// Bounds every await in tests: a hang fails the test instead of stalling CI.
pub const LIMIT: Duration = Duration::from_secs(30);

pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("test step timed out")
}

/// A connection a test backend serves: plain TCP or TLS.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A real HTTP/1.1 + h2c server on a loopback port the OS picked.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    dead: tokio_util::sync::CancellationToken,
}

impl Backend {
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Backend::serve(socket, handler)
    }

    /// Serves on an already bound socket (a replacement on the same address, say).
    pub fn serve<F, Fut>(socket: TcpListener, handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        Backend::serve_with(socket, None, handler)
    }

    /// Serves on `socket`, over TLS when `tls` is given.
    pub fn serve_with<F, Fut>(socket: TcpListener, tls: Option<tls::Acceptor>, handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        let addr = socket.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let dead = tokio_util::sync::CancellationToken::new();
        let (counter, killed) = (hits.clone(), dead.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = killed.cancelled() => return,
                    r = socket.accept() => match r { Ok((s, _)) => s, Err(_) => return },
                };
                let (handler, counter, killed) = (handler.clone(), counter.clone(), killed.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let io: Box<dyn Io> = match &tls {
                        None => Box::new(stream),
                        Some(tls) => match tls.accept(stream).await {
                            Some(s) => Box::new(s),
                            None => return,
                        },
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                    tokio::select! {
                        _ = conn => {}
                        () = killed.cancelled() => {} // dropped mid-request, as a crash would
                    }
                });
            }
        });
        Backend { addr, hits, dead }
    }

    /// Stops at once, as SIGKILL would: the listening socket and every open connection close,
    /// requests in flight get no answer.
    pub fn kill(&self) {
        self.dead.cancel();
    }

    /// Answers every request with its name in the body.
    pub async fn named(name: &'static str) -> Backend {
        Backend::start(move |_req| async move { text(200, name) }).await
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Answers every request with its name and the status held in the returned cell.
pub async fn status_backend(
    initial: u16,
    name: &'static str,
) -> (Backend, Arc<std::sync::atomic::AtomicU16>) {
    let status = Arc::new(std::sync::atomic::AtomicU16::new(initial));
    let s = status.clone();
    let backend = Backend::start(move |_req| {
        let code = s.load(Ordering::SeqCst);
        async move { text(code, name) }
    })
    .await;
    (backend, status)
}

pub fn text(status: u16, body: &'static str) -> Response<TestBody> {
    let mut resp = Response::new(full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    resp
}

pub fn full(bytes: Bytes) -> TestBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

pub fn empty() -> TestBody {
    full(Bytes::new())
}

/// A loopback port that nothing listens on (bound, then released).
/// A loopback address that was free a moment ago, for a process or listener to bind next.
pub fn free_addr() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

/// A loopback address that refuses every connection for the rest of the test run: the port stays
/// bound (so no other test's listener can take it) but never listens.
pub fn refused_addr() -> SocketAddr {
    static HELD: std::sync::Mutex<Vec<tokio::net::TcpSocket>> = std::sync::Mutex::new(Vec::new());
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    HELD.lock().unwrap().push(socket);
    addr
}

/// Outrider's logs go to the test's captured output: shown only when a test fails.
pub fn capture_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("outrider=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_test_writer().try_init();
}

pub async fn start_app(yaml: &str) -> App {
    capture_logs();
    let config = Config::parse(yaml).unwrap_or_else(|e| panic!("test config invalid: {e}\n{yaml}"));
    App::start(config, None).await.expect("app starts")
}

pub async fn start_app_with_file(path: &std::path::Path) -> App {
    capture_logs();
    let config = Config::load(path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
    App::start(config, Some(path.to_path_buf())).await.expect("app starts")
}

/// YAML for one listener `front` on port 0 in front of service `svc`.
pub fn one_service(protocol: &str, extra: &str, endpoints: &[(SocketAddr, u32)]) -> String {
    let mut yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\nshutdown:\n  drain_window: 0s\n  grace_period: 5s\n\
         listeners:\n  - name: front\n    bind: 127.0.0.1:0\n    protocol: {protocol}\n    service: svc\n\
         services:\n  svc:\n{extra}    endpoints:\n"
    );
    if endpoints.is_empty() {
        yaml.push_str("      []\n");
    }
    for (addr, weight) in endpoints {
        yaml.push_str(&format!("      - addr: {addr}\n        weight: {weight}\n"));
    }
    yaml
}

pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn h2c_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new())
}

pub async fn get(client: &Client<HttpConnector, TestBody>, url: &str) -> (u16, http::HeaderMap, String) {
    let req = Request::get(url).body(empty()).unwrap();
    let resp = within(client.request(req)).await.expect("request succeeds");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = within(resp.into_body().collect()).await.expect("body").to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// `n` GETs of `url` with `headers`, 16 at a time, counted by (status, body) — a test
/// backend's body is its name.
pub async fn tally(url: &str, n: usize, headers: &[(&str, &str)]) -> HashMap<(u16, String), usize> {
    let client = client();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (client, url) = (client.clone(), url.to_string());
        let headers: Vec<(String, String)> =
            headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        tasks.spawn(async move {
            let mut seen = HashMap::new();
            for _ in (worker..n).step_by(16) {
                let mut req = Request::get(&url);
                for (k, v) in &headers {
                    req = req.header(k, v);
                }
                let resp = client.request(req.body(empty()).unwrap()).await.unwrap();
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                *seen.entry((status, String::from_utf8_lossy(&body).into_owned())).or_insert(0) += 1;
            }
            seen
        });
    }
    let mut total = HashMap::new();
    while let Some(seen) = within(tasks.join_next()).await {
        for (k, v) in seen.unwrap() {
            *total.entry(k).or_insert(0) += v;
        }
    }
    total
}

/// Like [`tally`], counted by body whatever the status.
pub async fn spread(url: &str, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let mut bodies = HashMap::new();
    for ((_, body), count) in tally(url, n, headers).await {
        *bodies.entry(body).or_insert(0) += count;
    }
    bodies
}

/// Like [`spread`], asserting that every answer was 200.
pub async fn spread_ok(url: &str, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let seen = tally(url, n, headers).await;
    assert!(seen.keys().all(|(status, _)| *status == 200), "not all 200: {seen:?}");
    seen.into_iter().map(|((_, body), count)| (body, count)).collect()
}

/// A stream of ready items (e.g. body frames for `http_body_util::StreamBody`).
pub fn stream_of<T: Unpin>(items: Vec<T>) -> impl futures_core::Stream<Item = T> + Unpin {
    struct Iter<T>(std::vec::IntoIter<T>);
    impl<T: Unpin> futures_core::Stream for Iter<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<T>> {
            Poll::Ready(self.0.next())
        }
    }
    Iter(items.into_iter())
}

/// Forwards a child process's output line by line, so a test can await a logged event.
pub fn lines_of<R: std::io::Read + Send + 'static>(
    output: R,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    use std::io::BufRead;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(output).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A body of `total` deterministic bytes, produced in chunks (never held whole in memory).
pub struct Pattern {
    pub remaining: usize,
    pub offset: usize,
}

pub const CHUNK: usize = 64 * 1024;

impl Pattern {
    pub fn chunk(offset: usize, len: usize) -> Bytes {
        (0..len).map(|i| ((offset + i) % 251) as u8).collect::<Vec<_>>().into()
    }

    /// sha256 of the first `total` bytes of the pattern.
    pub fn digest(total: usize) -> Vec<u8> {
        let mut h = Sha256::new();
        let mut offset = 0;
        while offset < total {
            let n = CHUNK.min(total - offset);
            h.update(Pattern::chunk(offset, n));
            offset += n;
        }
        h.finalize().to_vec()
    }
}

impl Body for Pattern {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = CHUNK.min(self.remaining);
        let chunk = Pattern::chunk(self.offset, n);
        self.remaining -= n;
        self.offset += n;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}

/// Hashes a body frame by frame; returns (digest, trailers).
pub async fn hash_body<B>(mut body: B) -> (Vec<u8>, Option<http::HeaderMap>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut h = Sha256::new();
    let mut trailers = None;
    while let Some(frame) = within(body.frame()).await {
        let frame = frame.expect("body frame");
        match frame.into_data() {
            Ok(data) => h.update(&data),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    (h.finalize().to_vec(), trailers)
}

pub mod dns;
pub mod etcd;
pub mod tls;

/// The real `outrider` binary running a config written to a temp dir; its stderr (logs) and
/// stdout (access log) arrive line by line. Killed when dropped.
pub struct Binary {
    /// `None` once `exit_code` has taken it.
    child: Option<std::process::Child>,
    pub log: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub out: tokio::sync::mpsc::UnboundedReceiver<String>,
    _dir: tempfile::TempDir,
}

impl Binary {
    pub fn spawn(yaml: &str) -> Binary {
        Binary::spawn_with(yaml, None)
    }

    /// Like [`Binary::spawn`], with the open-files limit (`ulimit -n`) set to `nofile`.
    pub fn spawn_with(yaml: &str, nofile: Option<u32>) -> Binary {
        Binary::spawn_env(yaml, nofile, &[])
    }

    /// Like [`Binary::spawn_with`], with extra environment variables.
    pub fn spawn_env(yaml: &str, nofile: Option<u32>, env: &[(&str, &str)]) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outrider.yaml");
        std::fs::write(&path, yaml).unwrap();
        let bin = env!("CARGO_BIN_EXE_outrider");
        let mut command = match nofile {
            None => std::process::Command::new(bin),
            Some(n) => {
                let mut sh = std::process::Command::new("sh");
                sh.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), bin]);
                sh
            }
        };
        let mut child = command
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let log = lines_of(child.stderr.take().unwrap());
        let out = lines_of(child.stdout.take().unwrap());
        Binary { child: Some(child), log, out, _dir: dir }
    }

    /// Awaits a log line containing `needle`.
    pub async fn logged(&mut self, needle: &str) {
        within(async {
            while let Some(line) = self.log.recv().await {
                if line.contains(needle) {
                    return;
                }
            }
            panic!("outrider exited before logging {needle:?}");
        })
        .await;
    }

    fn pid(&self) -> String {
        self.child.as_ref().map(|c| c.id().to_string()).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill").args([&format!("-{name}"), &self.pid()]).status();
        assert!(status.unwrap().success());
    }

    /// SIGKILL, as a crash would, and reaps the process.
    pub fn crash(&mut self) {
        if let Some(c) = self.child.as_mut() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn exit_code(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        within(tokio::task::spawn_blocking(move || child.wait().unwrap())).await.unwrap().code()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A backend that holds requests (to `path`, or all when `None`) until released: each held
/// request reports its arrival on `arrived`, then waits for a permit on `gate`.
pub struct Held {
    pub backend: Backend,
    pub gate: Arc<tokio::sync::Semaphore>,
    pub arrived: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl Held {
    pub async fn start(name: &'static str, path: Option<&'static str>) -> Held {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (tx, arrived) = tokio::sync::mpsc::unbounded_channel();
        let held = gate.clone();
        let backend = Backend::start(move |req: Request<Incoming>| {
            let (held, tx) = (held.clone(), tx.clone());
            let hold = path.is_none_or(|p| req.uri().path() == p);
            async move {
                if hold {
                    let _ = tx.send(());
                    let _permit = held.acquire().await;
                }
                text(200, name)
            }
        })
        .await;
        Held { backend, gate, arrived }
    }
}

/// Closed-loop load: `workers` tasks each sending requests one after another until
/// [`Load::stop`]; counts answers by outcome (200 with a whole body is ok). Bounded by the
/// caller's stop and by `LIMIT`.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    pub ok: Arc<AtomicUsize>,
    pub failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

type MakeRequest = Arc<dyn Fn() -> Request<TestBody> + Send + Sync>;

impl Load {
    /// GETs to `url` over HTTP/1.1.
    pub fn start(url: &str, workers: usize) -> Load {
        let url = url.to_string();
        Load::with(client(), workers, move || Request::get(&url).body(empty()).unwrap())
    }

    /// Requests from `make` on `client` (HTTP/1.1 or h2c).
    pub fn with(
        client: Client<HttpConnector, TestBody>,
        workers: usize,
        make: impl Fn() -> Request<TestBody> + Send + Sync + 'static,
    ) -> Load {
        let make: MakeRequest = Arc::new(make);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                let (client, make) = (client.clone(), make.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let good = match within(client.request(make())).await {
                            Ok(r) if r.status() == 200 => r.into_body().collect().await.is_ok(),
                            _ => false,
                        };
                        let counter = if good { &ok } else { &failed };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load { stop, ok, failed, tasks }
    }

    /// Waits until at least `n` more requests have been answered (whatever the outcome).
    pub async fn progress(&self, n: usize) {
        let total = || self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed);
        let target = total() + n;
        within(async {
            while total() < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    /// Stops the workers; returns (ok, failed).
    pub async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            within(t).await.unwrap();
        }
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}
