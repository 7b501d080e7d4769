//! Reload triggers: SIGHUP, and finished changes to the config file and to the TLS files
//! it names (certificates, keys, CA bundles: rotated in place, new handshakes use them).
//!
//! Watches the file's *directory*, not the file: Kubernetes updates a ConfigMap volume by
//! swapping a `..data` symlink, which replaces the file without writing to it. Only events
//! that can mean new, complete content count — a write that was closed, a rename, a removal —
//! never opens, reads or writes still in progress (our own reads would otherwise trigger the
//! next reload, forever). A file is applied only once its content has stayed the same across
//! a settle window, and content already seen (applied or refused) is not read as new again.
//! Must not: apply anything itself — `App::reload_text` validates and applies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::app::App;

/// How long the file must stay unchanged (and events quiet) before it is applied. Writers
/// that close and reopen the file, or write it in pieces, finish within this.
const SETTLE: Duration = Duration::from_millis(200);

/// Starts watching `path` and listening for SIGHUP; stops when `app` finishes.
pub fn spawn(app: App, path: PathBuf) -> notify::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| may_change_content(&e.kind)) {
            let _ = tx.try_send(());
        }
    })?;
    let dir = watch_dir(&path);
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let mut watching = Watching { watcher, dirs: std::collections::HashSet::from([dir]) };
    watching.sync(&app);
    tokio::spawn(run(app, path, rx, watching));
    Ok(())
}

/// The watcher and the directories it watches: the config's and those of the TLS files the
/// running config uses (Kubernetes Secret volumes swap a `..data` symlink there too).
struct Watching {
    watcher: notify::RecommendedWatcher,
    dirs: std::collections::HashSet<PathBuf>,
}

impl Watching {
    /// Starts watching the directories of TLS files a reload brought in.
    fn sync(&mut self, app: &App) {
        for file in app.tls_files() {
            let dir = watch_dir(&file);
            if !self.dirs.contains(&dir) {
                match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        self.dirs.insert(dir);
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), "cannot watch TLS files for rotation: {e}")
                    }
                }
            }
        }
    }
}

/// Whether an event can mean finished new content: a write that was closed, a rename (atomic
/// writers, editors, the ConfigMap `..data` swap) or a removal (`ln -sf` unlinks first).
/// Not opens, reads or metadata changes, and not writes still in progress.
pub fn may_change_content(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_)
    )
}

fn watch_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

async fn run(app: App, path: PathBuf, mut events: mpsc::Receiver<()>, mut watching: Watching) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP: {e}");
            None
        }
    };
    // Nothing counts as seen at first: the file may have changed since the app loaded it,
    // and an unchanged one is a no-op reload (same config hash) anyway.
    let mut seen = None;
    loop {
        tokio::select! {
            () = app.finished() => return,
            Some(()) = events.recv() => {
                if let Some(text) = settled(&path, &mut events).await {
                    let hash = digest(&text);
                    if seen != Some(hash) {
                        seen = Some(hash);
                        app.reload_text(&text).await;
                    }
                }
                app.reload_tls();
            }
            Some(()) = recv_hup(&mut hup) => {
                tracing::info!("SIGHUP: reloading config and TLS files");
                let text = read(&path).await;
                seen = text.as_deref().map(digest);
                app.reload_from_file().await;
                app.reload_tls();
            }
        }
        watching.sync(&app);
    }
}

/// Waits until events are quiet and two reads `SETTLE` apart agree; the content then.
/// `None` when the file cannot be read (removed mid-swap): a later event brings it back.
async fn settled(path: &Path, events: &mut mpsc::Receiver<()>) -> Option<String> {
    let mut last: Option<String> = None;
    loop {
        quiet(events).await;
        let now = read(path).await;
        if now.is_some() && now == last {
            return now;
        }
        if now.is_none() && last.is_none() {
            tracing::warn!(path = %path.display(), "config file unreadable after a change; waiting for the next one");
            return None;
        }
        last = now;
    }
}

/// Returns once no event has arrived for `SETTLE`.
async fn quiet(events: &mut mpsc::Receiver<()>) {
    while let Ok(Some(())) = tokio::time::timeout(SETTLE, events.recv()).await {}
}

async fn read(path: &Path) -> Option<String> {
    tokio::fs::read_to_string(path).await.ok()
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

async fn recv_hup(hup: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hup {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind, RenameMode};

    use super::*;

    #[test]
    fn only_finished_changes_count() {
        let yes = [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
        ];
        let no = [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
            EventKind::Create(CreateKind::File),
        ];
        assert!(yes.iter().all(may_change_content));
        assert!(!no.iter().any(may_change_content));
    }
}
