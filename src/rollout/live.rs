//! An open rollout as the request path sees it, and the [`Route`] a request takes.
//!
//! Everything the request path reads is an atomic or a short lock (the guardrail windows),
//! so routing and observing never wait for control operations, which hold the model's
//! control turn instead.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::Arm;
use super::guardrails::{ArmWindow, GuardrailReading, Observation};
use super::store::RolloutRecord;
use crate::bundle::Bundle;

/// Counters per arm since the rollout started (this process).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ArmCounts {
    pub champion: u64,
    pub candidate: u64,
    pub shadow: u64,
    pub errors: u64,
}

/// Each arm's guardrail window, and the counts since the start.
#[derive(Debug, Default)]
pub(super) struct Windows {
    pub champion: ArmWindow,
    pub candidate: ArmWindow,
    pub counts: ArmCounts,
}

/// An open rollout in memory: its stored record, what routing reads, and what the
/// guardrails have seen.
#[derive(Debug)]
pub(super) struct Live {
    pub record: Mutex<RolloutRecord>,
    pub id: String,
    pub share_bp: AtomicU32,
    pub shadow: AtomicBool,
    pub candidate: Arc<Bundle>,
    pub windows: Mutex<Windows>,
    pub step_decisions: AtomicU64,
    pub step_started: Mutex<Instant>,
    pub readings: Mutex<Vec<GuardrailReading>>,
    /// When the guardrails were last kept for the history.
    pub snapshot_at: Mutex<Option<Instant>>,
    /// A snapshot write is under way; the next waits for it rather than queueing behind it.
    pub snapshot_writing: Arc<AtomicBool>,
}

impl Live {
    pub fn new(record: RolloutRecord, candidate: Arc<Bundle>) -> Live {
        let step = &record.plan.steps[record.step];
        let open = record.state.is_open();
        Live {
            id: record.id.clone(),
            share_bp: AtomicU32::new(if open { step.share_bp } else { 0 }),
            shadow: AtomicBool::new(open && step.shadow),
            candidate,
            windows: Mutex::new(Windows::default()),
            step_decisions: AtomicU64::new(0),
            // The bake restarts with the process: a restart never shortens a step.
            step_started: Mutex::new(Instant::now()),
            readings: Mutex::new(Vec::new()),
            snapshot_at: Mutex::new(None),
            snapshot_writing: Arc::default(),
            record: Mutex::new(record),
        }
    }

    /// The stored record as it is now.
    pub fn record(&self) -> RolloutRecord {
        self.record.lock().expect("rollout lock").clone()
    }

    /// The latest guardrail readings.
    pub fn readings(&self) -> Vec<GuardrailReading> {
        self.readings.lock().expect("readings lock").clone()
    }

    /// Stops routing to the candidate (share 0, no shadow), before anything is recorded.
    pub fn stop_routing(&self) {
        self.share_bp.store(0, Ordering::Release);
        self.shadow.store(false, Ordering::Release);
    }

    fn observe(&self, arm: Arm, o: Observation) {
        let cap = self
            .record
            .lock()
            .expect("rollout lock")
            .plan
            .guardrails
            .window;
        let mut w = self.windows.lock().expect("windows lock");
        match arm {
            Arm::Champion => {
                w.champion.push(o, cap);
                w.counts.champion += 1;
            }
            Arm::Candidate | Arm::Shadow => {
                w.candidate.push(o, cap);
                if arm == Arm::Candidate {
                    w.counts.candidate += 1;
                } else {
                    w.counts.shadow += 1;
                }
                if o.error {
                    w.counts.errors += 1;
                }
                // A step counts the arm it is about: shadow decisions at the shadow step,
                // candidate decisions once the candidate serves. (Shadow work still queued
                // when the shadow step ends must not count toward the next step.)
                let shadow_step = self.share_bp.load(Ordering::Acquire) == 0;
                if (arm == Arm::Shadow) == shadow_step {
                    self.step_decisions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Where one request goes: its arm, the bundle that decides when the candidate does, and a
/// handle on the rollout for the guardrails.
#[derive(Debug, Clone)]
pub struct Route {
    pub arm: Arm,
    pub rollout_id: Option<String>,
    /// The candidate bundle when the candidate decides; otherwise the serving version does.
    pub candidate: Option<Arc<Bundle>>,
    /// Whether the candidate should also score this request in the shadow.
    pub shadow: bool,
    live: Option<Arc<Live>>,
}

impl Route {
    /// The route with no rollout: the serving version decides and nothing is observed.
    pub fn champion() -> Route {
        Route {
            arm: Arm::Champion,
            rollout_id: None,
            candidate: None,
            shadow: false,
            live: None,
        }
    }

    pub(super) fn through(live: &Arc<Live>, candidate: bool) -> Route {
        Route {
            arm: if candidate {
                Arm::Candidate
            } else {
                Arm::Champion
            },
            rollout_id: Some(live.id.clone()),
            candidate: candidate.then(|| live.candidate.clone()),
            shadow: !candidate && live.shadow.load(Ordering::Acquire),
            live: Some(live.clone()),
        }
    }

    /// The route of this request's shadow scoring, when the candidate should score it in
    /// the shadow: arm shadow, decided by the candidate.
    pub fn as_shadow(&self) -> Option<Route> {
        let live = self.live.as_ref().filter(|_| self.shadow)?;
        Some(Route {
            arm: Arm::Shadow,
            rollout_id: Some(live.id.clone()),
            candidate: Some(live.candidate.clone()),
            shadow: false,
            live: Some(live.clone()),
        })
    }

    /// Feeds the rollout's guardrails what this route's arm did (a decision, or a refusal
    /// by its schema); nothing without a rollout.
    pub fn observe(&self, o: Observation) {
        if let Some(live) = &self.live {
            live.observe(self.arm, o);
        }
    }
}
