//! Rollouts, their transitions and guardrail snapshots, and (with a shared store) the
//! serving choice of each model: kept so that a restarted server resumes the same step with
//! the same assignment, and so that replicas sharing a store route alike.
//!
//! Two backends behind one type: the embedded one in `rollouts.db` in the data directory (one
//! server), and the shared one in PostgreSQL (several replicas), where every change is
//! announced on [`crate::postgres::CHANGES`] and guarded against a concurrent change through
//! another replica.

mod embedded;
mod shared;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::guardrails::GuardrailReading;
use super::{Plan, State};
use crate::backtest::BacktestReport;
use crate::postgres::Pg;

/// The version of the JSON the store writes into its text columns (plan, backtest,
/// figures): `{"v": 1, "data": …}`. A row written before the envelope holds the bare value
/// and reads as version 1. Every field added to a stored type takes a serde default, so that
/// rows written before it still read (`stored_rows_of_version_1_still_read` pins literal
/// rows); a change that cannot be expressed so gets version 2 and a conversion here.
const STORED_VERSION: u64 = 1;

fn to_stored<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(&serde_json::json!({ "v": STORED_VERSION, "data": value })).map_err(err)
}

fn from_stored<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    let mut value: serde_json::Value = serde_json::from_str(text).map_err(err)?;
    let data = match value.as_object_mut() {
        Some(o) if o.len() == 2 && o.contains_key("v") && o.contains_key("data") => {
            match o["v"].as_u64() {
                Some(STORED_VERSION) => o.remove("data").expect("checked"),
                v => {
                    return Err(err(format!(
                        "a stored row has format {v:?}; this release reads {STORED_VERSION} \
                         (was it written by a newer release?)"
                    )));
                }
            }
        }
        _ => value,
    };
    serde_json::from_value(data).map_err(err)
}

/// Why the store failed or refused a change.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("rollout store: {0}")]
    Failed(String),
    /// Another replica changed the rollout since this one read it.
    #[error(
        "rollout {id} was changed through another replica meanwhile (it is now {now}); read \
         its status and retry"
    )]
    Changed { id: String, now: String },
    /// Another replica opened a rollout of the model first.
    #[error("model {model} already has an open rollout ({id}); roll it back or promote it first")]
    AlreadyOpen { model: String, id: String },
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Failed(e.to_string())
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRecord {
    pub id: String,
    pub model: String,
    pub champion: String,
    pub candidate: String,
    pub plan: Plan,
    pub state: State,
    pub step: usize,
    /// RFC 3339.
    pub step_started_at: String,
    pub created_at: String,
    /// The preview run before the start, unless it was skipped.
    pub backtest: Option<BacktestReport>,
}

/// One change of a rollout: who, when, why, with the guardrail figures of that moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub at: String,
    pub from_state: Option<State>,
    pub to_state: State,
    pub from_step: Option<usize>,
    pub to_step: usize,
    pub actor: String,
    pub reason: String,
    pub figures: Vec<GuardrailReading>,
}

/// The guardrails of a rollout at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub at: String,
    pub step: usize,
    pub share_bp: u32,
    pub figures: Vec<GuardrailReading>,
}

/// A rollout row as both backends read it, before its JSON and state are parsed.
struct RolloutRow {
    id: String,
    model: String,
    champion: String,
    candidate: String,
    plan: String,
    state: String,
    step: i64,
    step_started_at: String,
    created_at: String,
    backtest: Option<String>,
}

impl RolloutRow {
    fn parse(self) -> Result<RolloutRecord, StoreError> {
        Ok(RolloutRecord {
            state: parse_state(&self.state)?,
            plan: from_stored(&self.plan)?,
            backtest: self.backtest.as_deref().map(from_stored).transpose()?,
            id: self.id,
            model: self.model,
            champion: self.champion,
            candidate: self.candidate,
            step: self.step as usize,
            step_started_at: self.step_started_at,
            created_at: self.created_at,
        })
    }
}

/// A transition row as both backends read it.
struct TransitionRow {
    at: String,
    from_state: Option<String>,
    to_state: String,
    from_step: Option<i64>,
    to_step: i64,
    actor: String,
    reason: String,
    figures: String,
}

impl TransitionRow {
    fn parse(self) -> Result<Transition, StoreError> {
        Ok(Transition {
            from_state: self.from_state.as_deref().and_then(State::parse),
            to_state: parse_state(&self.to_state)?,
            from_step: self.from_step.map(|s| s as usize),
            to_step: self.to_step as usize,
            figures: from_stored(&self.figures)?,
            at: self.at,
            actor: self.actor,
            reason: self.reason,
        })
    }
}

fn parse_state(s: &str) -> Result<State, StoreError> {
    State::parse(s).ok_or_else(|| err(format!("bad state {s}")))
}

/// The rollout store of this server.
#[derive(Debug)]
pub struct RolloutStore {
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Embedded(embedded::Embedded),
    Shared(shared::Shared),
}

impl RolloutStore {
    /// The embedded store, in the SQLite file at `path`.
    pub fn open(path: &Path) -> Result<RolloutStore, StoreError> {
        Ok(RolloutStore {
            backend: Backend::Embedded(embedded::Embedded::open(path)?),
        })
    }

    /// The store every replica shares (its schema is [`crate::postgres`]'s).
    pub fn shared(pg: Arc<Pg>) -> RolloutStore {
        RolloutStore {
            backend: Backend::Shared(shared::Shared::new(pg)),
        }
    }

    /// The shared store's connection settings, when it is shared.
    pub fn pg(&self) -> Option<&Arc<Pg>> {
        match &self.backend {
            Backend::Embedded(_) => None,
            Backend::Shared(s) => Some(s.pg()),
        }
    }

    /// Writes the rollout's current row and one transition, atomically. With a shared store
    /// the change applies only if the rollout is still as `t` says it was
    /// ([`StoreError::Changed`] otherwise), a promotion makes the candidate the model's
    /// serving choice in the same transaction, and every replica is told.
    pub fn save(&self, r: &RolloutRecord, t: &Transition) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Embedded(e) => e.save(r, t),
            Backend::Shared(s) => s.save(r, t),
        }
    }

    /// Every rollout, newest first; only those still routing traffic if `open_only`.
    pub fn list(&self, open_only: bool) -> Result<Vec<RolloutRecord>, StoreError> {
        match &self.backend {
            Backend::Embedded(e) => e.list(open_only),
            Backend::Shared(s) => s.list(open_only),
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        Ok(self.list(false)?.into_iter().find(|r| r.id == id))
    }

    /// The open rollout of a model, if any.
    pub fn open_for(&self, model: &str) -> Result<Option<RolloutRecord>, StoreError> {
        Ok(self.list(true)?.into_iter().find(|r| r.model == model))
    }

    /// A rollout's transitions, oldest first.
    pub fn transitions(&self, rollout_id: &str) -> Result<Vec<Transition>, StoreError> {
        match &self.backend {
            Backend::Embedded(e) => e.transitions(rollout_id),
            Backend::Shared(s) => s.transitions(rollout_id),
        }
    }

    /// Keeps one guardrail snapshot.
    pub fn save_snapshot(&self, rollout_id: &str, snapshot: &Snapshot) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Embedded(e) => e.save_snapshot(rollout_id, snapshot),
            Backend::Shared(s) => s.save_snapshot(rollout_id, snapshot),
        }
    }

    /// A rollout's guardrail snapshots, oldest first.
    pub fn snapshots(&self, rollout_id: &str) -> Result<Vec<Snapshot>, StoreError> {
        match &self.backend {
            Backend::Embedded(e) => e.snapshots(rollout_id),
            Backend::Shared(s) => s.snapshots(rollout_id),
        }
    }

    /// Records what serves `model` for every replica (the embedded store leaves the choice to
    /// the registry's own file).
    pub fn save_serving(&self, model: &str, version: &str) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Embedded(_) => Ok(()),
            Backend::Shared(s) => s.save_serving(model, version),
        }
    }

    /// The shared serving choices by model (none with the embedded store).
    pub fn serving(&self) -> Result<BTreeMap<String, String>, StoreError> {
        match &self.backend {
            Backend::Embedded(_) => Ok(BTreeMap::new()),
            Backend::Shared(s) => s.serving(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rollout::guardrails::Thresholds;

    /// Rows as this release writes them (version 1) and as releases before the envelope did,
    /// literally: a field added to a stored type without a default fails here.
    #[test]
    fn stored_rows_of_version_1_still_read() {
        let plan = r#"{"v":1,"data":{"steps":[{"share_bp":0,"shadow":true,"min_bake_secs":300,"min_decisions":500},{"share_bp":100,"shadow":false,"min_bake_secs":60,"min_decisions":200}],"auto_advance":false}}"#;
        let plan: Plan = from_stored(plan).unwrap();
        assert_eq!(plan.steps.len(), 2);
        assert!(!plan.auto_advance);
        assert_eq!(plan.guardrails, Thresholds::default());
        let bare = r#"{"steps":[{"share_bp":100}]}"#;
        let plan: Plan = from_stored(bare).unwrap();
        assert_eq!(plan.steps[0].min_decisions, 500);
        let figures = r#"{"v":1,"data":[{"name":"decline_rate","value":0.02,"threshold":0.05,"p_value":0.3,"candidate_n":250,"champion_n":2400,"breached":false,"note":""}]}"#;
        let figures: Vec<GuardrailReading> = from_stored(figures).unwrap();
        assert_eq!(figures[0].candidate_n, 250);
        let newer = r#"{"v":2,"data":{}}"#;
        let e = from_stored::<Plan>(newer).unwrap_err();
        assert!(e.to_string().contains("newer release"), "{e}");
        assert_eq!(
            from_stored::<Plan>(&to_stored(&plan).unwrap()).unwrap(),
            plan
        );
    }
}
