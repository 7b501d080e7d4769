//! TLS session caches that forget everything when TLS material rotates.
//!
//! A resumed handshake skips the certificate exchange: it carries over the identities of the
//! session it resumes. After a rotation that would keep presenting our old certificate (a
//! resumed client session sends none), keep accepting peers verified under a CA bundle we
//! just replaced, and hide the new serial from the next handshake. So each cache belongs to
//! one rotation count of the [`Registry`](super::Registry); the first use after a rotation
//! starts an empty one. Rotations are rare, so the cost is one full handshake per peer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use rustls::NamedGroup;
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::pki_types::ServerName;
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};

/// Sessions per cache: rustls's default.
const CAPACITY: usize = 256;

/// A cache valid for one rotation count.
#[derive(Debug)]
struct Generation<C> {
    rotation: u64,
    cache: Arc<C>,
}

/// Client sessions (TLS 1.2 ids and tickets, TLS 1.3 tickets) of one service.
#[derive(Debug)]
pub(crate) struct ClientSessions {
    rotations: Arc<AtomicU64>,
    current: ArcSwap<Generation<ClientSessionMemoryCache>>,
}

/// Server sessions of one listener (stateful TLS 1.2 and 1.3 resumption).
#[derive(Debug)]
pub(crate) struct ServerSessions {
    rotations: Arc<AtomicU64>,
    current: ArcSwap<Generation<Arc<dyn StoresServerSessions>>>,
}

/// The cache for the current rotation count, replacing a stale one.
fn current<C>(rotations: &AtomicU64, slot: &ArcSwap<Generation<C>>, make: impl FnOnce() -> C) -> Arc<C> {
    let now = rotations.load(Ordering::Acquire);
    let held = slot.load();
    if held.rotation == now {
        return held.cache.clone();
    }
    let fresh = Arc::new(Generation { rotation: now, cache: Arc::new(make()) });
    slot.store(fresh.clone());
    fresh.cache.clone()
}

// === impl ClientSessions ===

impl ClientSessions {
    pub(crate) fn new(rotations: Arc<AtomicU64>) -> ClientSessions {
        let rotation = rotations.load(Ordering::Acquire);
        let cache = Arc::new(ClientSessionMemoryCache::new(CAPACITY));
        ClientSessions { rotations, current: ArcSwap::from_pointee(Generation { rotation, cache }) }
    }

    fn cache(&self) -> Arc<ClientSessionMemoryCache> {
        current(&self.rotations, &self.current, || ClientSessionMemoryCache::new(CAPACITY))
    }
}

impl ClientSessionStore for ClientSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.cache().set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.cache().kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.cache().set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.cache().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.cache().remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.cache().insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.cache().take_tls13_ticket(server_name)
    }
}

// === impl ServerSessions ===

impl ServerSessions {
    pub(crate) fn new(rotations: Arc<AtomicU64>) -> ServerSessions {
        let rotation = rotations.load(Ordering::Acquire);
        let cache = Arc::new(fresh_server_cache());
        ServerSessions { rotations, current: ArcSwap::from_pointee(Generation { rotation, cache }) }
    }

    fn cache(&self) -> Arc<Arc<dyn StoresServerSessions>> {
        current(&self.rotations, &self.current, fresh_server_cache)
    }
}

fn fresh_server_cache() -> Arc<dyn StoresServerSessions> {
    ServerSessionMemoryCache::new(CAPACITY)
}

impl StoresServerSessions for ServerSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.cache().put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.cache().get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.cache().take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_empties_the_cache() {
        let rotations = Arc::new(AtomicU64::new(3));
        let sessions = ServerSessions::new(rotations.clone());
        assert!(sessions.put(b"id".to_vec(), b"session".to_vec()));
        assert_eq!(sessions.get(b"id").as_deref(), Some(&b"session"[..]));
        rotations.fetch_add(1, Ordering::Release);
        assert_eq!(sessions.get(b"id"), None, "a session from before the rotation resumed");
        assert!(sessions.put(b"id".to_vec(), b"new".to_vec()));
        assert_eq!(sessions.get(b"id").as_deref(), Some(&b"new"[..]));
    }
}
