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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::bundle::Bundle;
    use crate::policy::Outcome;
    use crate::rollout::guardrails::Observation;
    use crate::rollout::live::ArmCounts;
    use crate::rollout::store::RolloutRecord;
    use crate::rollout::{Arm, Plan, State};

    fn bundle() -> Arc<Bundle> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/credit-limit/v1");
        Arc::new(Bundle::load(&dir, None).expect("the shipped v1"))
    }

    /// A router with one open rollout of `credit-limit` at `step` of the default plan
    /// (0 is the shadow step, 1 is 1%, the last is 100%).
    fn router_at(step: usize) -> Router {
        let record = RolloutRecord {
            id: "r-test".into(),
            model: "credit-limit".into(),
            champion: "v1".into(),
            candidate: "v2".into(),
            plan: Plan::default(),
            state: State::Active,
            step,
            step_started_at: String::new(),
            created_at: String::new(),
            backtest: None,
        };
        let router = Router::new();
        router.insert(Arc::new(Live::new(record, bundle())));
        router
    }

    fn served() -> Observation {
        Observation::of(
            Outcome::Approve,
            0.1,
            Some(10),
            20,
            Duration::from_micros(5),
        )
    }

    #[test]
    fn without_a_rollout_the_champion_decides_and_nothing_is_observed() {
        let router = Router::new();
        let route = router.route("credit-limit", "c1");
        assert_eq!(route.arm, Arm::Champion);
        assert!(route.candidate.is_none() && route.rollout_id.is_none());
        assert!(route.as_shadow().is_none());
        route.observe(served());
        assert!(!router.is_open("credit-limit"));
        assert!(router.open_now().is_empty());
    }

    #[test]
    fn at_the_shadow_step_the_champion_serves_and_the_shadow_is_counted_for_the_step() {
        let router = router_at(0);
        let route = router.route("credit-limit", "c1");
        assert_eq!(route.arm, Arm::Champion);
        assert_eq!(route.rollout_id.as_deref(), Some("r-test"));
        let shadow = route
            .as_shadow()
            .expect("the shadow step shadows every request");
        assert_eq!(shadow.arm, Arm::Shadow);
        assert!(shadow.candidate.is_some());
        assert!(
            shadow.as_shadow().is_none(),
            "a shadow is not shadowed again"
        );

        route.observe(served());
        shadow.observe(served());
        shadow.observe(Observation::REFUSED);
        let live = router.get("credit-limit").unwrap();
        let w = live.windows.lock().unwrap();
        assert_eq!(
            w.counts,
            ArmCounts {
                champion: 1,
                candidate: 0,
                shadow: 2,
                errors: 1
            }
        );
        assert_eq!((w.champion.len(), w.candidate.len()), (1, 2));
        assert_eq!(live.step_decisions.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn at_full_share_every_customer_gets_the_candidate_and_uses_names_both_versions() {
        let router = router_at(Plan::default().steps.len() - 1);
        for c in 0..200 {
            let route = router.route("credit-limit", &format!("c{c}"));
            assert_eq!(route.arm, Arm::Candidate);
            assert!(route.candidate.is_some() && route.as_shadow().is_none());
        }
        assert!(router.uses("credit-limit", "v1") && router.uses("credit-limit", "v2"));
        assert!(!router.uses("credit-limit", "v3") && !router.uses("other", "v2"));
        let open = router.open_now();
        assert_eq!(open.len(), 1);
        assert_eq!(
            (open[0].share_bp, open[0].candidate.as_str()),
            (10_000, "v2")
        );
    }

    #[test]
    fn a_stopped_rollout_routes_nobody_to_the_candidate_and_removal_closes_it() {
        let router = router_at(1);
        router.get("credit-limit").unwrap().stop_routing();
        for c in 0..200 {
            let route = router.route("credit-limit", &format!("c{c}"));
            assert_eq!(route.arm, Arm::Champion);
            assert!(route.as_shadow().is_none());
        }
        router.remove("credit-limit");
        assert!(!router.is_open("credit-limit"));
        assert!(router.route("credit-limit", "c1").rollout_id.is_none());
    }
}
