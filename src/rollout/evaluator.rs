//! The guardrail evaluator: on every tick, reads each open rollout's windows, rolls back a
//! rollout whose candidate breaches a guardrail, advances one that has baked with enough
//! decisions, and keeps a sample of the readings for the history.
//!
//! Replicas on a shared store judge once, together: only the holder of the lease (see
//! [`super::Follower`]) acts, on the decisions of every replica read from the shared log,
//! with its bake time counted from the step's recorded start. The others keep readings of
//! their own traffic for their status.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::State;
use super::control::{Control, now};
use super::guardrails::{ArmWindow, GuardrailReading, Observation, evaluate, with_local};
use super::live::Live;
use super::router::Router;
use super::store::{RolloutRecord, RolloutStore, Snapshot};
use crate::decision_log::{DecisionLog, DecisionOutcome};

/// Judges the open rollouts every tick until shutdown.
pub struct Evaluator {
    router: Arc<Router>,
    control: Arc<Control>,
    store: Arc<RolloutStore>,
    log: Arc<dyn DecisionLog>,
    /// True while this server judges: always for one server; for replicas, while it holds
    /// the lease.
    lease: watch::Receiver<bool>,
    /// The least time between two snapshots of one rollout's readings.
    snapshot_every: Duration,
}

/// The guardrails of one rollout as judged this tick.
struct Judged {
    readings: Vec<GuardrailReading>,
    /// Decisions of the arm the current step is about, since it started.
    step_decisions: u64,
    /// How long the current step has run.
    baked: Duration,
}

impl Evaluator {
    pub fn new(
        router: Arc<Router>,
        control: Arc<Control>,
        store: Arc<RolloutStore>,
        log: Arc<dyn DecisionLog>,
        lease: watch::Receiver<bool>,
        snapshot_every: Duration,
    ) -> Self {
        Evaluator {
            router,
            control,
            store,
            log,
            lease,
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
            let local = {
                let w = live.windows.lock().expect("windows lock");
                evaluate(&record.plan.guardrails, &w.champion, &w.candidate)
            };
            if !*self.lease.borrow() {
                *live.readings.lock().expect("readings lock") = local;
                continue;
            }
            let judged = match self.judge_shared(&live, &record, &local).await {
                Ok(Some(judged)) => judged,
                Ok(None) => Judged {
                    readings: local,
                    step_decisions: live.step_decisions.load(Ordering::Relaxed),
                    baked: live.step_started.lock().expect("step lock").elapsed(),
                },
                Err(e) => {
                    // Judging on this replica's traffic alone could advance on a sample
                    // the plan did not ask for: wait for the shared log.
                    tracing::warn!(rollout = %record.id, error = %e, "guardrails not judged this tick");
                    continue;
                }
            };
            let readings = judged.readings;
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
            let baked = judged.baked >= Duration::from_secs(step.min_bake_secs);
            let enough = judged.step_decisions >= step.min_decisions;
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

    /// The guardrails on every replica's decisions, when the log is shared: the rates and
    /// PSI over the arms' latest decisions from the shared log, refusals and latency (which
    /// are not recorded) from this replica's own; the step's decisions and bake time from
    /// the shared log and the step's recorded start, so that a replica taking the lease over
    /// neither restarts nor shortens a step.
    async fn judge_shared(
        &self,
        live: &Live,
        record: &RolloutRecord,
        local: &[GuardrailReading],
    ) -> Result<Option<Judged>, crate::decision_log::LogError> {
        let started = humantime::parse_rfc3339(&record.step_started_at)
            .unwrap_or_else(|_| std::time::SystemTime::now());
        let since_us = started
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let (log, id, window) = (
            self.log.clone(),
            record.id.clone(),
            record.plan.guardrails.window,
        );
        let recent = tokio::task::spawn_blocking(move || log.recent_by_arm(&id, window, since_us))
            .await
            .map_err(|e| crate::decision_log::LogError::Query(e.to_string()))??;
        let Some(recent) = recent else {
            return Ok(None);
        };
        let window_of = |outcomes: &[DecisionOutcome]| {
            let mut w = ArmWindow::default();
            // Oldest first, as the window keeps them.
            for o in outcomes.iter().rev() {
                let seen = Observation::of(
                    o.decision,
                    o.pd,
                    o.current_limit,
                    o.granted_limit,
                    Duration::ZERO,
                );
                w.push(seen, window);
            }
            w
        };
        let shared = evaluate(
            &record.plan.guardrails,
            &window_of(&recent.champion),
            &window_of(&recent.candidate),
        );
        let about = if live.share_bp.load(Ordering::Acquire) == 0 {
            "shadow"
        } else {
            "candidate"
        };
        Ok(Some(Judged {
            readings: with_local(shared, local),
            step_decisions: recent
                .since
                .iter()
                .find(|(arm, _)| arm == about)
                .map_or(0, |(_, n)| *n),
            baked: started.elapsed().unwrap_or_default(),
        }))
    }

    /// Keeps the guardrails for the rollout's history, at most once per `snapshot_every`.
    /// The write runs on its own: a store write (an fsync, or a round trip to PostgreSQL)
    /// can take long under a busy disk, which must not hold up the guardrails. A failed
    /// write is logged and skipped: the history is for charts, not for decisions.
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
