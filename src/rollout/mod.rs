//! Incremental rollouts: a candidate version reaches customers in small sticky steps, watched
//! by guardrails that roll it back on their own.
//!
//! A customer's arm is a pure function of (rollout id, customer id): a keyed hash into
//! 10,000 buckets, the candidate serving the buckets below the step's share. Shares only grow,
//! so a customer the candidate served at 5% stays with it at 25%, on every replica and after a
//! restart.
//!
//! One type per job:
//! - [`Router`] (request path): the open rollouts by model; `route` gives a request its
//!   [`Route`], through which its decision is observed for the guardrails.
//! - [`Control`]: start (behind the backtest gate), advance, pause, resume, roll back,
//!   promote, and the serving switches and unloads a rollout must allow; one turn per model.
//! - [`Evaluator`]: the guardrail loop that rolls back or advances on its own.
//! - [`History`]: status, list and a rollout's whole history.
//! - [`guardrails`] the statistics, [`store`] the persisted rollouts and transitions.

mod control;
mod error;
mod evaluator;
mod follower;
pub mod guardrails;
mod history;
mod live;
mod router;
pub mod store;

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub use control::Control;
pub use error::RolloutError;
pub use evaluator::Evaluator;
pub use follower::Follower;
pub use guardrails::{GuardrailReading, Observation, Thresholds};
pub use history::{History, RolloutHistory, RolloutStatus};
pub use live::{ArmCounts, Route};
pub use router::{OpenRollout, Router};

/// Which side of a rollout served a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    Champion,
    Candidate,
    Shadow,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Champion => "champion",
            Arm::Candidate => "candidate",
            Arm::Shadow => "shadow",
        }
    }

    pub fn parse(s: &str) -> Option<Arm> {
        [Arm::Champion, Arm::Candidate, Arm::Shadow]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// Buckets customers are hashed into; shares are in these units (1 = 0.01%).
pub const BUCKETS: u32 = 10_000;

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Candidate share in basis points (100 = 1%); 0 with `shadow` is the shadow step.
    pub share_bp: u32,
    /// Whether the candidate also scores champion traffic, recorded and never returned.
    #[serde(default)]
    pub shadow: bool,
    /// Least time at this step before advancing.
    #[serde(default = "default_bake_secs")]
    pub min_bake_secs: u64,
    /// Least candidate (or shadow) decisions at this step before advancing.
    #[serde(default = "default_min_decisions")]
    pub min_decisions: u64,
}

fn default_bake_secs() -> u64 {
    300
}

fn default_min_decisions() -> u64 {
    500
}

/// A rollout plan: its steps, guardrail thresholds and whether it advances on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default = "default_steps")]
    pub steps: Vec<Step>,
    #[serde(default)]
    pub guardrails: Thresholds,
    #[serde(default = "yes")]
    pub auto_advance: bool,
}

fn yes() -> bool {
    true
}

fn default_steps() -> Vec<Step> {
    let step = |share_bp, shadow| Step {
        share_bp,
        shadow,
        min_bake_secs: default_bake_secs(),
        min_decisions: default_min_decisions(),
    };
    vec![
        step(0, true),
        step(100, false),
        step(500, false),
        step(2_500, false),
        step(5_000, false),
        step(10_000, false),
    ]
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            steps: default_steps(),
            guardrails: Thresholds::default(),
            auto_advance: true,
        }
    }
}

impl Plan {
    /// Steps must exist, have shares within 0–100% that never shrink, and end at 100%.
    pub fn check(&self) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err("a plan needs at least one step".into());
        }
        let mut last = 0;
        for (i, s) in self.steps.iter().enumerate() {
            if s.share_bp > BUCKETS {
                return Err(format!("step {i}: share_bp {} exceeds 10000", s.share_bp));
            }
            if s.share_bp < last {
                return Err(format!(
                    "step {i}: shares must never shrink ({} after {last})",
                    s.share_bp
                ));
            }
            last = s.share_bp;
        }
        if last != BUCKETS {
            return Err("the last step must give the candidate 100% (share_bp 10000)".into());
        }
        self.guardrails.check()
    }

    pub fn bake(&self, step: usize) -> Duration {
        Duration::from_secs(self.steps[step].min_bake_secs)
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Active,
    Paused,
    RolledBack,
    Promoted,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Paused => "paused",
            State::RolledBack => "rolled_back",
            State::Promoted => "promoted",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        [
            State::Active,
            State::Paused,
            State::RolledBack,
            State::Promoted,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    /// Still routing traffic (and so still the model's one rollout).
    pub fn is_open(self) -> bool {
        matches!(self, State::Active | State::Paused)
    }
}

/// The bucket of a customer in a rollout: HMAC-SHA256 keyed by the rollout id.
pub fn bucket(rollout_id: &str, customer_id: &str) -> u32 {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(rollout_id.as_bytes()).expect("HMAC takes any key length");
    mac.update(customer_id.as_bytes());
    let bytes = mac.finalize().into_bytes();
    let n = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    (n % u64::from(BUCKETS)) as u32
}

/// Whether the candidate serves this customer at this share.
pub fn is_candidate(rollout_id: &str, customer_id: &str, share_bp: u32) -> bool {
    bucket(rollout_id, customer_id) < share_bp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_is_sticky_and_monotone() {
        let shares = [0, 100, 500, 2_500, 5_000, 10_000];
        for c in 0..5_000 {
            let id = format!("customer-{c}");
            let arms: Vec<bool> = shares.iter().map(|s| is_candidate("r1", &id, *s)).collect();
            assert_eq!(
                arms,
                shares
                    .iter()
                    .map(|s| is_candidate("r1", &id, *s))
                    .collect::<Vec<_>>()
            );
            // Once a candidate, a candidate at every larger share.
            let first = arms.iter().position(|a| *a).unwrap_or(arms.len());
            assert!(arms[first..].iter().all(|a| *a), "{id}: {arms:?}");
        }
        assert_ne!(
            bucket("r1", "x"),
            bucket("r2", "x"),
            "a new rollout reshuffles"
        );
    }

    #[test]
    fn default_plan_is_valid_and_bad_plans_are_refused() {
        Plan::default().check().unwrap();
        let mut p = Plan::default();
        p.steps[2].share_bp = 50;
        assert!(p.check().unwrap_err().contains("shrink"));
        let mut p = Plan::default();
        p.steps.pop();
        assert!(p.check().unwrap_err().contains("100%"));
    }
}
