//! The state every task of the daemon shares: the configuration in force, the router's
//! thread, the experts' HTTP clients, the MQTT link, metrics and the duplicate-suppression
//! books. `daemon` builds it; `serve` and the daemon's own tasks read it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use qosroute_expert_client::ExpertClient;
use qosroute_telemetry::HostSample;
use tokio_util::sync::CancellationToken;

use crate::admission::{RecentAnswers, RecentRequests};
use crate::config::Config;
use crate::link::Link;
use crate::metrics::Metrics;
use crate::router_thread::RouterThread;

/// State shared by every task.
#[derive(Debug)]
pub struct Shared {
    pub(crate) config: RwLock<Arc<Config>>,
    /// The decision maker and its books, on their own thread.
    pub router: RouterThread,
    pub(crate) clients: RwLock<HashMap<String, ExpertClient>>,
    /// The MQTT link.
    pub link: Link,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled when in-flight requests must stop (drain deadline passed).
    pub cut: CancellationToken,
    pub(crate) next_key: AtomicU64,
    pub(crate) answered: std::sync::Mutex<RecentAnswers>,
    /// The last host telemetry sample (only taken while an expert is local).
    pub(crate) host: std::sync::Mutex<Option<HostSample>>,
    /// Requests seen recently (duplicate suppression), with whether each is still in flight.
    pub(crate) recent: std::sync::Mutex<RecentRequests>,
    /// Requests being served: the places `admission.max_in_flight` bounds.
    pub(crate) serving: AtomicUsize,
}

impl Shared {
    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A fresh internal request key.
    pub fn next_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// The HTTP client of an expert, by name.
    pub fn client(&self, name: &str) -> Option<ExpertClient> {
        let clients = match self.clients.read() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        clients.get(name).cloned()
    }

    pub(crate) fn recent(&self) -> std::sync::MutexGuard<'_, RecentRequests> {
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers which expert answered a device's request, for its feedback.
    pub fn answered(&self, device: &str, id: &str, expert: &str, task: qosroute_core::Task) {
        if let Ok(mut answers) = self.answered.lock() {
            answers.answered(device, id, expert.into(), task);
        }
    }
}
