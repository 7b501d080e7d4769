//! Live overlays from etcd (the configuration centre): one key per service under
//! `etcd.overlay_prefix` holds the settings that may change fleet-wide without a ConfigMap
//! edit — weight overrides and draining, load balancing, timeouts, retries, outlier
//! detection, circuit breaker, rate limit.
//!
//! The prefix is followed like an endpoint prefix (`etcd::watch::follow`: revision,
//! compaction, reconnect, keep the last values). Every change, and every reload of the file,
//! lays the overlays over the file's text and validates the result as one config
//! (`Config::with_overlays`), so an overlay gets the file's messages, located by its etcd key
//! and its own line. An overlay that does not validate changes nothing — the service keeps
//! the last overlay that did — and is logged, counted and shown in `/config`; the other
//! services' overlays apply. Precedence: file < overlay.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_util::sync::{CancellationToken, DropGuard};

use super::App;
use crate::config::{Config, Overlay};
use crate::etcd::Etcd;
use crate::etcd::watch::{self, Values, WatchStatus};

/// What the process knows of the overlays.
#[derive(Debug, Default)]
pub(super) struct Overlays {
    /// Every overlay document under the prefix, by service.
    docs: BTreeMap<String, Overlay>,
    /// The last document of each service that validated: kept while a newer one is refused.
    good: BTreeMap<String, Overlay>,
    /// Services whose overlay was left out, with the text and why.
    refused: BTreeMap<String, (String, String)>,
    /// Overlays refused (each distinct text once).
    failures: u64,
    follow: Option<Follow>,
}

/// The running watch of the prefix.
#[derive(Debug)]
struct Follow {
    prefix: String,
    etcd: Arc<Etcd>,
    status: Arc<WatchStatus>,
    _stop: DropGuard,
}

// === impl App ===

impl App {
    fn overlays(&self) -> std::sync::MutexGuard<'_, Overlays> {
        self.inner.overlays.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts, keeps or stops the overlay watch to match `config`.
    pub(super) fn set_overlay_watch(&self, config: &Config) {
        let prefix = config.etcd.as_ref().and_then(|e| e.overlay_prefix.clone());
        let etcd = self.sources(config).etcd;
        let mut state = self.overlays();
        let same = match (&state.follow, &prefix, &etcd) {
            (Some(f), Some(p), Some(e)) => f.prefix == *p && Arc::ptr_eq(&f.etcd, e),
            (None, None, _) => true,
            _ => false,
        };
        if same {
            return;
        }
        state.follow = None;
        state.docs.clear();
        state.good.clear();
        state.refused.clear();
        let (Some(prefix), Some(etcd)) = (prefix, etcd) else { return };
        let stop = CancellationToken::new();
        let status = Arc::new(WatchStatus::default());
        let (tx, mut rx) = tokio::sync::watch::channel(None::<Values>);
        let publish = move |values: &Values, _revision| {
            let _ = tx.send(Some(values.clone()));
        };
        let what = format!("overlays under {prefix}");
        tokio::spawn(watch::follow(
            etcd.clone(),
            prefix.clone(),
            what,
            status.clone(),
            stop.clone(),
            publish,
        ));
        let weak = Arc::downgrade(&self.inner);
        let (until, key_prefix) = (stop.clone(), prefix.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = until.cancelled() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
                let Some(values) = rx.borrow_and_update().clone() else { continue };
                let Some(inner) = weak.upgrade() else { return };
                App { inner }.overlays_changed(&key_prefix, &values).await;
            }
        });
        state.follow = Some(Follow { prefix, etcd, status, _stop: stop.drop_guard() });
    }

    /// New overlay documents from etcd: lay them over the file and apply the result.
    async fn overlays_changed(&self, prefix: &str, values: &Values) {
        let docs = values
            .iter()
            .filter_map(|(key, value)| {
                let service = key.strip_prefix(prefix)?.to_string();
                let text = String::from_utf8_lossy(value).into_owned();
                Some((service.clone(), Overlay { service, key: key.clone(), text }))
            })
            .collect();
        self.overlays().docs = docs;
        let file = (*self.config()).clone();
        if self.apply(file).await {
            tracing::info!(generation = self.runtime().generation, "etcd overlays applied");
        }
    }

    /// `config` (from the file) with every overlay that validates laid over it; the others
    /// are recorded as refused.
    pub(super) fn layer(&self, config: Config) -> Config {
        let mut state = self.overlays();
        let wanted = config.etcd.as_ref().and_then(|e| e.overlay_prefix.as_deref());
        if wanted.is_none() || wanted != state.follow.as_ref().map(|f| f.prefix.as_str()) {
            return config;
        }
        let mut good: Vec<Overlay> = Vec::new();
        let mut refused = BTreeMap::new();
        let mut last_good = BTreeMap::new();
        for doc in state.docs.values() {
            let valid = |d: &Overlay| {
                let mut trial = good.clone();
                trial.push(d.clone());
                config.with_overlays(&trial).map(|_| ())
            };
            match valid(doc) {
                Ok(()) => {
                    last_good.insert(doc.service.clone(), doc.clone());
                    good.push(doc.clone());
                }
                Err(problems) => {
                    let why = problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
                    refused.insert(doc.service.clone(), (doc.text.clone(), why));
                    // An invalid overlay changes nothing: the service keeps the last one that
                    // validated (if it still does over this file).
                    if let Some(previous) = state.good.get(&doc.service).filter(|p| valid(p).is_ok()) {
                        last_good.insert(doc.service.clone(), previous.clone());
                        good.push(previous.clone());
                    }
                }
            }
        }
        state.good = last_good;
        for (service, (text, why)) in &refused {
            if state.refused.get(service).is_none_or(|(old, _)| old != text) {
                state.failures += 1;
                tracing::error!(%service, "etcd overlay refused; the service keeps its other settings:\n{why}");
            }
        }
        state.refused = refused;
        drop(state);
        match config.with_overlays(&good) {
            Ok(layered) => layered,
            Err(_) => config,
        }
    }

    /// The overlays for `/config`: each one's key, whether it applies, what it overrides
    /// (paths inside the service), and why it was refused.
    pub fn overlay_status(&self) -> serde_json::Value {
        let state = self.overlays();
        let Some(follow) = &state.follow else { return serde_json::Value::Null };
        let services: serde_json::Map<_, _> = state
            .docs
            .iter()
            .map(|(service, doc)| {
                let refused = state.refused.get(service).map(|(_, why)| why.clone());
                let in_force = state.good.get(service);
                let view = serde_json::json!({
                    "key": doc.key,
                    "applied": refused.is_none(),
                    "overrides": in_force.map(|d| overridden_paths(&d.text)).unwrap_or_default(),
                    "in_force": in_force.map(|d| d.text.clone()),
                    "error": refused,
                });
                (service.clone(), view)
            })
            .collect();
        serde_json::json!({
            "prefix": follow.prefix,
            "watch": follow.status.to_json(),
            "refused_total": state.failures,
            "services": services,
        })
    }

    /// Overlays refused so far, for `/metrics`.
    pub fn overlay_failures(&self) -> Option<u64> {
        let state = self.overlays();
        state.follow.as_ref().map(|_| state.failures)
    }
}

/// The leaf paths an overlay document sets, e.g. `retries.max_attempts`, `weights.10.0.0.1:80`.
fn overridden_paths(text: &str) -> Vec<String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&p, v, out);
                }
            }
            _ if !prefix.is_empty() => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = serde_saphyr::from_str::<serde_json::Value>(text) {
        walk("", &v, &mut out);
    }
    out
}
