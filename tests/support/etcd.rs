//! A real etcd server (Debian's `etcd-server`) on free loopback ports with a temp data dir.
//! A missing binary fails the test: `.ci/test` installs it.

use std::process::{Child, Command, Stdio};

pub struct Etcd {
    pub url: String,
    client_port: u16,
    peer_port: u16,
    data: tempfile::TempDir,
    child: Option<Child>,
}

impl Etcd {
    pub async fn start() -> Etcd {
        let (client_port, peer_port) = (super::free_addr().port(), super::free_addr().port());
        let mut etcd = Etcd {
            url: format!("http://127.0.0.1:{client_port}"),
            client_port,
            peer_port,
            data: tempfile::tempdir().unwrap(),
            child: None,
        };
        etcd.spawn().await;
        etcd
    }

    async fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(self.data.path())
            .args(["--listen-client-urls", &self.url, "--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run `etcd`: install Debian's etcd-server (.ci/test does)");
        let mut lines = super::lines_of(child.stderr.take().unwrap());
        self.child = Some(child);
        super::within(async {
            while let Some(line) = lines.recv().await {
                if line.contains("ready to serve client requests") {
                    return;
                }
            }
            panic!("etcd exited before it was ready");
        })
        .await;
        // Keep draining the log so etcd never blocks on a full pipe.
        tokio::spawn(async move { while lines.recv().await.is_some() {} });
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url.as_str()], None).await.expect("etcd client connects")
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same ports and data directory.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
