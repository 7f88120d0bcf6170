//! `riskserve rollout …` and `riskserve backtest`: control operations on a model's rollout,
//! the impact preview with its progress bar, and both printed as tables or JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use super::connect::{ServerArg, connect, status_error, who};
use super::output::{passed, show};
use crate::grpc::pb;
use crate::grpc::pb::rollouts_client::RolloutsClient;

#[derive(Debug, Args)]
pub(crate) struct RolloutArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: RolloutAction,
}

#[derive(Debug, Subcommand)]
enum RolloutAction {
    /// Start rolling CANDIDATE out against the serving version.
    Start {
        model: String,
        #[arg(long)]
        candidate: String,
        /// A plan (TOML: steps, guardrails, auto_advance); default plan without it.
        #[arg(long)]
        plan: Option<PathBuf>,
        /// Start without the backtest gate (recorded with your name).
        #[arg(long)]
        skip_backtest: bool,
    },
    /// Step, share, per-arm counts and every guardrail against its threshold.
    Status { model: String },
    /// Move to the next step now.
    Advance {
        model: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Stop advancing (guardrails still watch).
    Pause {
        model: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Advance on its own again after a pause.
    Resume {
        model: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Candidate share to 0 now.
    Rollback {
        model: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Make the candidate the serving version.
    Promote {
        model: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Every rollout, newest first.
    List,
}

#[derive(Debug, Args)]
pub(crate) struct BacktestArgs {
    #[command(flatten)]
    server: ServerArg,
    model: String,
    #[arg(long)]
    candidate: String,
    #[arg(long, default_value = "")]
    since: String,
    #[arg(long, default_value = "")]
    until: String,
    /// At most this many customers (or decisions); the server holds at most its
    /// `backtest_max_sample` either way.
    #[arg(long)]
    sample: Option<u64>,
    /// Every decision in the window, not each customer's latest.
    #[arg(long)]
    all_decisions: bool,
    #[arg(long)]
    json: bool,
}

/// Runs one rollout action and prints the rollouts it returns.
pub(crate) async fn run(args: RolloutArgs) -> anyhow::Result<ExitCode> {
    let RolloutArgs {
        server,
        json,
        action,
    } = args;
    let mut client = RolloutsClient::new(connect(&server.server).await?);
    let r = |model: String, reason: String| pb::RolloutRef {
        model,
        actor: who(),
        reason,
    };
    let answer = match action {
        RolloutAction::Start {
            model,
            candidate,
            plan,
            skip_backtest,
        } => {
            let plan_toml = match plan {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
                None => String::new(),
            };
            client
                .start(pb::StartRolloutRequest {
                    model,
                    candidate,
                    plan_toml,
                    actor: who(),
                    skip_backtest,
                })
                .await
        }
        RolloutAction::Status { model } => client.status(r(model, String::new())).await,
        RolloutAction::Advance { model, reason } => client.advance(r(model, reason)).await,
        RolloutAction::Pause { model, reason } => client.pause(r(model, reason)).await,
        RolloutAction::Resume { model, reason } => client.resume(r(model, reason)).await,
        RolloutAction::Rollback { model, reason } => client.rollback(r(model, reason)).await,
        RolloutAction::Promote { model, reason } => client.promote(r(model, reason)).await,
        RolloutAction::List => {
            let list = client
                .list(pb::ListRolloutsRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            show_all(&list.rollouts, json);
            return Ok(ExitCode::SUCCESS);
        }
    };
    show_all(&[answer.map_err(status_error)?.into_inner()], json);
    Ok(ExitCode::SUCCESS)
}

fn show_all(rollouts: &[pb::RolloutStatus], json: bool) {
    for s in rollouts {
        show(s, json, rollout_json, print_rollout);
    }
}

/// Runs a backtest and prints its report; exit code 1 when it failed.
pub(crate) async fn backtest(args: BacktestArgs) -> anyhow::Result<ExitCode> {
    let BacktestArgs {
        server,
        model,
        candidate,
        since,
        until,
        sample,
        all_decisions,
        json,
    } = args;
    let request = pb::BacktestRequest {
        model,
        candidate,
        since,
        until,
        sample: sample.unwrap_or(0),
        all_decisions,
    };
    let report = fetch_backtest(&server.server, request).await?;
    show(&report, json, backtest_json, print_backtest);
    Ok(passed(report.passed))
}

/// Runs a backtest on the server with a progress bar and returns its report.
pub(crate) async fn fetch_backtest(
    server: &str,
    request: pb::BacktestRequest,
) -> anyhow::Result<pb::BacktestReport> {
    let status = status_error;
    let mut stream = RolloutsClient::new(connect(server).await?)
        .backtest(request)
        .await
        .map_err(status)?
        .into_inner();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "re-scoring {bar:30} {pos}/{len} decisions ({elapsed})",
        )
        .expect("static template"),
    );
    let mut report = None;
    while let Some(update) = stream.next().await {
        let update = update.map_err(status)?;
        bar.set_length(update.total);
        match update.update {
            Some(pb::backtest_progress::Update::Done(done)) => bar.set_position(done),
            Some(pb::backtest_progress::Update::Report(r)) => report = Some(r),
            None => {}
        }
    }
    bar.finish_and_clear();
    report.context("the server ended the backtest without a report")
}

fn guardrail_json(g: &pb::Guardrail) -> Value {
    json!({"name": g.name, "value": g.value, "threshold": g.threshold, "p_value": g.p_value,
        "candidate_n": g.candidate_n, "champion_n": g.champion_n, "breached": g.breached, "note": g.note})
}

/// A rollout's status as one JSON object.
pub(crate) fn rollout_json(s: &pb::RolloutStatus) -> Value {
    json!({
        "id": s.id, "model": s.model, "champion": s.champion, "candidate": s.candidate,
        "state": s.state, "step": s.step, "steps": s.steps, "share_bp": s.share_bp, "shadow": s.shadow,
        "step_started_at": s.step_started_at, "step_decisions": s.step_decisions,
        "champion_decisions": s.champion_decisions, "candidate_decisions": s.candidate_decisions,
        "shadow_decisions": s.shadow_decisions, "candidate_errors": s.candidate_errors,
        "shadow_dropped": s.shadow_dropped, "created_at": s.created_at,
        "guardrails": s.guardrails.iter().map(guardrail_json).collect::<Vec<_>>(),
        "transitions": s.transitions.iter().map(|t| json!({
            "at": t.at, "from_state": t.from_state, "to_state": t.to_state, "from_step": t.from_step,
            "to_step": t.to_step, "actor": t.actor, "reason": t.reason,
            "figures": t.figures.iter().map(guardrail_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// A rollout's status for people.
pub(crate) fn print_rollout(s: &pb::RolloutStatus) {
    // Live counts exist only while a rollout is open; a closed one's are in the log.
    let open = matches!(s.state.as_str(), "active" | "paused");
    let share = if !open {
        if s.state == "promoted" {
            format!("{} now serves", s.candidate)
        } else {
            "no customers".to_string()
        }
    } else if s.share_bp == 0 && s.shadow {
        "shadow".to_string()
    } else {
        format!("{:.2}%", f64::from(s.share_bp) / 100.0)
    };
    println!(
        "rollout {}  {}: {} → {}",
        s.id, s.model, s.champion, s.candidate
    );
    println!(
        "  state {}, step {}/{} ({share}), step started {}",
        s.state,
        s.step + 1,
        s.steps,
        s.step_started_at
    );
    if !open {
        println!(
            "  decisions of each arm: `riskserve report rollout {}` or `trace by-version`",
            s.id
        );
    } else {
        println!(
            "  decisions: champion {}, candidate {}, shadow {} (shadow dropped {}), candidate errors {}; {} at this step",
            s.champion_decisions,
            s.candidate_decisions,
            s.shadow_decisions,
            s.shadow_dropped,
            s.candidate_errors,
            s.step_decisions
        );
    }
    if !s.guardrails.is_empty() {
        println!(
            "  {:<22} {:>10} {:>10} {:>9} {:>8} {:>8}  status",
            "guardrail", "value", "threshold", "p", "cand n", "champ n"
        );
        for g in &s.guardrails {
            let verdict = if g.breached {
                "BREACHED"
            } else if !g.note.is_empty() {
                "waiting"
            } else {
                "ok"
            };
            println!(
                "  {:<22} {:>10.4} {:>10.4} {:>9} {:>8} {:>8}  {verdict}",
                g.name,
                g.value,
                g.threshold,
                g.p_value
                    .map(|p| format!("{p:.1e}"))
                    .unwrap_or_else(|| "-".into()),
                g.candidate_n,
                g.champion_n
            );
        }
    }
    println!("  transitions:");
    for t in &s.transitions {
        let from = if t.from_step < 0 {
            "-".to_string()
        } else {
            format!("{} step {}", t.from_state, t.from_step + 1)
        };
        println!(
            "    {}  {from} → {} step {}  by {}: {}",
            t.at,
            t.to_state,
            t.to_step + 1,
            t.actor,
            t.reason
        );
    }
}

fn moves_json(m: &Option<pb::LimitMoves>) -> Value {
    let m = m.unwrap_or_default();
    json!({"raised": m.raised, "held": m.held, "cut": m.cut, "withdrawn": m.withdrawn,
        "new_customers": m.new_customers, "amount_raised": m.amount_raised, "amount_cut": m.amount_cut})
}

/// A backtest report as one JSON object.
pub(crate) fn backtest_json(r: &pb::BacktestReport) -> Value {
    json!({
        "model": r.model, "candidate": r.candidate, "candidate_digest": r.candidate_digest,
        "compared": r.compared, "unscorable": r.unscorable, "passed": r.passed,
        "decision_matrix": r.decision_matrix, "psi": r.psi,
        "champion_limits": moves_json(&r.champion_limits),
        "candidate_limits": moves_json(&r.candidate_limits),
        "segments": r.segments.iter().map(|s| json!({"feature": s.feature, "low": s.low,
            "high": s.high, "customers": s.customers, "withdrawn_share": s.withdrawn_share,
            "cut_share": s.cut_share, "champion_withdrawn_share": s.champion_withdrawn_share,
            "champion_cut_share": s.champion_cut_share})).collect::<Vec<_>>(),
        "guardrails": r.guardrails.iter().map(guardrail_json).collect::<Vec<_>>(),
    })
}

/// A backtest report for people.
pub(crate) fn print_backtest(r: &pb::BacktestReport) {
    let n = r.compared.max(1) as f64;
    let pct = |x: u64| 100.0 * x as f64 / n;
    println!(
        "backtest of {} {} ({}) on {} customers' recorded inputs",
        r.model, r.candidate, r.candidate_digest, r.compared
    );
    if r.unscorable > 0 {
        println!(
            "  {} records could not be scored (features the candidate needs were not recorded)",
            r.unscorable
        );
    }
    println!("  decisions (champion → candidate):");
    for (k, v) in &r.decision_matrix {
        println!("    {k:<20} {v:>8}  ({:.1}%)", pct(*v));
    }
    let c = r.champion_limits.unwrap_or_default();
    let d = r.candidate_limits.unwrap_or_default();
    println!(
        "  limits against the current limit {:>10} {:>10}",
        "champion", "candidate"
    );
    let rows = [
        ("raised", c.raised, d.raised),
        ("held", c.held, d.held),
        ("cut", c.cut, d.cut),
        ("withdrawn", c.withdrawn, d.withdrawn),
        ("new customers", c.new_customers, d.new_customers),
    ];
    for (name, a, b) in rows {
        println!(
            "    {name:<28} {a:>10} {b:>10}   ({:.1}% → {:.1}%)",
            pct(a),
            pct(b)
        );
    }
    println!(
        "    {:<28} {:>10} {:>10}",
        "amount raised", c.amount_raised, d.amount_raised
    );
    println!(
        "    {:<28} {:>10} {:>10}",
        "amount cut or withdrawn", c.amount_cut, d.amount_cut
    );
    println!("  PD distribution shift (PSI): {:.3}", r.psi);
    println!("  segments the candidate hits hardest beyond the champion:");
    for s in r.segments.iter().take(5) {
        println!(
            "    {} {}–{}: {:.0}% withdrawn (champion {:.0}%), {:.0}% lowered (champion {:.0}%), {} customers",
            s.feature,
            s.low,
            s.high,
            100.0 * s.withdrawn_share,
            100.0 * s.champion_withdrawn_share,
            100.0 * s.cut_share,
            100.0 * s.champion_cut_share,
            s.customers
        );
    }
    println!("  guardrails of the default plan:");
    for g in &r.guardrails {
        let verdict = if g.breached {
            "FAIL"
        } else if !g.note.is_empty() {
            "too few"
        } else {
            "pass"
        };
        println!(
            "    {:<22} {:>9.4} (threshold {:.4})  {verdict}",
            g.name, g.value, g.threshold
        );
    }
    println!(
        "  {}",
        if r.passed {
            "PASSED: the default plan's guardrails hold"
        } else {
            "FAILED: a rollout would be refused"
        }
    );
}
