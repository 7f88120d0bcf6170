//! The request path's view of the open rollouts: one per model, behind an `ArcSwap`, so that
//! routing is a pointer load and a keyed hash and never waits for control.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use super::guardrails::GuardrailReading;
use super::is_candidate;
use super::live::{Live, Route};

/// An open rollout's share and latest guardrail readings.
#[derive(Debug, Clone)]
pub struct OpenRollout {
    pub model: String,
    pub id: String,
    pub candidate: String,
    pub share_bp: u32,
    pub readings: Vec<GuardrailReading>,
}

/// The open rollouts by model, read on every request and changed by [`super::Control`].
#[derive(Debug, Default)]
pub struct Router {
    live: ArcSwap<BTreeMap<String, Arc<Live>>>,
    /// Shadow scorings dropped because the shadow queue was full.
    shadow_dropped: AtomicU64,
}

impl Router {
    pub fn new() -> Router {
        Router::default()
    }

    /// The arm of a customer: a pure function of (rollout id, customer id) and the share.
    pub fn route(&self, model: &str, customer_id: &str) -> Route {
        let map = self.live.load();
        let Some(live) = map.get(model) else {
            return Route::champion();
        };
        let share = live.share_bp.load(Ordering::Acquire);
        Route::through(live, is_candidate(&live.id, customer_id, share))
    }

    /// Whether the model has an open rollout (its serving version must not be switched by hand).
    pub fn is_open(&self, model: &str) -> bool {
        self.live.load().contains_key(model)
    }

    /// Whether an open rollout uses this version (it must not be unloaded).
    pub fn uses(&self, model: &str, version: &str) -> bool {
        self.live.load().get(model).is_some_and(|l| {
            let r = l.record.lock().expect("rollout lock");
            r.candidate == version || r.champion == version
        })
    }

    /// Counts a shadow scoring that was dropped (its queue was full).
    pub fn count_shadow_dropped(&self) {
        self.shadow_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Shadow scorings dropped since the start.
    pub fn shadow_dropped(&self) -> u64 {
        self.shadow_dropped.load(Ordering::Relaxed)
    }

    /// The open rollouts from memory alone (no store), for gauges read on the metrics
    /// exporter's thread.
    pub fn open_now(&self) -> Vec<OpenRollout> {
        self.live
            .load()
            .iter()
            .map(|(model, l)| OpenRollout {
                model: model.clone(),
                id: l.id.clone(),
                candidate: l.record.lock().expect("rollout lock").candidate.clone(),
                share_bp: l.share_bp.load(Ordering::Acquire),
                readings: l.readings(),
            })
            .collect()
    }

    pub(super) fn get(&self, model: &str) -> Option<Arc<Live>> {
        self.live.load().get(model).cloned()
    }

    pub(super) fn all(&self) -> Vec<Arc<Live>> {
        self.live.load().values().cloned().collect()
    }

    pub(super) fn insert(&self, live: Arc<Live>) {
        let model = live.record.lock().expect("rollout lock").model.clone();
        self.live.rcu(|map| {
            let mut map = (**map).clone();
            map.insert(model.clone(), live.clone());
            map
        });
    }

    pub(super) fn remove(&self, model: &str) {
        self.live.rcu(|map| {
            let mut map = (**map).clone();
            map.remove(model);
            map
        });
    }
}
