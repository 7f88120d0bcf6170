//! riskserve: serves versioned credit-risk models over gRPC and keeps every decision
//! traceable to the exact version that made it.
//!
//! # Layout
//!
//! The path of one request, top to bottom:
//!
//! - [`grpc`]: the edge. Its gates (auth, admission) first; wire messages in, `TryFrom` into
//!   domain types (request fields checked), domain errors out as `tonic::Status` through one
//!   exhaustive mapping.
//! - [`scoring`]: validate → route → score → policy → record → respond, in domain types;
//!   its recorder turns each decision into a record and counts it once durable.
//! - [`decision_log`]: every decision, durable before it is answered, in a hash chain;
//!   [`customer`] pseudonymises customer ids before anything is stored.
//! - [`registry`]: the loaded versions of each model and the serving one behind an arc-swap.
//! - [`bundle`]: the immutable on-disk version: manifest, model file, reason codes
//!   ([`reason_codes`]: each feature's words for a customer), digest.
//! - [`schema`], [`model`], [`policy`]: a version's feature rules, its model (a logistic
//!   regression or an XGBoost / LightGBM tree ensemble, behind one trait), and its PD →
//!   grade → decision → limit policy.
//!
//! Around it:
//!
//! - [`server`]: assembles services, health and reflection on a bound listener (TLS when
//!   configured); shutdown.
//! - [`watcher`]: loads bundles that appear under `models/`.
//! - [`trace`]: what reviewers ask of the log: history, explain, replay, verify, a
//!   decision's adverse-action notice and a customer's complaint; [`notice`] words them.
//! - [`train`]: fits a version with linfa and writes its bundle; [`import`] makes a bundle of
//!   a model file trained elsewhere; both read their data and schema files through [`inputs`].
//! - [`config`]: defaults, file, environment and flags, checked before anything starts.
//! - [`rollout`]: plans and sticky assignment; the router (request path), control
//!   operations, the guardrail evaluator and the history, one type each; its store.
//!   [`backtest`] previews a candidate on recorded traffic (and gates rollout starts);
//!   [`remediation`] finds the customers a closed rollout's candidate harmed and records
//!   the decisions that restore their limits.
//! - [`report`]: self-contained HTML pages of a rollout or a customer, from API messages.
//! - [`cli`]: the `riskserve` command (the only place that uses `anyhow`), one file per
//!   subcommand family; [`cli::demo`] (the incident end to end) and [`cli::bench`] (the
//!   load generator) are commands too, so they live there.

pub mod backtest;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod customer;
pub mod decision_log;
pub mod grpc;
pub mod import;
pub mod inputs;
pub mod model;
pub mod notice;
pub mod policy;
pub mod postgres;
pub mod reason_codes;
pub mod registry;
pub mod remediation;
pub mod report;
pub mod rollout;
pub mod schema;
pub mod scoring;
pub mod server;
pub mod telemetry;
pub mod trace;
pub mod train;
pub mod watcher;

pub use config::Config;
pub use server::serve;
