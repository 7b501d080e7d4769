//! Reload triggers: SIGHUP, and changes to the config file.
//!
//! Watches the file's *directory*, not the file: Kubernetes updates a ConfigMap volume by
//! swapping a `..data` symlink, which replaces the file without writing to it. Every event
//! leads to one re-read after a short settle time; an unchanged file is a no-op (same hash).
//! Must not: apply anything itself — `App::reload_from_file` validates and applies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::app::App;

/// Editors and `kubectl` write in several steps; events closer than this count as one.
const SETTLE: Duration = Duration::from_millis(100);

/// Starts watching `path` and listening for SIGHUP; stops when `app` finishes.
pub fn spawn(app: App, path: PathBuf) -> notify::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&watch_dir(&path), RecursiveMode::NonRecursive)?;
    tokio::spawn(run(app, rx, watcher));
    Ok(())
}

fn watch_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

async fn run(app: App, mut events: mpsc::Receiver<()>, _watcher: notify::RecommendedWatcher) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP: {e}");
            None
        }
    };
    loop {
        tokio::select! {
            () = app.finished() => return,
            Some(()) = events.recv() => {
                tokio::time::sleep(SETTLE).await;
                while events.try_recv().is_ok() {}
            }
            Some(()) = recv_hup(&mut hup) => tracing::info!("SIGHUP: reloading config"),
        }
        app.reload_from_file().await;
    }
}

async fn recv_hup(hup: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hup {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}
