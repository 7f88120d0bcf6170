//! The rollout controller: open rollouts per model, routing, shadow scoring, the guardrail
//! evaluator, and the control operations (start, advance, pause, resume, rollback, promote).
//!
//! Routing reads an `ArcSwap` map and a few atomics, so the request path never waits for
//! control. Every change of a rollout is written to the store before it takes effect, so a
//! restart resumes exactly what was recorded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::guardrails::{ArmWindow, GuardrailReading, Observation, evaluate};
use super::store::{RolloutRecord, RolloutStore, Snapshot, StoreError, Transition};
use super::{Plan, State, Thresholds, is_candidate};

/// Customers the start gate backtests at most (the latest decision of each).
const GATE_SAMPLE: usize = 100_000;
use crate::backtest::{self, BacktestError, BacktestReport, BacktestSpec};
use crate::bundle::Bundle;
use crate::customer::CustomerKeys;
use crate::decision_log::{DecisionLog, LogError, RolloutDecisions};
use crate::policy::Outcome;
use crate::registry::{Registry, RegistryError, VersionInfo};
use crate::scoring::{Arm, Decision, ScoreRequest, decide, record_body};

/// Why a rollout operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("model {0} has no open rollout")]
    NoRollout(String),
    #[error("no rollout has the id {0}")]
    UnknownId(String),
    #[error("model {model} already has an open rollout ({id}); roll it back or promote it first")]
    AlreadyOpen { model: String, id: String },
    #[error("plan: {0}")]
    Plan(String),
    #[error("the candidate {0} is the serving version already")]
    SameVersion(String),
    #[error("the rollout is at its last step already")]
    LastStep,
    #[error("model {0} has an open rollout: promote or roll it back instead of switching by hand")]
    DecidedByRollout(String),
    #[error("the rollout is {0}")]
    WrongState(&'static str),
    #[error(
        "the backtest of {candidate} breaches the plan's guardrails: {why}; not started (--skip-backtest overrides, and is recorded)"
    )]
    BacktestFailed { candidate: String, why: String },
    #[error("backtest: {0}")]
    Backtest(#[from] BacktestError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Counters per arm since the rollout started (this process).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ArmCounts {
    pub champion: u64,
    pub candidate: u64,
    pub shadow: u64,
    pub errors: u64,
}

struct Windows {
    champion: ArmWindow,
    candidate: ArmWindow,
    counts: ArmCounts,
}

/// An open rollout, as the request path sees it.
pub struct Live {
    record: Mutex<RolloutRecord>,
    id: String,
    share_bp: AtomicU32,
    shadow: AtomicBool,
    candidate: Arc<Bundle>,
    windows: Mutex<Windows>,
    step_decisions: AtomicU64,
    step_started: Mutex<Instant>,
    readings: Mutex<Vec<GuardrailReading>>,
    /// When the guardrails were last kept for the history.
    snapshot_at: Mutex<Option<Instant>>,
    /// A snapshot write is under way; the next waits for it rather than queueing behind it.
    snapshot_writing: Arc<AtomicBool>,
}

impl Live {
    fn new(record: RolloutRecord, candidate: Arc<Bundle>) -> Live {
        let step = &record.plan.steps[record.step];
        let open = record.state.is_open();
        Live {
            id: record.id.clone(),
            share_bp: AtomicU32::new(if open { step.share_bp } else { 0 }),
            shadow: AtomicBool::new(open && step.shadow),
            candidate,
            windows: Mutex::new(Windows {
                champion: ArmWindow::default(),
                candidate: ArmWindow::default(),
                counts: ArmCounts::default(),
            }),
            step_decisions: AtomicU64::new(0),
            // The bake restarts with the process: a restart never shortens a step.
            step_started: Mutex::new(Instant::now()),
            readings: Mutex::new(Vec::new()),
            snapshot_at: Mutex::new(None),
            snapshot_writing: Arc::default(),
            record: Mutex::new(record),
        }
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

/// Where one request goes.
#[derive(Clone)]
pub struct Route {
    pub arm: Arm,
    pub rollout_id: Option<String>,
    /// The candidate bundle when the candidate serves; otherwise the serving version does.
    pub candidate: Option<Arc<Bundle>>,
    /// Whether the candidate should also score this request in the shadow.
    pub shadow: bool,
    live: Option<Arc<Live>>,
}

impl Route {
    fn champion() -> Route {
        Route {
            arm: Arm::Champion,
            rollout_id: None,
            candidate: None,
            shadow: false,
            live: None,
        }
    }
}

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

struct ShadowJob {
    live: Arc<Live>,
    request: ScoreRequest,
}

/// An open rollout's share and latest guardrail readings.
#[derive(Debug, Clone)]
pub struct OpenRollout {
    pub model: String,
    pub id: String,
    pub candidate: String,
    pub share_bp: u32,
    pub readings: Vec<GuardrailReading>,
}

/// A rollout's whole history, for its report.
#[derive(Debug, Clone)]
pub struct RolloutHistory {
    pub status: RolloutStatus,
    pub snapshots: Vec<Snapshot>,
    pub decisions: RolloutDecisions,
}

/// All rollouts of a server.
pub struct Rollouts {
    store: Arc<RolloutStore>,
    registry: Arc<Registry>,
    log: Arc<dyn DecisionLog>,
    keys: CustomerKeys,
    live: ArcSwap<BTreeMap<String, Arc<Live>>>,
    /// One control turn per model: a model's rollout operations, and switches of what
    /// serves it, run one at a time; other models' go on meanwhile (a long start-up
    /// backtest holds its own model only).
    control: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    shadow_tx: mpsc::Sender<ShadowJob>,
    shadow_rx: Mutex<Option<mpsc::Receiver<ShadowJob>>>,
    shadow_dropped: AtomicU64,
    snapshot_every: Duration,
    /// Customers the start gate backtests: [`GATE_SAMPLE`], or fewer if the server bounds
    /// backtests lower (`backtest_max_sample`).
    gate_sample: usize,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts").finish_non_exhaustive()
    }
}

fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

fn observation(d: &Decision, latency: Duration) -> Observation {
    Observation {
        declined: d.outcome == Outcome::Decline,
        cut: d.current_limit.is_some_and(|c| d.granted_limit < c),
        withdrawn: d
            .current_limit
            .is_some_and(|c| c > 0 && d.granted_limit == 0),
        pd: d.probability_of_default,
        latency_us: latency.as_micros().min(u128::from(u32::MAX)) as u32,
        error: false,
    }
}

const ERROR: Observation = Observation {
    declined: false,
    cut: false,
    withdrawn: false,
    pd: 0.0,
    latency_us: 0,
    error: true,
};

impl Rollouts {
    /// Opens the store and resumes every open rollout at its recorded step. A rollout whose
    /// candidate is no longer loadable is rolled back, with that reason.
    pub async fn open(
        store: RolloutStore,
        registry: Arc<Registry>,
        log: Arc<dyn DecisionLog>,
        keys: CustomerKeys,
        shadow_queue: usize,
        snapshot_every: Duration,
        backtest_max_sample: usize,
    ) -> Result<Arc<Rollouts>, RolloutError> {
        let (shadow_tx, shadow_rx) = mpsc::channel(shadow_queue.max(1));
        let rollouts = Arc::new(Rollouts {
            store: Arc::new(store),
            registry,
            log,
            keys,
            live: ArcSwap::from_pointee(BTreeMap::new()),
            control: Mutex::new(BTreeMap::new()),
            shadow_tx,
            shadow_rx: Mutex::new(Some(shadow_rx)),
            shadow_dropped: AtomicU64::new(0),
            snapshot_every,
            gate_sample: GATE_SAMPLE.min(backtest_max_sample),
        });
        for record in rollouts.store.list(true)? {
            match rollouts
                .registry
                .info(&record.model, &record.candidate)
                .ok()
                .and_then(|i| i.bundle)
            {
                Some(bundle) => {
                    tracing::info!(rollout = %record.id, model = %record.model, step = record.step, "rollout resumed");
                    rollouts.insert_live(Arc::new(Live::new(record, bundle)));
                }
                None => {
                    let mut closed = record.clone();
                    closed.state = State::RolledBack;
                    let t = Transition {
                        at: now(),
                        from_state: Some(record.state),
                        to_state: State::RolledBack,
                        from_step: Some(record.step),
                        to_step: record.step,
                        actor: "riskserve".into(),
                        reason: format!(
                            "candidate {} could not be loaded at start",
                            record.candidate
                        ),
                        figures: Vec::new(),
                    };
                    rollouts.store.save(&closed, &t)?;
                    tracing::error!(rollout = %record.id, "candidate missing at start; rolled back");
                }
            }
        }
        Ok(rollouts)
    }

    fn insert_live(&self, live: Arc<Live>) {
        let model = live.record.lock().expect("rollout lock").model.clone();
        self.live.rcu(|map| {
            let mut map = (**map).clone();
            map.insert(model.clone(), live.clone());
            map
        });
    }

    fn remove_live(&self, model: &str) {
        self.live.rcu(|map| {
            let mut map = (**map).clone();
            map.remove(model);
            map
        });
    }

    /// Waits for `model`'s control turn.
    async fn turn(&self, model: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .control
            .lock()
            .expect("control map lock")
            .entry(model.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    fn get_live(&self, model: &str) -> Result<Arc<Live>, RolloutError> {
        self.live
            .load()
            .get(model)
            .cloned()
            .ok_or_else(|| RolloutError::NoRollout(model.to_string()))
    }

    /// Makes `version` serve `model` (by hand, or by auto-serve) unless a rollout decides
    /// what serves it. In turn with the control operations: a rollout start captures the
    /// serving version as its champion and then backtests, and a switch in between would
    /// leave the rollout naming a champion that no longer serves.
    pub async fn serve_unless_rolling_out(
        &self,
        model: &str,
        version: &str,
    ) -> Result<VersionInfo, RolloutError> {
        let _turn = self.turn(model).await;
        if self.is_open(model) {
            return Err(RolloutError::DecidedByRollout(model.into()));
        }
        Ok(self.registry.serve(model, version).await?)
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

    /// The arm of a customer: a pure function of (rollout id, customer id) and the share.
    pub fn route(&self, model: &str, customer_id: &str) -> Route {
        let map = self.live.load();
        let Some(live) = map.get(model) else {
            return Route::champion();
        };
        let share = live.share_bp.load(Ordering::Acquire);
        let candidate = is_candidate(&live.id, customer_id, share);
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

    /// Feeds a served decision (or a refusal by the arm's schema) to the guardrails.
    pub fn observe(&self, route: &Route, decision: Option<&Decision>, latency: Duration) {
        if let Some(live) = &route.live {
            let o = decision.map_or(ERROR, |d| observation(d, latency));
            live.observe(route.arm, o);
        }
    }

    /// Queues a shadow scoring of this request; never waits. A full queue drops and counts.
    pub fn shadow(&self, route: &Route, request: &ScoreRequest) {
        let Some(live) = &route.live else { return };
        if !route.shadow {
            return;
        }
        let job = ShadowJob {
            live: live.clone(),
            request: request.clone(),
        };
        if self.shadow_tx.try_send(job).is_err() {
            self.shadow_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs the shadow worker and the guardrail evaluator until shutdown.
    pub async fn run(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let rx = self.shadow_rx.lock().expect("shadow rx").take();
        let shadow = rx.map(|rx| tokio::spawn(self.clone().shadow_worker(rx, shutdown.clone())));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.evaluate_all().await,
            }
        }
        if let Some(s) = shadow {
            let _ = s.await;
        }
    }

    async fn shadow_worker(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<ShadowJob>,
        shutdown: CancellationToken,
    ) {
        loop {
            let job = tokio::select! {
                _ = shutdown.cancelled() => return,
                job = rx.recv() => match job { Some(j) => j, None => return },
            };
            let started = Instant::now();
            let bundle = &job.live.candidate;
            let x = match bundle.schema.vector(&job.request.features) {
                Ok(x) => x,
                Err(_) => {
                    job.live.observe(Arm::Shadow, ERROR);
                    continue;
                }
            };
            let decision = decide(bundle, &job.request, &x, Arm::Shadow);
            let latency = started.elapsed();
            let body = record_body(
                &self.keys,
                &job.request,
                bundle,
                &x,
                &decision,
                Some(job.live.id.clone()),
            );
            match self.log.append(body).await {
                Ok(_) => job
                    .live
                    .observe(Arm::Shadow, observation(&decision, latency)),
                Err(e) => tracing::warn!(error = %e, "shadow decision not recorded"),
            }
        }
    }

    async fn evaluate_all(&self) {
        let lives: Vec<Arc<Live>> = self.live.load().values().cloned().collect();
        for live in lives {
            let record = live.record.lock().expect("rollout lock").clone();
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

    /// Records a transition, then applies it in memory.
    async fn transition(
        &self,
        live: &Arc<Live>,
        to_state: State,
        to_step: usize,
        actor: &str,
        reason: &str,
        figures: Vec<GuardrailReading>,
    ) -> Result<RolloutRecord, RolloutError> {
        let before = live.record.lock().expect("rollout lock").clone();
        let mut after = before.clone();
        after.state = to_state;
        after.step = to_step;
        if to_step != before.step {
            after.step_started_at = now();
        }
        let t = Transition {
            at: now(),
            from_state: Some(before.state),
            to_state,
            from_step: Some(before.step),
            to_step,
            actor: actor.to_string(),
            reason: reason.to_string(),
            figures,
        };
        let store = self.store.clone();
        let saved = after.clone();
        tokio::task::spawn_blocking(move || store.save(&saved, &t))
            .await
            .map_err(|e| StoreError(e.to_string()))??;
        let step = &after.plan.steps[to_step];
        let open = to_state.is_open();
        live.share_bp
            .store(if open { step.share_bp } else { 0 }, Ordering::Release);
        live.shadow.store(open && step.shadow, Ordering::Release);
        if to_step != before.step {
            live.step_decisions.store(0, Ordering::Relaxed);
            *live.step_started.lock().expect("step lock") = Instant::now();
        }
        *live.record.lock().expect("rollout lock") = after.clone();
        if !open {
            self.remove_live(&after.model);
        }
        tracing::info!(rollout = %after.id, model = %after.model, state = after.state.as_str(), step = after.step, actor, reason, "rollout transition");
        Ok(after)
    }

    /// Previews `candidate` on the model's recorded decisions, offline, on a blocking thread.
    pub async fn backtest(
        &self,
        candidate: &str,
        spec: BacktestSpec,
        thresholds: Thresholds,
        mut progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<BacktestReport, RolloutError> {
        let info = self.registry.load(&spec.model, candidate).await?;
        let bundle = info
            .bundle
            .ok_or(RolloutError::WrongState("candidate not loaded"))?;
        let log = self.log.clone();
        // A thread of its own at the lowest CPU priority, so that a preview yields to the
        // requests being served (and no pooled thread keeps the lowered priority).
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("backtest".into())
            .spawn(move || {
                #[cfg(target_os = "linux")]
                // SAFETY: setpriority on the calling thread (who = 0) has no memory effects.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 19);
                }
                let _ = tx.send(backtest::run(
                    &log,
                    &bundle,
                    &spec,
                    &thresholds,
                    &mut progress,
                ));
            })
            .map_err(|e| StoreError(format!("starting the backtest: {e}")))?;
        let report = rx
            .await
            .map_err(|_| StoreError("the backtest thread stopped".into()))??;
        Ok(report)
    }

    /// Starts rolling `candidate` out against the model's serving version, after a backtest
    /// on recorded traffic passes the plan's guardrails (unless `skip_backtest`).
    pub async fn start(
        &self,
        model: &str,
        candidate: &str,
        plan: Plan,
        actor: &str,
        skip_backtest: bool,
    ) -> Result<RolloutStatus, RolloutError> {
        let _turn = self.turn(model).await;
        plan.check().map_err(RolloutError::Plan)?;
        if let Some(open) = self.store.open_for(model)? {
            return Err(RolloutError::AlreadyOpen {
                model: model.into(),
                id: open.id,
            });
        }
        let champion = self.registry.serving(model)?;
        if champion.version() == candidate {
            return Err(RolloutError::SameVersion(candidate.into()));
        }
        let info = self.registry.load(model, candidate).await?;
        let bundle = info
            .bundle
            .ok_or(RolloutError::WrongState("candidate not loaded"))?;
        let (preview, reason) = if skip_backtest {
            (None, format!("started; backtest skipped by {actor}"))
        } else {
            let spec = BacktestSpec {
                model: model.into(),
                window: Default::default(),
                sample: Some(self.gate_sample),
                all_decisions: false,
                held_at_most: self.gate_sample,
            };
            match self
                .backtest(candidate, spec, plan.guardrails.clone(), |_, _| {})
                .await
            {
                Ok(report) => {
                    let breached: Vec<String> = report
                        .breached()
                        .iter()
                        .map(|g| format!("{} {:.4} > {:.4}", g.name, g.value, g.threshold))
                        .collect();
                    if !breached.is_empty() {
                        return Err(RolloutError::BacktestFailed {
                            candidate: candidate.into(),
                            why: breached.join(", "),
                        });
                    }
                    let why = format!("started; backtest passed on {} customers", report.compared);
                    (Some(report), why)
                }
                Err(RolloutError::Backtest(BacktestError::Empty(_))) => (
                    None,
                    "started; no recorded decisions to backtest on".to_string(),
                ),
                Err(e) => return Err(e),
            }
        };
        let record = RolloutRecord {
            id: uuid::Uuid::now_v7().to_string(),
            model: model.into(),
            champion: champion.version().into(),
            candidate: candidate.into(),
            plan,
            state: State::Active,
            step: 0,
            step_started_at: now(),
            created_at: now(),
            backtest: preview,
        };
        let t = Transition {
            at: record.created_at.clone(),
            from_state: None,
            to_state: State::Active,
            from_step: None,
            to_step: 0,
            actor: actor.into(),
            reason,
            figures: record
                .backtest
                .as_ref()
                .map(|b| b.guardrails.clone())
                .unwrap_or_default(),
        };
        let store = self.store.clone();
        let saved = record.clone();
        tokio::task::spawn_blocking(move || store.save(&saved, &t))
            .await
            .map_err(|e| StoreError(e.to_string()))??;
        tracing::info!(rollout = %record.id, model, candidate, "rollout started");
        self.insert_live(Arc::new(Live::new(record, bundle)));
        drop(_turn);
        self.status(model)
    }

    /// Moves to the next step. `from_step`, when given, must still be the current step (the
    /// evaluator passes the step it judged, so a concurrent manual advance is not doubled).
    pub async fn advance(
        &self,
        model: &str,
        from_step: Option<usize>,
        actor: &str,
        reason: &str,
        figures: Vec<GuardrailReading>,
    ) -> Result<RolloutRecord, RolloutError> {
        let _turn = self.turn(model).await;
        let live = self.get_live(model)?;
        let r = live.record.lock().expect("rollout lock").clone();
        if r.state != State::Active {
            return Err(RolloutError::WrongState(r.state.as_str()));
        }
        if from_step.is_some_and(|s| s != r.step) {
            return Err(RolloutError::WrongState(
                "at another step than the one judged",
            ));
        }
        if r.step + 1 >= r.plan.steps.len() {
            return Err(RolloutError::LastStep);
        }
        self.transition(&live, State::Active, r.step + 1, actor, reason, figures)
            .await
    }

    pub async fn pause(
        &self,
        model: &str,
        actor: &str,
        reason: &str,
    ) -> Result<RolloutRecord, RolloutError> {
        self.set_state(model, State::Active, State::Paused, actor, reason)
            .await
    }

    pub async fn resume(
        &self,
        model: &str,
        actor: &str,
        reason: &str,
    ) -> Result<RolloutRecord, RolloutError> {
        self.set_state(model, State::Paused, State::Active, actor, reason)
            .await
    }

    async fn set_state(
        &self,
        model: &str,
        from: State,
        to: State,
        actor: &str,
        reason: &str,
    ) -> Result<RolloutRecord, RolloutError> {
        let _turn = self.turn(model).await;
        let live = self.get_live(model)?;
        let r = live.record.lock().expect("rollout lock").clone();
        if r.state != from {
            return Err(RolloutError::WrongState(r.state.as_str()));
        }
        let figures = live.readings.lock().expect("readings lock").clone();
        self.transition(&live, to, r.step, actor, reason, figures)
            .await
    }

    /// Candidate share to 0 at once; the rollout is closed.
    pub async fn rollback(
        &self,
        model: &str,
        actor: &str,
        reason: &str,
        figures: Vec<GuardrailReading>,
    ) -> Result<RolloutRecord, RolloutError> {
        // Stop routing to the candidate before anything else, even before waiting for the
        // model's control turn (another operation on it may be under way): harm stops first.
        let live = self.get_live(model)?;
        live.share_bp.store(0, Ordering::Release);
        live.shadow.store(false, Ordering::Release);
        let _turn = self.turn(model).await;
        let live = self.get_live(model)?;
        let step = live.record.lock().expect("rollout lock").step;
        let result = self
            .transition(&live, State::RolledBack, step, actor, reason, figures)
            .await;
        if result.is_err() {
            // Not recorded: keep the candidate at 0 and stop auto-advance from undoing it
            // until an operator (or the next breach) records the rollback.
            live.record.lock().expect("rollout lock").state = State::Paused;
        }
        result
    }

    /// Makes the candidate the serving version and closes the rollout.
    pub async fn promote(
        &self,
        model: &str,
        actor: &str,
        reason: &str,
    ) -> Result<RolloutRecord, RolloutError> {
        let _turn = self.turn(model).await;
        let live = self.get_live(model)?;
        let r = live.record.lock().expect("rollout lock").clone();
        let figures = live.readings.lock().expect("readings lock").clone();
        // Record first, then switch: a failed write leaves the rollout as it was, never a
        // candidate serving everyone under a rollout that still looks open.
        let promoted = self
            .transition(&live, State::Promoted, r.step, actor, reason, figures)
            .await?;
        self.registry.serve(model, &r.candidate).await?;
        Ok(promoted)
    }

    /// The model's open rollout, or else its latest one.
    pub fn status(&self, model: &str) -> Result<RolloutStatus, RolloutError> {
        let record = match self.live.load().get(model) {
            Some(l) => l.record.lock().expect("rollout lock").clone(),
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
        let live = self
            .live
            .load()
            .get(&record.model)
            .filter(|l| l.id == record.id)
            .cloned();
        let dropped = self.shadow_dropped.load(Ordering::Relaxed);
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
                    readings: l.readings.lock().expect("readings lock").clone(),
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
        .map_err(|e| StoreError(e.to_string()))??;
        Ok(RolloutHistory {
            status,
            snapshots,
            decisions,
        })
    }

    /// The open rollouts as the request path sees them, from memory alone (no store), for
    /// gauges read on the metrics exporter's thread.
    pub fn open_now(&self) -> Vec<OpenRollout> {
        self.live
            .load()
            .iter()
            .map(|(model, l)| OpenRollout {
                model: model.clone(),
                id: l.id.clone(),
                candidate: l.record.lock().expect("rollout lock").candidate.clone(),
                share_bp: l.share_bp.load(Ordering::Acquire),
                readings: l.readings.lock().expect("readings lock").clone(),
            })
            .collect()
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
