//! Control operations on rollouts: start (behind the backtest gate), advance, pause, resume,
//! roll back, promote, and the switches of a model's serving version that a rollout decides.
//!
//! A model's operations take its control turn and run one at a time; other models' go on
//! meanwhile. Every change is written to the store before it takes effect in memory, so a
//! restart resumes exactly what was recorded.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use super::guardrails::GuardrailReading;
use super::live::Live;
use super::router::Router;
use super::store::{RolloutRecord, RolloutStore, StoreError, Transition};
use super::{Plan, RolloutError, State};
use crate::backtest::{BacktestError, BacktestSpec, Backtester};
use crate::registry::{Registry, VersionInfo};

/// Customers the start gate backtests at most (the latest decision of each).
const GATE_SAMPLE: usize = 100_000;

/// Runs the control operations of every model's rollout.
pub struct Control {
    store: Arc<RolloutStore>,
    registry: Arc<Registry>,
    router: Arc<Router>,
    backtester: Arc<Backtester>,
    /// One control turn per model: a model's rollout operations, and switches of what
    /// serves it, run one at a time; other models' go on meanwhile (a long start-up
    /// backtest holds its own model only).
    turns: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Customers the start gate backtests: [`GATE_SAMPLE`], or fewer if the server bounds
    /// backtests lower (`backtest_max_sample`).
    gate_sample: usize,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

pub(super) fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

impl Control {
    /// Resumes every open rollout of the store at its recorded step. A rollout whose
    /// candidate is no longer loadable is rolled back, with that reason.
    pub fn open(
        store: Arc<RolloutStore>,
        registry: Arc<Registry>,
        router: Arc<Router>,
        backtester: Arc<Backtester>,
    ) -> Result<Control, RolloutError> {
        for record in store.list(true)? {
            match registry
                .info(&record.model, &record.candidate)
                .ok()
                .and_then(|i| i.bundle)
            {
                Some(bundle) => {
                    tracing::info!(rollout = %record.id, model = %record.model, step = record.step, "rollout resumed");
                    router.insert(Arc::new(Live::new(record, bundle)));
                }
                None if store.pg().is_some() => {
                    // Shared: the rollout goes on on the other replicas; this one routes
                    // everyone to the champion until it has the candidate.
                    tracing::error!(rollout = %record.id, candidate = %record.candidate, "candidate missing on this replica; routing the champion only");
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
                    store.save(&closed, &t)?;
                    tracing::error!(rollout = %record.id, "candidate missing at start; rolled back");
                }
            }
        }
        Ok(Control {
            gate_sample: GATE_SAMPLE.min(backtester.max_sample()),
            store,
            registry,
            router,
            backtester,
            turns: Mutex::new(BTreeMap::new()),
        })
    }

    /// Waits for `model`'s control turn.
    async fn turn(&self, model: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .turns
            .lock()
            .expect("control map lock")
            .entry(model.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    fn live(&self, model: &str) -> Result<Arc<Live>, RolloutError> {
        self.router
            .get(model)
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
        if self.router.is_open(model) {
            return Err(RolloutError::DecidedByRollout(model.into()));
        }
        let info = self.registry.serve(model, version).await?;
        // Then for every replica; should this fail, the follower puts this replica back on
        // the shared choice.
        let (m, v) = (model.to_string(), version.to_string());
        self.stored(move |store| store.save_serving(&m, &v)).await?;
        Ok(info)
    }

    /// Unloads `version` unless an open rollout uses it (as candidate or champion). In turn
    /// with the control operations, so that an unload cannot land between a rollout start's
    /// load of its candidate and the start itself.
    pub async fn unload_unless_used(
        &self,
        model: &str,
        version: &str,
    ) -> Result<VersionInfo, RolloutError> {
        let _turn = self.turn(model).await;
        if self.router.uses(model, version) {
            return Err(RolloutError::InRollout {
                model: model.into(),
                version: version.into(),
            });
        }
        Ok(self.registry.unload(model, version)?)
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
    ) -> Result<RolloutRecord, RolloutError> {
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
        let bundle = self.registry.load_bundle(model, candidate).await?;
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
                .backtester
                .run(bundle.clone(), spec, plan.guardrails.clone(), |_, _| {})
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
                Err(BacktestError::Empty(_)) => (
                    None,
                    "started; no recorded decisions to backtest on".to_string(),
                ),
                Err(e) => return Err(e.into()),
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
        self.save(&record, t).await?;
        tracing::info!(rollout = %record.id, model, candidate, "rollout started");
        self.router
            .insert(Arc::new(Live::new(record.clone(), bundle)));
        Ok(record)
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
        let live = self.live(model)?;
        let r = live.record();
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

    /// Holds the rollout at its step (routing goes on, auto-advance stops).
    pub async fn pause(
        &self,
        model: &str,
        actor: &str,
        reason: &str,
    ) -> Result<RolloutRecord, RolloutError> {
        self.set_state(model, State::Active, State::Paused, actor, reason)
            .await
    }

    /// Lets a paused rollout advance again.
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
        let live = self.live(model)?;
        let r = live.record();
        if r.state != from {
            return Err(RolloutError::WrongState(r.state.as_str()));
        }
        let figures = live.readings();
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
        self.live(model)?.stop_routing();
        let _turn = self.turn(model).await;
        let live = self.live(model)?;
        let step = live.record().step;
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
        let live = self.live(model)?;
        let r = live.record();
        let figures = live.readings();
        // Record first, then switch: a failed write leaves the rollout as it was, never a
        // candidate serving everyone under a rollout that still looks open.
        let promoted = self
            .transition(&live, State::Promoted, r.step, actor, reason, figures)
            .await?;
        self.registry.serve(model, &r.candidate).await?;
        Ok(promoted)
    }

    /// Writes a rollout and its transition.
    async fn save(&self, record: &RolloutRecord, t: Transition) -> Result<(), RolloutError> {
        let saved = record.clone();
        Ok(self.stored(move |store| store.save(&saved, &t)).await?)
    }

    /// Runs `f` on the store on a blocking thread: its calls block (SQLite, or PostgreSQL
    /// through `Pg::block`).
    async fn stored<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RolloutStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Failed(e.to_string()))?
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
        let before = live.record();
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
        self.save(&after, t).await?;
        self.apply(live, &before, after.clone());
        tracing::info!(rollout = %after.id, model = %after.model, state = after.state.as_str(), step = after.step, actor, reason, "rollout transition");
        Ok(after)
    }

    /// Makes routing follow a recorded change of the rollout from `before` to `after`.
    fn apply(&self, live: &Live, before: &RolloutRecord, after: RolloutRecord) {
        let step = &after.plan.steps[after.step];
        let open = after.state.is_open();
        live.share_bp
            .store(if open { step.share_bp } else { 0 }, Ordering::Release);
        live.shadow.store(open && step.shadow, Ordering::Release);
        if after.step != before.step {
            live.step_decisions.store(0, Ordering::Relaxed);
            *live.step_started.lock().expect("step lock") = Instant::now();
        }
        let model = after.model.clone();
        *live.record.lock().expect("rollout lock") = after;
        if !open {
            self.router.remove(&model);
        }
    }

    /// Brings this replica in line with the shared store: what serves each model, and every
    /// open rollout's state and step, as changed through any replica. The follower calls it
    /// on each announced change and every second. Nothing to do on the embedded store,
    /// where this server made every change itself.
    pub async fn sync(&self) -> Result<(), RolloutError> {
        if self.store.pg().is_none() {
            return Ok(());
        }
        let (serving, open) = self
            .stored(|store| Ok((store.serving()?, store.list(true)?)))
            .await?;
        // Serving choices first: a promotion closes its rollout and switches what serves,
        // and the candidate must serve before the rollout stops routing to it.
        for (model, version) in &serving {
            let _turn = self.turn(model).await;
            if self
                .registry
                .serving(model)
                .is_ok_and(|b| b.version() == version)
            {
                continue;
            }
            let switched = match self.registry.load(model, version).await {
                Ok(_) => self.registry.serve(model, version).await.map(|_| ()),
                Err(e) => Err(e),
            };
            match switched {
                Ok(()) => tracing::info!(model, version, "serving what the shared store says"),
                Err(e) => {
                    tracing::error!(model, version, error = %e, "cannot serve the shared choice")
                }
            }
        }
        for record in &open {
            let _turn = self.turn(&record.model).await;
            match self.router.get(&record.model) {
                Some(live) if live.id == record.id => {
                    let mine = live.record();
                    if (mine.state, mine.step) != (record.state, record.step) {
                        tracing::info!(rollout = %record.id, state = record.state.as_str(), step = record.step, "rollout changed through another replica");
                        self.apply(&live, &mine, record.clone());
                    }
                }
                _ => match self
                    .registry
                    .load_bundle(&record.model, &record.candidate)
                    .await
                {
                    Ok(bundle) => {
                        tracing::info!(rollout = %record.id, model = %record.model, "rollout started through another replica");
                        self.router
                            .insert(Arc::new(Live::new(record.clone(), bundle)));
                    }
                    Err(e) => {
                        self.router.remove(&record.model);
                        tracing::error!(rollout = %record.id, error = %e, "candidate missing on this replica; routing the champion only");
                    }
                },
            }
        }
        for live in self.router.all() {
            if open.iter().any(|r| r.id == live.id) {
                continue;
            }
            let mine = live.record();
            let _turn = self.turn(&mine.model).await;
            // Closed through another replica: its final record, or just stop routing.
            let id = live.id.clone();
            let closed = self.stored(move |store| store.get(&id)).await?;
            tracing::info!(rollout = %live.id, state = closed.as_ref().map(|r| r.state.as_str()), "rollout closed through another replica");
            match closed {
                Some(after) => self.apply(&live, &mine, after),
                None => {
                    live.stop_routing();
                    self.router.remove(&mine.model);
                }
            }
        }
        Ok(())
    }
}
