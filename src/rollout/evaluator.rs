//! The guardrail evaluator: on every tick, reads each open rollout's windows, rolls back a
//! rollout whose candidate breaches a guardrail, advances one that has baked with enough
//! decisions, and keeps a sample of the readings for the history.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::State;
use super::control::{Control, now};
use super::guardrails::{GuardrailReading, evaluate};
use super::live::Live;
use super::router::Router;
use super::store::{RolloutRecord, RolloutStore, Snapshot};

/// Judges the open rollouts every tick until shutdown.
pub struct Evaluator {
    router: Arc<Router>,
    control: Arc<Control>,
    store: Arc<RolloutStore>,
    /// The least time between two snapshots of one rollout's readings.
    snapshot_every: Duration,
}

impl Evaluator {
    pub fn new(
        router: Arc<Router>,
        control: Arc<Control>,
        store: Arc<RolloutStore>,
        snapshot_every: Duration,
    ) -> Self {
        Evaluator {
            router,
            control,
            store,
            snapshot_every,
        }
    }

    /// Evaluates every `every` until shutdown.
    pub async fn run(self, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.evaluate_all().await,
            }
        }
    }

    async fn evaluate_all(&self) {
        for live in self.router.all() {
            let record = live.record();
            let readings = {
                let w = live.windows.lock().expect("windows lock");
                evaluate(&record.plan.guardrails, &w.champion, &w.candidate)
            };
            *live.readings.lock().expect("readings lock") = readings.clone();
            self.keep_snapshot(&live, &record, &readings);
            if let Some(b) = readings.iter().find(|r| r.breached) {
                let reason = format!(
                    "guardrail {} breached: {:.4} > {:.4} (candidate n={}, champion n={}{})",
                    b.name,
                    b.value,
                    b.threshold,
                    b.candidate_n,
                    b.champion_n,
                    b.p_value
                        .map(|p| format!(", p={p:.2e}"))
                        .unwrap_or_default()
                );
                tracing::warn!(rollout = %record.id, model = %record.model, %reason, "rolling back");
                if let Err(e) = self
                    .control
                    .rollback(&record.model, "guardrail", &reason, readings)
                    .await
                {
                    tracing::error!(error = %e, "automatic rollback failed");
                }
                continue;
            }
            let step = &record.plan.steps[record.step];
            let baked = live.step_started.lock().expect("step lock").elapsed()
                >= Duration::from_secs(step.min_bake_secs);
            let enough = live.step_decisions.load(Ordering::Relaxed) >= step.min_decisions;
            if record.state == State::Active
                && record.plan.auto_advance
                && record.step + 1 < record.plan.steps.len()
                && baked
                && enough
                && let Err(e) = self
                    .control
                    .advance(
                        &record.model,
                        Some(record.step),
                        "auto-advance",
                        "guardrails held through the bake time",
                        readings,
                    )
                    .await
            {
                tracing::error!(error = %e, "automatic advance failed");
            }
        }
    }

    /// Keeps the guardrails for the rollout's history, at most once per `snapshot_every`.
    /// The write runs on its own: the store shares the log's file, and under a busy log
    /// writer it can wait on SQLite's lock for a second or more, which must not hold up the
    /// guardrails. A failed write is logged and skipped: the history is for charts, not for
    /// decisions.
    fn keep_snapshot(&self, live: &Live, record: &RolloutRecord, readings: &[GuardrailReading]) {
        {
            let mut at = live.snapshot_at.lock().expect("snapshot lock");
            if at.is_some_and(|t| t.elapsed() < self.snapshot_every)
                || live.snapshot_writing.swap(true, Ordering::AcqRel)
            {
                return;
            }
            *at = Some(Instant::now());
        }
        let snapshot = Snapshot {
            at: now(),
            step: record.step,
            share_bp: live.share_bp.load(Ordering::Acquire),
            figures: readings.to_vec(),
        };
        let store = self.store.clone();
        let id = record.id.clone();
        let writing = live.snapshot_writing.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.save_snapshot(&id, &snapshot) {
                tracing::warn!(error = %e, "guardrail snapshot not kept");
            }
            writing.store(false, Ordering::Release);
        });
    }
}
