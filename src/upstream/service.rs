//! The task that owns one service's endpoint state: the only writer of its balancer.
//!
//! It applies endpoint sets (from discovery) and settings (from reload), rebuilds the
//! snapshot when requests or health checks report a change, and sleeps until the earliest
//! ejection ends — one timer for the whole service. Requests never wait for it.
//! Must not: be awaited by the request path.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Balancer, Owner, Settings};
use crate::config::EndpointSpec;

/// A running owner task; dropping it stops the task.
#[derive(Debug)]
pub(crate) struct Service {
    handle: ServiceHandle,
    _stop: DropGuard,
}

/// Sends changes to a service's owner task. Cheap to clone (discovery sources hold one).
#[derive(Debug, Clone)]
pub(crate) struct ServiceHandle {
    balancer: Arc<Balancer>,
    commands: mpsc::UnboundedSender<Command>,
}

#[derive(Debug)]
enum Command {
    Update(Vec<EndpointSpec>, Option<oneshot::Sender<()>>),
    Configure(Box<Settings>, oneshot::Sender<()>),
}

// === impl Service ===

impl Service {
    pub(crate) fn spawn(name: &str, settings: &Settings) -> Service {
        let (balancer, owner) = Balancer::new(settings);
        let (commands, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let span = tracing::info_span!("service", service = %name);
        tokio::spawn(tracing::Instrument::instrument(run(owner, rx, stop.clone()), span));
        Service { handle: ServiceHandle { balancer, commands }, _stop: stop.drop_guard() }
    }

    pub(crate) fn handle(&self) -> &ServiceHandle {
        &self.handle
    }
}

// === impl ServiceHandle ===

impl ServiceHandle {
    pub(crate) fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }

    /// Hands over a new endpoint set; applied by the owner shortly after.
    pub(crate) fn update(&self, specs: Vec<EndpointSpec>) {
        let _ = self.commands.send(Command::Update(specs, None));
    }

    /// Hands over a new endpoint set and waits until requests see it.
    pub(crate) async fn update_now(&self, specs: Vec<EndpointSpec>) {
        let (done, applied) = oneshot::channel();
        if self.commands.send(Command::Update(specs, Some(done))).is_ok() {
            let _ = applied.await;
        }
    }

    /// Changes the picking and ejection settings; returns once requests see them.
    pub(crate) async fn configure(&self, settings: Settings) {
        let (done, applied) = oneshot::channel();
        if self.commands.send(Command::Configure(Box::new(settings), done)).is_ok() {
            let _ = applied.await;
        }
    }
}

async fn run(mut owner: Owner, mut commands: mpsc::UnboundedReceiver<Command>, stop: CancellationToken) {
    loop {
        let next_return = owner.next_return();
        tokio::select! {
            () = stop.cancelled() => return,
            command = commands.recv() => match command {
                None => return,
                Some(Command::Update(specs, done)) => {
                    owner.update(&specs);
                    done.map(|d| d.send(()));
                }
                Some(Command::Configure(settings, done)) => {
                    owner.configure(&settings);
                    let _ = done.send(());
                }
            },
            Some(()) = owner.woken.recv() => owner.refresh(),
            () = sleep_until(next_return) => owner.refresh(),
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::upstream::tests::{outlier, specs};

    #[tokio::test(start_paused = true)]
    async fn ejections_are_applied_and_end_on_time_with_one_timer() {
        let mut cfg = outlier();
        (cfg.max_ejection_percent, cfg.base_ejection) = (100, Duration::from_secs(30));
        let service = Service::spawn(
            "svc",
            &crate::upstream::tests::settings(crate::config::Policy::WeightedRoundRobin, &cfg),
        );
        let handle = service.handle().clone();
        handle.update_now(specs(&[1, 1, 1])).await;
        let b = handle.balancer().clone();
        let (a, c) = (b.snapshot().endpoints[0].state.clone(), b.snapshot().endpoints[2].state.clone());
        for _ in 0..5 {
            b.report(&a, true);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..5 {
            b.report(&c, true);
        }
        tokio::task::yield_now().await;
        assert_eq!(b.describe().iter().filter(|e| e.state == "ejected").count(), 2);
        tokio::time::advance(Duration::from_secs(20)).await; // a's 30 s are over, c's are not
        tokio::task::yield_now().await;
        let states: Vec<_> = b.describe().iter().map(|e| e.state).collect();
        assert_eq!(states, ["probing", "active", "ejected"]);
        tokio::time::advance(Duration::from_secs(10)).await;
        tokio::task::yield_now().await;
        assert_eq!(b.describe()[2].state, "probing");
    }
}
