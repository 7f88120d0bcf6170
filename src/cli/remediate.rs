//! `riskserve remediate ROLLOUT_ID`: the customers a closed rollout's candidate harmed, what
//! the champion grants them, and (with `--apply`) the decisions that restore them, as a
//! table, JSON, or a CSV file for the team that owns limits.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use super::connect::{ServerArg, connect, status_error, who};
use crate::grpc::pb;
use crate::grpc::pb::remediate_update::Update;
use crate::grpc::pb::rollouts_client::RolloutsClient;

#[derive(Debug, Args)]
pub(crate) struct RemediateArgs {
    #[command(flatten)]
    server: ServerArg,
    /// The closed (rolled back or promoted) rollout whose candidate's harm to undo.
    rollout_id: String,
    /// Re-decide with this version of the model instead of the serving one.
    #[arg(long = "with", value_name = "VERSION")]
    with_version: Option<String>,
    /// Record a remediation decision for every customer still to restore (once: applying
    /// again records nothing new).
    #[arg(long)]
    apply: bool,
    /// Why, recorded with each remediation.
    #[arg(long, requires = "apply")]
    reason: Option<String>,
    /// Show only the customers already remediated (the applied set).
    #[arg(long, conflicts_with = "apply")]
    applied: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the customers to this CSV file.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
}

/// The columns of `--csv`, in order.
const CSV_COLUMNS: [&str; 13] = [
    "customer_ref",
    "harmful_decision_id",
    "harmed_at",
    "candidate_version",
    "limit_before",
    "candidate_limit",
    "limit_move",
    "champion_version",
    "champion_limit",
    "restores",
    "status",
    "restored_by_decision_id",
    "remediation_decision_id",
];

/// Runs `riskserve remediate`: the preview, or the apply with each remediation printed as it
/// is recorded.
pub(crate) async fn run(args: RemediateArgs) -> anyhow::Result<ExitCode> {
    let request = pb::RemediateRequest {
        rollout_id: args.rollout_id.clone(),
        with_version: args.with_version.clone().unwrap_or_default(),
        apply: args.apply,
        reason: args.reason.clone().unwrap_or_default(),
        actor: who(),
    };
    let (applied_now, mut summary) = fetch(&args.server.server, request, !args.json).await?;
    if args.applied {
        summary.customers.retain(|c| c.status == "remediated");
    }
    if let Some(path) = &args.csv {
        write_csv(path, &summary.customers)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        let mut out = summary_json(&summary);
        if args.apply {
            out["applied_now"] = applied_now.iter().map(harmed_json).collect();
        }
        println!("{out}");
    } else {
        print_summary(&summary, args.applied);
        if args.apply {
            println!("recorded {} remediation(s) now", applied_now.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Calls Remediate; the remediations recorded by this call and the summary. With `print`,
/// each remediation is printed as it arrives.
pub(crate) async fn fetch(
    server: &str,
    request: pb::RemediateRequest,
    print: bool,
) -> anyhow::Result<(Vec<pb::HarmedCustomer>, pb::RemediationSummary)> {
    let mut stream = RolloutsClient::new(connect(server).await?)
        .remediate(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut applied = Vec::new();
    let mut summary = None;
    while let Some(update) = stream.next().await {
        match update.map_err(status_error)?.update {
            Some(Update::Applied(h)) => {
                if print {
                    println!(
                        "  remediated {}: {} → {} by {}, decision {}",
                        short_ref(&h.customer_ref),
                        h.candidate_limit,
                        h.champion_limit,
                        h.champion_version,
                        h.remediation_decision_id
                    );
                }
                applied.push(h);
            }
            Some(Update::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    let summary = summary.context("the server ended the remediation without a summary")?;
    Ok((applied, summary))
}

fn short_ref(customer_ref: &str) -> String {
    format!("{}…", customer_ref.chars().take(16).collect::<String>())
}

/// What a remediation gives back on top of the candidate's limit.
fn restores(h: &pb::HarmedCustomer) -> i64 {
    (h.champion_limit - h.candidate_limit).max(0)
}

fn harmed_json(h: &pb::HarmedCustomer) -> Value {
    json!({
        "customer_ref": h.customer_ref, "harmful_decision_id": h.harmful_decision_id,
        "harmed_at": h.harmed_at, "candidate_version": h.candidate_version,
        "limit_before": h.limit_before, "candidate_limit": h.candidate_limit,
        "limit_move": h.limit_move, "champion_version": h.champion_version,
        "champion_limit": h.champion_limit, "restores": restores(h), "status": h.status,
        "restored_by_decision_id": h.restored_by_decision_id,
        "remediation_decision_id": h.remediation_decision_id,
    })
}

/// A remediation summary as one JSON object.
pub(crate) fn summary_json(s: &pb::RemediationSummary) -> Value {
    let t = s.totals.unwrap_or_default();
    json!({
        "rollout_id": s.rollout_id, "model": s.model, "candidate": s.candidate,
        "state": s.state, "champion": s.champion, "champion_digest": s.champion_digest,
        "totals": {"customers": t.customers, "amount_lowered": t.amount_lowered,
            "to_restore": t.to_restore, "amount_to_restore": t.amount_to_restore,
            "remediated": t.remediated, "amount_remediated": t.amount_remediated,
            "restored": t.restored, "champion_agrees": t.champion_agrees},
        "customers": s.customers.iter().map(harmed_json).collect::<Vec<_>>(),
    })
}

fn write_csv(path: &std::path::Path, customers: &[pb::HarmedCustomer]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(CSV_COLUMNS)?;
    for h in customers {
        w.write_record([
            h.customer_ref.clone(),
            h.harmful_decision_id.clone(),
            h.harmed_at.clone(),
            h.candidate_version.clone(),
            h.limit_before.to_string(),
            h.candidate_limit.to_string(),
            h.limit_move.clone(),
            h.champion_version.clone(),
            h.champion_limit.to_string(),
            restores(h).to_string(),
            h.status.clone(),
            h.restored_by_decision_id.clone(),
            h.remediation_decision_id.clone(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// A remediation summary for people.
pub(crate) fn print_summary(s: &pb::RemediationSummary, only_applied: bool) {
    let t = s.totals.unwrap_or_default();
    println!(
        "rollout {}: {} {} ({}), re-decided by {} ({})",
        s.rollout_id, s.model, s.candidate, s.state, s.champion, s.champion_digest
    );
    println!(
        "  {:<18} {:<36} {:>12} {:>12} {:<9} {:>12} {:<15} decision",
        "customer ref",
        "harmful decision",
        "limit before",
        "candidate",
        "move",
        "champion",
        "status"
    );
    for h in &s.customers {
        let decision = match h.status.as_str() {
            "remediated" => &h.remediation_decision_id,
            "restored" => &h.restored_by_decision_id,
            _ => "",
        };
        println!(
            "  {:<18} {:<36} {:>12} {:>12} {:<9} {:>12} {:<15} {decision}",
            short_ref(&h.customer_ref),
            h.harmful_decision_id,
            h.limit_before,
            h.candidate_limit,
            h.limit_move,
            format!("{} {}", h.champion_version, h.champion_limit),
            h.status,
        );
    }
    if s.customers.is_empty() {
        println!(
            "  ({})",
            if only_applied {
                "no remediation is recorded for this rollout"
            } else {
                "the candidate lowered no customer's limit"
            }
        );
    }
    println!(
        "totals: {} customers, {} lowered; {} to restore ({}); {} remediated ({}); {} restored since; {} the champion would lower too",
        t.customers,
        t.amount_lowered,
        t.to_restore,
        t.amount_to_restore,
        t.remediated,
        t.amount_remediated,
        t.restored,
        t.champion_agrees
    );
}
