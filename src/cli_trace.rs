//! `riskserve trace …` and `riskserve rollout …` output: readable tables or JSON lines.

use std::process::ExitCode;

use serde_json::{Value, json};
use tokio_stream::StreamExt;

use crate::cli::connect;
use crate::grpc::pb;
use crate::grpc::pb::trace_client::TraceClient;

/// One trace command.
#[derive(Debug)]
pub enum Query {
    Decision(String),
    Customer(String),
    Explain(String),
    Replay(String),
    Verify,
    ByVersion {
        model: String,
        version: String,
        since: String,
        until: String,
    },
    Export {
        since: String,
        until: String,
        csv: bool,
    },
}

use crate::cli::status_error as status;

fn decision_name(d: i32) -> String {
    pb::Decision::try_from(d)
        .map(|d| {
            d.as_str_name()
                .trim_start_matches("DECISION_")
                .to_lowercase()
        })
        .unwrap_or_default()
}

fn arm_name(a: i32) -> String {
    pb::Arm::try_from(a)
        .map(|a| a.as_str_name().trim_start_matches("ARM_").to_lowercase())
        .unwrap_or_default()
}

fn reasons_json(reasons: &[pb::Reason]) -> Value {
    reasons
        .iter()
        .map(|r| json!({"feature": r.feature, "contribution": r.contribution, "value": r.value}))
        .collect()
}

/// A record as one JSON object (also the `export --format jsonl` line).
pub fn record_json(r: &pb::DecisionRecord) -> Value {
    json!({
        "seq": r.seq,
        "decision_id": r.decision_id,
        "recorded_at": r.recorded_at,
        "request_id": r.request_id,
        "request_hash": r.request_hash,
        "customer_ref": r.customer_ref,
        "key_id": r.key_id,
        "model": r.model,
        "version": r.version,
        "digest": r.digest,
        "rollout_id": r.rollout_id,
        "arm": arm_name(r.arm),
        "features": r.features,
        "probability_of_default": r.probability_of_default,
        "grade": r.grade,
        "decision": decision_name(r.decision),
        "current_limit": r.current_limit,
        "granted_limit": r.granted_limit,
        "reasons": reasons_json(&r.reasons),
        "caller": r.caller,
        "trace_id": r.trace_id,
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    })
}

/// How a decision moved the limit, for people: "20000 → 0 (withdrawn)".
fn limit_change(r: &pb::DecisionRecord) -> String {
    match r.current_limit {
        None => format!("{} (new customer)", r.granted_limit),
        Some(c) if r.granted_limit == c => format!("{c} (held)"),
        Some(c) => {
            let what = if r.granted_limit == 0 {
                "withdrawn"
            } else if r.granted_limit < c {
                "cut"
            } else {
                "raised"
            };
            format!("{c} → {} ({what})", r.granted_limit)
        }
    }
}

fn print_record(r: &pb::DecisionRecord) {
    let rows = [
        ("decision", r.decision_id.clone()),
        ("recorded at", r.recorded_at.clone()),
        ("seq", r.seq.to_string()),
        ("request", r.request_id.clone()),
        (
            "customer ref",
            format!("{} (key {})", r.customer_ref, r.key_id),
        ),
        ("model", format!("{} {}", r.model, r.version)),
        ("digest", r.digest.clone()),
        ("arm", arm_name(r.arm)),
        (
            "rollout",
            if r.rollout_id.is_empty() {
                "-".into()
            } else {
                r.rollout_id.clone()
            },
        ),
        (
            "result",
            format!(
                "{}, grade {}, PD {:.6}",
                decision_name(r.decision),
                r.grade,
                r.probability_of_default
            ),
        ),
        ("limit", limit_change(r)),
        ("hash", r.hash.clone()),
        ("prev hash", r.prev_hash.clone()),
    ];
    for (k, v) in rows {
        println!("{k:<13} {v}");
    }
    println!("reasons");
    for (i, x) in r.reasons.iter().enumerate() {
        println!(
            "  {}. {:<16} {:+.4}  (value {})",
            i + 1,
            x.feature,
            x.contribution,
            x.value
        );
    }
    println!("features");
    for (k, v) in &r.features {
        println!("  {k:<16} {v}");
    }
}

pub async fn run(server: &str, as_json: bool, query: Query) -> anyhow::Result<ExitCode> {
    let mut client = TraceClient::new(connect(server).await?);
    match query {
        Query::Decision(id) => {
            let r = client
                .get_decision(pb::DecisionRef { decision_id: id })
                .await
                .map_err(status)?
                .into_inner();
            if as_json {
                println!("{}", record_json(&r));
            } else {
                print_record(&r);
            }
        }
        Query::Customer(id) => {
            let records = client
                .customer_history(pb::CustomerRef { customer_id: id })
                .await
                .map_err(status)?
                .into_inner()
                .records;
            if as_json {
                for r in &records {
                    println!("{}", record_json(r));
                }
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<28} {:<36} {:<14} {:<9} {:>8} {:<5} {:<8} limit",
                "recorded at", "decision", "version", "arm", "PD", "grade", "decision"
            );
            for r in &records {
                let changed = r.current_limit.is_some_and(|c| c != r.granted_limit);
                println!(
                    "{:<28} {:<36} {:<14} {:<9} {:>8.4} {:<5} {:<8} {}{}",
                    r.recorded_at,
                    r.decision_id,
                    format!("{} {}", r.model, r.version),
                    arm_name(r.arm),
                    r.probability_of_default,
                    r.grade,
                    decision_name(r.decision),
                    limit_change(r),
                    if changed {
                        format!("  ← by {} ({})", r.version, arm_name(r.arm))
                    } else {
                        String::new()
                    },
                );
            }
            if records.is_empty() {
                println!("(no decisions for this customer)");
            }
        }
        Query::Explain(id) => {
            let e = client
                .explain(pb::DecisionRef { decision_id: id })
                .await
                .map_err(status)?
                .into_inner();
            if as_json {
                println!("{}", explanation_json(&e));
            } else {
                print_explanation(&e);
            }
        }
        Query::Replay(id) => {
            let r = client
                .replay(pb::DecisionRef { decision_id: id })
                .await
                .map_err(status)?
                .into_inner();
            let rec = r.recorded.clone().unwrap_or_default();
            if as_json {
                println!(
                    "{}",
                    json!({
                        "decision_id": rec.decision_id, "identical": r.identical,
                        "differences": r.differences,
                        "recorded": {"probability_of_default": rec.probability_of_default, "grade": rec.grade,
                            "decision": decision_name(rec.decision), "granted_limit": rec.granted_limit,
                            "reasons": reasons_json(&rec.reasons)},
                        "replayed": {"probability_of_default": r.probability_of_default, "grade": r.grade,
                            "decision": decision_name(r.decision), "granted_limit": r.granted_limit,
                            "reasons": reasons_json(&r.reasons)},
                    })
                );
            } else {
                println!(
                    "replay of {} with {} {} ({})",
                    rec.decision_id, rec.model, rec.version, rec.digest
                );
                println!("{:<24} {:<24} {:<24}", "", "recorded", "replayed");
                println!(
                    "{:<24} {:<24e} {:<24e}",
                    "probability of default", rec.probability_of_default, r.probability_of_default
                );
                println!("{:<24} {:<24} {:<24}", "grade", rec.grade, r.grade);
                println!(
                    "{:<24} {:<24} {:<24}",
                    "decision",
                    decision_name(rec.decision),
                    decision_name(r.decision)
                );
                println!(
                    "{:<24} {:<24} {:<24}",
                    "granted limit", rec.granted_limit, r.granted_limit
                );
                let names = |v: &[pb::Reason]| {
                    v.iter()
                        .map(|x| x.feature.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!(
                    "{:<24} {:<24} {:<24}",
                    "reasons",
                    names(&rec.reasons),
                    names(&r.reasons)
                );
                if r.identical {
                    println!("IDENTICAL: every field matches bit for bit");
                } else {
                    println!("DIFFERENT: {}", r.differences.join("; "));
                }
            }
            if !r.identical {
                return Ok(ExitCode::from(1));
            }
        }
        Query::Verify => {
            let v = client
                .verify(pb::VerifyRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if as_json {
                println!(
                    "{}",
                    json!({
                        "ok": v.ok, "records": v.records, "head_hash": v.head_hash,
                        "first_break": v.first_break.as_ref().map(|b| json!({
                            "seq": b.seq, "decision_id": b.decision_id, "kind": b.kind, "detail": b.detail,
                        })),
                    })
                );
            } else if let Some(b) = &v.first_break {
                println!("BROKEN at seq {} ({}): {}", b.seq, b.kind, b.detail);
            } else {
                println!("chain intact: {} records, head {}", v.records, v.head_hash);
            }
            if !v.ok {
                return Ok(ExitCode::from(1));
            }
        }
        Query::ByVersion {
            model,
            version,
            since,
            until,
        } => {
            let s = client
                .by_version(pb::ByVersionRequest {
                    model,
                    version,
                    since,
                    until,
                })
                .await
                .map_err(status)?
                .into_inner();
            if as_json {
                println!(
                    "{}",
                    json!({"model": s.model, "version": s.version, "decisions": s.decisions,
                        "approve": s.approve, "review": s.review, "decline": s.decline,
                        "decline_rate": s.decline_rate, "raised": s.raised, "held": s.held,
                        "cut": s.cut, "withdrawn": s.withdrawn, "new_customers": s.new_customers})
                );
            } else {
                println!("{} {}: {} decisions", s.model, s.version, s.decisions);
                println!(
                    "  approve {}  review {}  decline {}  (decline rate {:.2}%)",
                    s.approve,
                    s.review,
                    s.decline,
                    100.0 * s.decline_rate
                );
                println!(
                    "  limits raised {}  held {}  cut {}  withdrawn {}  new customers {}",
                    s.raised, s.held, s.cut, s.withdrawn, s.new_customers
                );
            }
        }
        Query::Export { since, until, csv } => {
            let mut stream = client
                .export(pb::ExportRequest { since, until })
                .await
                .map_err(status)?
                .into_inner();
            let mut writer = csv.then(|| csv::Writer::from_writer(std::io::stdout()));
            if let Some(w) = writer.as_mut() {
                w.write_record([
                    "seq",
                    "decision_id",
                    "recorded_at",
                    "request_id",
                    "customer_ref",
                    "model",
                    "version",
                    "digest",
                    "rollout_id",
                    "arm",
                    "probability_of_default",
                    "grade",
                    "decision",
                    "current_limit",
                    "granted_limit",
                    "reasons",
                    "features",
                    "hash",
                ])?;
            }
            while let Some(r) = stream.next().await {
                let r = r.map_err(status)?;
                match writer.as_mut() {
                    None => println!("{}", record_json(&r)),
                    Some(w) => w.write_record([
                        r.seq.to_string(),
                        r.decision_id.clone(),
                        r.recorded_at.clone(),
                        r.request_id.clone(),
                        r.customer_ref.clone(),
                        r.model.clone(),
                        r.version.clone(),
                        r.digest.clone(),
                        r.rollout_id.clone(),
                        arm_name(r.arm),
                        r.probability_of_default.to_string(),
                        r.grade.clone(),
                        decision_name(r.decision),
                        r.current_limit.map(|c| c.to_string()).unwrap_or_default(),
                        r.granted_limit.to_string(),
                        reasons_json(&r.reasons).to_string(),
                        json!(r.features).to_string(),
                        r.hash.clone(),
                    ])?,
                }
            }
            if let Some(mut w) = writer {
                w.flush()?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn band_text(b: &Option<pb::Band>) -> String {
    b.as_ref()
        .map(|b| format!("{} [{}, {})", b.grade, b.pd_min, b.pd_max))
        .unwrap_or_else(|| "-".into())
}

fn explanation_json(e: &pb::Explanation) -> Value {
    json!({
        "decision": e.decision.as_ref().map(record_json),
        "previous": e.previous.as_ref().map(record_json),
        "band": band_text(&e.band),
        "previous_band": band_text(&e.previous_band),
        "moved": e.moved.iter().map(|m| json!({"feature": m.feature, "before": m.before, "after": m.after})).collect::<Vec<_>>(),
    })
}

fn print_explanation(e: &pb::Explanation) {
    let d = e.decision.clone().unwrap_or_default();
    let Some(p) = &e.previous else {
        println!(
            "decision {} is the customer's first: nothing to compare with",
            d.decision_id
        );
        println!(
            "limit {} by {} {} ({})",
            limit_change(&d),
            d.model,
            d.version,
            arm_name(d.arm)
        );
        return;
    };
    println!("decision {}: limit {}", d.decision_id, limit_change(&d));
    println!("{:<16} {:<40} {:<40}", "", "previous", "this decision");
    let row = |k: &str, a: String, b: String| {
        let mark = if a != b { "*" } else { " " };
        println!("{mark}{k:<15} {a:<40} {b:<40}");
    };
    row("decision id", p.decision_id.clone(), d.decision_id.clone());
    row("recorded at", p.recorded_at.clone(), d.recorded_at.clone());
    row(
        "version",
        format!("{} {}", p.model, p.version),
        format!("{} {}", d.model, d.version),
    );
    row("digest", short(&p.digest), short(&d.digest));
    row("arm", arm_name(p.arm), arm_name(d.arm));
    row(
        "PD",
        format!("{:.6}", p.probability_of_default),
        format!("{:.6}", d.probability_of_default),
    );
    row("grade", p.grade.clone(), d.grade.clone());
    row(
        "policy band",
        band_text(&e.previous_band),
        band_text(&e.band),
    );
    row(
        "decision",
        decision_name(p.decision),
        decision_name(d.decision),
    );
    row(
        "granted limit",
        p.granted_limit.to_string(),
        d.granted_limit.to_string(),
    );
    let n = p.reasons.len().max(d.reasons.len());
    for i in 0..n {
        let fmt = |v: &[pb::Reason]| {
            v.get(i)
                .map(|x| format!("{} {:+.4}", x.feature, x.contribution))
                .unwrap_or_default()
        };
        row(
            &format!("reason {}", i + 1),
            fmt(&p.reasons),
            fmt(&d.reasons),
        );
    }
    if e.moved.is_empty() {
        println!("features: none moved (the change comes from the model or policy)");
    } else {
        println!("features that moved:");
        for m in &e.moved {
            let f = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
            println!("  {:<16} {} → {}", m.feature, f(m.before), f(m.after));
        }
    }
}

fn short(digest: &str) -> String {
    digest.chars().take(19).collect()
}

fn guardrail_json(g: &pb::Guardrail) -> Value {
    json!({"name": g.name, "value": g.value, "threshold": g.threshold, "p_value": g.p_value,
        "candidate_n": g.candidate_n, "champion_n": g.champion_n, "breached": g.breached, "note": g.note})
}

/// A rollout's status as one JSON object.
pub fn rollout_json(s: &pb::RolloutStatus) -> Value {
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
pub fn print_rollout(s: &pb::RolloutStatus) {
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
pub fn backtest_json(r: &pb::BacktestReport) -> Value {
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
pub fn print_backtest(r: &pb::BacktestReport) {
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
