//! `outrider overlay get|set|delete`: edit a service's live overlay in etcd without
//! hand-writing JSON. `set` reads the current document, applies the changes, validates the
//! result laid over the config file exactly as every Outrider will, and writes it only if
//! it is valid — using the config file's own etcd settings.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Map, Value};

use crate::config::{Config, Overlay};
use crate::etcd::Etcd;

/// What to do with the overlay.
#[derive(Debug)]
pub enum OverlayAction {
    Get,
    Delete,
    Set {
        /// `ADDR=WEIGHT` (0 drains).
        weights: Vec<String>,
        /// `PATH=VALUE`, e.g. `retries.max_attempts=3`; VALUE is YAML.
        sets: Vec<String>,
        /// Paths to remove from the overlay (back to the file's value).
        unsets: Vec<String>,
        /// Start from this document instead of the current one.
        from: Option<PathBuf>,
    },
}

/// Runs `action` on `service`'s overlay; what to print.
pub async fn overlay(config_path: &Path, service: &str, action: OverlayAction) -> anyhow::Result<String> {
    let config = Config::load(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(etcd) = config.etcd.clone() else { bail!("the config has no `etcd` block") };
    let Some(prefix) = etcd.overlay_prefix.clone() else {
        bail!("the config's etcd block sets no `overlay_prefix`, so no Outrider reads overlays")
    };
    if !config.services.contains_key(service) {
        bail!("the config has no service {service:?}");
    }
    let key = format!("{prefix}{service}");
    let etcd = Etcd::new(etcd);
    let mut client = etcd.client().await.context("cannot reach etcd")?;
    let current = client.get(key.as_str(), None).await.context("cannot read the overlay")?;
    let text = current.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
    match action {
        OverlayAction::Get => Ok(text.unwrap_or_else(|| format!("no overlay at {key}"))),
        OverlayAction::Delete => {
            let deleted = client.delete(key.as_str(), None).await.context("cannot delete")?.deleted();
            Ok(if deleted > 0 {
                format!("deleted {key}: the file's values apply")
            } else {
                format!("no overlay at {key}")
            })
        }
        OverlayAction::Set { weights, sets, unsets, from } => {
            let mut doc = match (from, &text) {
                (Some(path), _) => parse_doc(
                    &std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )?,
                (None, Some(t)) => {
                    parse_doc(t).with_context(|| format!("the overlay now at {key} is unreadable"))?
                }
                (None, None) => Map::new(),
            };
            for w in &weights {
                let Some((addr, weight)) = w.split_once('=') else {
                    bail!("--weight {w:?}: expected ADDR=WEIGHT")
                };
                let weight: i64 =
                    weight.trim().parse().with_context(|| format!("--weight {w:?}: not a number"))?;
                let table = doc.entry("weights").or_insert_with(|| Value::Object(Map::new()));
                let Value::Object(table) = table else { bail!("`weights` in the overlay is not a map") };
                table.insert(addr.trim().to_string(), Value::from(weight));
            }
            for s in &sets {
                let Some((path, value)) = s.split_once('=') else {
                    bail!("--set {s:?}: expected PATH=VALUE")
                };
                let value: Value = serde_saphyr::from_str(value)
                    .with_context(|| format!("--set {s:?}: not a YAML value"))?;
                set_path(&mut doc, path.trim(), value)?;
            }
            for path in &unsets {
                match path.trim().strip_prefix("weights.") {
                    // Addresses contain dots: the rest is one key.
                    Some(addr) => {
                        if let Some(Value::Object(w)) = doc.get_mut("weights") {
                            w.remove(addr);
                        }
                    }
                    None => unset_path(&mut doc, path.trim()),
                }
            }
            let text = serde_json::to_string_pretty(&Value::Object(doc))?;
            let overlay = Overlay { service: service.to_string(), key: key.clone(), text: text.clone() };
            if let Err(problems) = config.with_overlays(&[overlay]) {
                let list: Vec<_> = problems.iter().map(|p| format!("  {p}")).collect();
                bail!("not written: the overlay would be refused:\n{}", list.join("\n"));
            }
            let put = client.put(key.as_str(), text.as_str(), None).await.context("cannot write")?;
            let revision = put.header().map_or(0, |h| h.revision());
            Ok(format!("{text}\nwritten to {key} at revision {revision}"))
        }
    }
}

fn parse_doc(text: &str) -> anyhow::Result<Map<String, Value>> {
    match serde_saphyr::from_str::<Value>(text)? {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        _ => bail!("an overlay is a map of settings"),
    }
}

fn set_path(doc: &mut Map<String, Value>, path: &str, value: Value) -> anyhow::Result<()> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop().filter(|l| !l.is_empty()) else { bail!("--set: empty path") };
    let mut map = doc;
    for part in parts {
        let entry = map.entry(part).or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(inner) = entry else { bail!("--set {path}: {part} is not a map") };
        map = inner;
    }
    map.insert(last.to_string(), value);
    Ok(())
}

fn unset_path(doc: &mut Map<String, Value>, path: &str) {
    match path.split_once('.') {
        None => {
            doc.remove(path);
        }
        Some((head, rest)) => {
            if let Some(Value::Object(inner)) = doc.get_mut(head) {
                unset_path(inner, rest);
                if inner.is_empty() {
                    doc.remove(head);
                }
            }
        }
    }
}
