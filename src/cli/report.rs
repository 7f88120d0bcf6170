//! `riskserve report …`: fetches a rollout's or a customer's history over the API and writes
//! it as one self-contained HTML page (see [`crate::report`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::connect::{ServerArg, connect, status_error};
use crate::grpc::pb;
use crate::grpc::pb::rollouts_client::RolloutsClient;
use crate::grpc::pb::trace_client::TraceClient;
use crate::report;

#[derive(Debug, Args)]
pub(crate) struct ReportArgs {
    #[command(flatten)]
    server: ServerArg,
    #[command(subcommand)]
    what: ReportKind,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ReportKind {
    /// A rollout: step timeline, arm shares, guardrails against thresholds, PD distributions.
    Rollout {
        /// The rollout's id (see `rollout list`); without it, `--model`'s open or latest one.
        id: Option<String>,
        #[arg(long, required_unless_present = "id")]
        model: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// A customer's limit over time, each change marked with the version and arm that made it.
    Customer {
        customer_id: String,
        #[arg(long)]
        out: PathBuf,
    },
}

pub(crate) async fn run(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let ReportArgs { server, what } = args;
    let server = &server.server;
    match what {
        ReportKind::Rollout { id, model, out } => {
            let h = rollout(
                server,
                id.as_deref().unwrap_or(""),
                model.as_deref().unwrap_or(""),
                &out,
            )
            .await?;
            let s = h.status.unwrap_or_default();
            println!(
                "wrote {} (rollout {} of {} {}: {})",
                out.display(),
                s.id,
                s.model,
                s.candidate,
                s.state
            );
        }
        ReportKind::Customer { customer_id, out } => {
            let records = customer(server, &customer_id, &out).await?;
            println!(
                "wrote {} ({} decisions of customer {customer_id})",
                out.display(),
                records.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the report of rollout `id` (or, with an empty id, `model`'s open or latest one).
pub(crate) async fn rollout(
    server: &str,
    id: &str,
    model: &str,
    out: &Path,
) -> anyhow::Result<pb::RolloutHistory> {
    let history = RolloutsClient::new(connect(server).await?)
        .history(pb::RolloutHistoryRequest {
            id: id.into(),
            model: model.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    write(out, &report::rollout_page(&history))?;
    Ok(history)
}

/// Writes the report of one customer's limit over time, with the notice of each adverse
/// decision; returns their decisions.
pub(crate) async fn customer(
    server: &str,
    customer_id: &str,
    out: &Path,
) -> anyhow::Result<Vec<pb::DecisionRecord>> {
    let mut trace = TraceClient::new(connect(server).await?);
    let records = trace
        .customer_history(pb::CustomerRef {
            customer_id: customer_id.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .records;
    // The server says which decisions are adverse (one definition, in policy), so every
    // decision is asked about; a customer's history is short.
    let mut notices = Vec::new();
    for r in &records {
        let n = trace
            .notice(pb::DecisionRef {
                decision_id: r.decision_id.clone(),
            })
            .await
            .map_err(status_error)
            .with_context(|| format!("the notice of decision {}", r.decision_id))?
            .into_inner();
        if n.required {
            notices.push(n);
        }
    }
    write(out, &report::customer_page(customer_id, &records, &notices))?;
    Ok(records)
}

fn write(out: &Path, page: &str) -> anyhow::Result<()> {
    std::fs::write(out, page).with_context(|| format!("writing {}", out.display()))
}
