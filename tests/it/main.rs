//! riskserve's integration tests, as one test binary: one module per area, all sharing the
//! `harness` (a server in this process or as a child, trained fixtures, customers, the
//! inference encoding, a PD oracle). One binary builds and links once, and trains its
//! fixtures once per process rather than once per file.
//!
//! Run one area with `cargo test --test it <area>::`, e.g. `cargo test --test it rollouts::`.
//! The time-budgeted fuzz loops are ignored by default: `cargo test --test it fuzz:: --
//! --ignored`.

mod harness;

mod auth;
mod backtest;
mod cli;
mod decision_log;
mod demo;
mod deploy;
mod durability;
mod fuzz;
mod hot_swap;
mod inference;
mod journal;
mod lifecycle;
mod limits;
mod notices;
mod remediation;
mod replicas;
mod report;
mod rollouts;
mod scoring;
mod telemetry;
mod trees;
mod tritonclient;
