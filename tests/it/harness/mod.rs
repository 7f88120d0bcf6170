//! What the tests share, one module per concern: a server in this process or a child
//! `riskserve` process, trained model directories, Taiwan customers, the inference
//! protocol's tensor encoding, an independent PD computation, and a real PostgreSQL server.

mod child;
mod customers;
mod fixtures;
mod inference;
mod oracle;
mod postgres;
mod rollouts;
mod server;

pub use child::{ChildServer, run_ok};
pub use customers::{Customer, customers, number, request, schema_features, score_each};
pub use fixtures::{
    MODEL, copy_bundle, copy_dir, flawed_candidate, models_v1_v2, repo, scratch_models, taiwan_csv,
    v1_spec,
};
pub use inference::{infer_outputs, infer_request};
pub use oracle::Offline;
pub use postgres::Postgres;
pub use rollouts::{
    backtest, rollout_ref, rollout_status, run_remediation, start_rollout, start_rollout_gated,
};
pub use server::{TestServer, config, record_traffic, score_range, violation_field};
