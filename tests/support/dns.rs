//! A real DNS server (Debian's `dnsmasq`) on a free loopback port, answering from a hosts
//! file in a temp dir that it re-reads on SIGHUP. Names under `.test` that the file lacks
//! get NXDOMAIN. A missing binary fails the test: `.ci/deps` installs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use tokio::sync::mpsc::UnboundedReceiver;

pub struct Dnsmasq {
    pub addr: SocketAddr,
    hosts: PathBuf,
    _dir: tempfile::TempDir,
    child: Option<Child>,
    log: UnboundedReceiver<String>,
    extra: Vec<String>,
}

impl Dnsmasq {
    /// Serves `hosts` (hosts-file lines) with TTL `ttl` seconds; `extra`: more dnsmasq
    /// options, such as `--srv-host=...`.
    pub async fn start(hosts: &str, ttl: u32, extra: &[String]) -> Dnsmasq {
        Dnsmasq::start_on(super::free_addr(), hosts, ttl, extra).await
    }

    pub async fn start_on(addr: SocketAddr, hosts: &str, ttl: u32, extra: &[String]) -> Dnsmasq {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, hosts).unwrap();
        let mut extra = extra.to_vec();
        extra.push(format!("--local-ttl={ttl}"));
        let (_, log) = tokio::sync::mpsc::unbounded_channel();
        let mut d = Dnsmasq { addr, hosts: path, _dir: dir, child: None, log, extra };
        d.spawn().await;
        d
    }

    async fn spawn(&mut self) {
        let user = std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(whoami);
        // Debian puts it in /usr/sbin, which a non-root PATH may lack.
        let program =
            if std::path::Path::new("/usr/sbin/dnsmasq").exists() { "/usr/sbin/dnsmasq" } else { "dnsmasq" };
        let mut child = Command::new(program)
            .args(["--keep-in-foreground", "--log-facility=-", "--conf-file=/dev/null", "--pid-file="])
            .arg(format!("--port={}", self.addr.port()))
            .args(["--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts"])
            .arg(format!("--addn-hosts={}", self.hosts.display()))
            .args(["--local=/test/", "--cache-size=0"])
            .arg(format!("--user={user}"))
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run `dnsmasq`: install Debian's dnsmasq-base (.ci/deps does)");
        self.log = super::lines_of(child.stderr.take().unwrap());
        self.child = Some(child);
        self.await_read().await;
    }

    /// Waits until dnsmasq says it (re-)read the hosts file.
    async fn await_read(&mut self) {
        let needle = format!("read {}", self.hosts.display());
        let log = &mut self.log;
        super::within(async {
            while let Some(line) = log.recv().await {
                if line.contains(&needle) {
                    return;
                }
            }
            panic!("dnsmasq exited before it read its hosts file");
        })
        .await;
    }

    /// Replaces the records and waits until dnsmasq serves the new ones.
    pub async fn set_hosts(&mut self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).unwrap();
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap();
        assert!(status.success());
        self.await_read().await;
    }

    /// SIGKILL: queries go unanswered from now on.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.kill();
    }
}
