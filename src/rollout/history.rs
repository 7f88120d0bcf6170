//! What operators and reports read of rollouts: status (live counters over the stored
//! record), the list, and a rollout's whole history with its guardrail snapshots and the
//! decisions of each arm.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::RolloutError;
use super::guardrails::GuardrailReading;
use super::live::ArmCounts;
use super::router::Router;
use super::store::{RolloutRecord, RolloutStore, Snapshot, StoreError, Transition};
use crate::decision_log::{DecisionLog, RolloutDecisions};

/// What `status` reports.
#[derive(Debug, Clone)]
pub struct RolloutStatus {
    pub record: RolloutRecord,
    pub share_bp: u32,
    pub shadow: bool,
    pub step_decisions: u64,
    pub counts: ArmCounts,
    pub champion_window: usize,
    pub candidate_window: usize,
    pub shadow_dropped: u64,
    pub readings: Vec<GuardrailReading>,
    pub transitions: Vec<Transition>,
}

/// A rollout's whole history, for its report.
#[derive(Debug, Clone)]
pub struct RolloutHistory {
    pub status: RolloutStatus,
    pub snapshots: Vec<Snapshot>,
    pub decisions: RolloutDecisions,
}

/// Reads rollouts: the open ones from memory, closed ones from the store.
pub struct History {
    router: Arc<Router>,
    store: Arc<RolloutStore>,
    log: Arc<dyn DecisionLog>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").finish_non_exhaustive()
    }
}

impl History {
    pub fn new(router: Arc<Router>, store: Arc<RolloutStore>, log: Arc<dyn DecisionLog>) -> Self {
        History { router, store, log }
    }

    /// The model's open rollout, or else its latest one.
    pub fn status(&self, model: &str) -> Result<RolloutStatus, RolloutError> {
        let record = match self.router.get(model) {
            Some(l) => l.record(),
            None => self
                .store
                .list(false)?
                .into_iter()
                .find(|r| r.model == model)
                .ok_or_else(|| RolloutError::NoRollout(model.to_string()))?,
        };
        self.status_of(record)
    }

    fn status_of(&self, record: RolloutRecord) -> Result<RolloutStatus, RolloutError> {
        let transitions = self.store.transitions(&record.id)?;
        let live = self.router.get(&record.model).filter(|l| l.id == record.id);
        let dropped = self.router.shadow_dropped();
        Ok(match live {
            Some(l) => {
                let w = l.windows.lock().expect("windows lock");
                RolloutStatus {
                    share_bp: l.share_bp.load(Ordering::Acquire),
                    shadow: l.shadow.load(Ordering::Acquire),
                    step_decisions: l.step_decisions.load(Ordering::Relaxed),
                    counts: w.counts,
                    champion_window: w.champion.len(),
                    candidate_window: w.candidate.len(),
                    shadow_dropped: dropped,
                    readings: l.readings(),
                    transitions,
                    record,
                }
            }
            None => RolloutStatus {
                share_bp: 0,
                shadow: false,
                step_decisions: 0,
                counts: ArmCounts::default(),
                champion_window: 0,
                candidate_window: 0,
                shadow_dropped: dropped,
                readings: transitions
                    .last()
                    .map(|t| t.figures.clone())
                    .unwrap_or_default(),
                transitions,
                record,
            },
        })
    }

    /// The rollout `id`, or the model's open or latest one when `id` is empty: its status,
    /// guardrail snapshots and the decisions of each arm. Reads on a blocking thread.
    pub async fn history(&self, id: &str, model: &str) -> Result<RolloutHistory, RolloutError> {
        let status = if id.is_empty() {
            self.status(model)?
        } else {
            let record = self
                .store
                .get(id)?
                .ok_or_else(|| RolloutError::UnknownId(id.to_string()))?;
            self.status_of(record)?
        };
        let store = self.store.clone();
        let log = self.log.clone();
        let (rid, since) = (status.record.id.clone(), status.record.created_at.clone());
        let (snapshots, decisions) = tokio::task::spawn_blocking(move || {
            let snapshots = store.snapshots(&rid)?;
            let decisions = log.rollout_decisions(&rid, &since)?;
            Ok::<_, RolloutError>((snapshots, decisions))
        })
        .await
        .map_err(|e| StoreError::Failed(e.to_string()))??;
        Ok(RolloutHistory {
            status,
            snapshots,
            decisions,
        })
    }

    /// Every rollout, newest first.
    pub fn list(&self) -> Result<Vec<RolloutStatus>, RolloutError> {
        self.store
            .list(false)?
            .into_iter()
            .map(|r| self.status_of(r))
            .collect()
    }
}
