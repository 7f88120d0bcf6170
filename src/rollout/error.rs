//! Why a rollout operation was refused: the one error type of the rollout module.

use super::store::StoreError;
use crate::backtest::BacktestError;
use crate::decision_log::LogError;
use crate::registry::RegistryError;

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
    #[error("{model}/{version} is part of an open rollout")]
    InRollout { model: String, version: String },
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
