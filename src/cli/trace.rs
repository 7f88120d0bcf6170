//! `riskserve trace …`: the reviewers' queries of the decision log (a decision, a
//! customer's history, explain, replay, verify, by version, export, a decision's notice, a
//! customer's complaint), one function each, printed as tables or JSON lines.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use super::connect::{Conn, ServerArg, connect, status_error as status};
use super::output::{arm_name, decision_name, passed, reasons_json, show};
use crate::grpc::pb;
use crate::grpc::pb::trace_client::TraceClient;
use crate::policy::LimitMove;
use crate::report::notice_action;

type Client = TraceClient<Conn>;

#[derive(Debug, Args)]
pub(crate) struct TraceArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Read a stopped server's data directory instead of asking a server (verify and export).
    #[arg(long, global = true)]
    data: Option<std::path::PathBuf>,
    /// Print JSON lines instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    query: TraceQuery,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TraceQuery {
    /// The whole record of one decision.
    Decision { decision_id: String },
    /// A customer's decisions, oldest first, with each limit change marked.
    Customer { customer_id: String },
    /// What differs from the customer's previous decision.
    Explain { decision_id: String },
    /// Re-score the recorded inputs with the recorded bundle and compare bit for bit.
    Replay { decision_id: String },
    /// Walk the hash chain and report the first broken link.
    Verify,
    /// What one version decided: counts, decline rate, limits raised, cut, withdrawn.
    ByVersion {
        model: String,
        version: String,
        #[arg(long, default_value = "")]
        since: String,
        #[arg(long, default_value = "")]
        until: String,
    },
    /// The adverse-action notice of a decision (decline, cut, withdrawal), or why none is needed.
    Notice { decision_id: String },
    /// Why did this customer's limit change: their latest change, its notice, the version and
    /// arm, whether that version was rolled back, whether a remediation followed.
    Complaint { customer_id: String },
    /// Every record in a window, for analysts.
    Export {
        #[arg(long, default_value = "")]
        since: String,
        #[arg(long, default_value = "")]
        until: String,
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv"])]
        format: String,
    },
}

/// Runs `riskserve trace`.
pub(crate) async fn run(args: TraceArgs) -> anyhow::Result<ExitCode> {
    match (&args.data, &args.query) {
        (None, _) => ask(&args.server.server, args.json, args.query).await,
        (Some(dir), TraceQuery::Verify) => {
            let dir = dir.clone();
            let report =
                tokio::task::spawn_blocking(move || crate::decision_log::verify_offline(&dir))
                    .await??;
            Ok(print_verify(&pb::VerifyResult::from(report), args.json))
        }
        (
            Some(dir),
            TraceQuery::Export {
                since,
                until,
                format,
            },
        ) => {
            let window = crate::decision_log::Window {
                since: crate::trace::parse_bound("since", since)?,
                until: crate::trace::parse_bound("until", until)?,
            };
            let (dir, csv) = (dir.clone(), format == "csv");
            tokio::task::spawn_blocking(move || export_offline(&dir, &window, csv)).await??;
            Ok(ExitCode::SUCCESS)
        }
        (Some(_), _) => anyhow::bail!(
            "--data works with `trace verify` and `trace export` only; ask a server for the rest"
        ),
    }
}

/// `trace export --data`: the records of a stopped server's journal, as a server would
/// stream them.
fn export_offline(
    dir: &std::path::Path,
    window: &crate::decision_log::Window,
    csv: bool,
) -> anyhow::Result<()> {
    let mut out = Exporter::new(csv)?;
    let mut failed = None;
    crate::decision_log::scan_offline(dir, window, &mut |record| match out.push(&record.into()) {
        Ok(()) => true,
        Err(e) => {
            failed = Some(e);
            false
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    out.finish()
}

/// Asks the server one trace query and prints the answer; exit code 1 when a replay differs
/// or the chain is broken.
pub(crate) async fn ask(server: &str, json: bool, query: TraceQuery) -> anyhow::Result<ExitCode> {
    let client = TraceClient::new(connect(server).await?);
    match query {
        TraceQuery::Decision { decision_id } => decision(client, decision_id, json).await,
        TraceQuery::Customer { customer_id } => customer(client, customer_id, json).await,
        TraceQuery::Explain { decision_id } => explain(client, decision_id, json).await,
        TraceQuery::Replay { decision_id } => replay(client, decision_id, json).await,
        TraceQuery::Verify => verify(client, json).await,
        TraceQuery::Notice { decision_id } => notice(client, decision_id, json).await,
        TraceQuery::Complaint { customer_id } => complaint(client, customer_id, json).await,
        TraceQuery::ByVersion {
            model,
            version,
            since,
            until,
        } => {
            let request = pb::ByVersionRequest {
                model,
                version,
                since,
                until,
            };
            by_version(client, request, json).await
        }
        TraceQuery::Export {
            since,
            until,
            format,
        } => export(client, pb::ExportRequest { since, until }, format == "csv").await,
    }
}

async fn decision(mut client: Client, id: String, json: bool) -> anyhow::Result<ExitCode> {
    let r = client
        .get_decision(pb::DecisionRef { decision_id: id })
        .await
        .map_err(status)?
        .into_inner();
    show(&r, json, record_json, print_record);
    Ok(ExitCode::SUCCESS)
}

async fn customer(mut client: Client, id: String, json: bool) -> anyhow::Result<ExitCode> {
    let records = client
        .customer_history(pb::CustomerRef { customer_id: id })
        .await
        .map_err(status)?
        .into_inner()
        .records;
    if json {
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
        let changed = LimitMove::of(r.current_limit, r.granted_limit).is_change();
        // A remediation names the harm it undoes, and the version that did it.
        let harm = (!r.remediates.is_empty()).then(|| {
            match records.iter().find(|h| h.decision_id == r.remediates) {
                Some(h) => format!(
                    "  ← remediation by {} of {} ({} {}: {})",
                    r.version,
                    h.decision_id,
                    h.version,
                    arm_name(h.arm),
                    limit_change(h)
                ),
                None => format!("  ← remediation by {} of {}", r.version, r.remediates),
            }
        });
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
            if let Some(harm) = harm {
                harm
            } else if changed {
                format!("  ← by {} ({})", r.version, arm_name(r.arm))
            } else {
                String::new()
            },
        );
    }
    if records.is_empty() {
        println!("(no decisions for this customer)");
    }
    Ok(ExitCode::SUCCESS)
}

async fn explain(mut client: Client, id: String, json: bool) -> anyhow::Result<ExitCode> {
    let e = client
        .explain(pb::DecisionRef { decision_id: id })
        .await
        .map_err(status)?
        .into_inner();
    show(&e, json, explanation_json, print_explanation);
    Ok(ExitCode::SUCCESS)
}

async fn replay(mut client: Client, id: String, json: bool) -> anyhow::Result<ExitCode> {
    let r = client
        .replay(pb::DecisionRef { decision_id: id })
        .await
        .map_err(status)?
        .into_inner();
    show(&r, json, replay_json, print_replay);
    Ok(passed(r.identical))
}

fn replay_json(r: &pb::ReplayResult) -> Value {
    let rec = r.recorded.clone().unwrap_or_default();
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
}

fn print_replay(r: &pb::ReplayResult) {
    let rec = r.recorded.clone().unwrap_or_default();
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

async fn notice(mut client: Client, id: String, json: bool) -> anyhow::Result<ExitCode> {
    let n = client
        .notice(pb::DecisionRef { decision_id: id })
        .await
        .map_err(status)?
        .into_inner();
    show(&n, json, notice_json, print_notice);
    Ok(ExitCode::SUCCESS)
}

fn notice_json(n: &pb::AdverseActionNotice) -> Value {
    let d = n.decision.clone().unwrap_or_default();
    json!({
        "decision_id": d.decision_id, "model": d.model, "version": d.version,
        "digest": d.digest, "arm": arm_name(d.arm), "decision": decision_name(d.decision),
        "current_limit": d.current_limit, "granted_limit": d.granted_limit,
        "required": n.required, "action": notice_action(n.action),
        "not_needed": n.not_needed, "wording": n.wording,
        "reasons": n.reasons.iter().map(|r| json!({"rank": r.rank, "feature": r.feature,
            "code": r.code, "text": r.text, "contribution": r.contribution, "value": r.value}))
            .collect::<Vec<_>>(),
        "text": n.text,
    })
}

fn print_notice(n: &pb::AdverseActionNotice) {
    let d = n.decision.clone().unwrap_or_default();
    if !n.required {
        println!(
            "decision {} ({} {}, {}): {}",
            d.decision_id,
            d.model,
            d.version,
            arm_name(d.arm),
            n.not_needed
        );
        return;
    }
    println!(
        "decision {}: {}, limit {}",
        d.decision_id,
        notice_action(n.action),
        limit_change(&d)
    );
    println!(
        "by {} {} ({}, {})",
        d.model,
        d.version,
        arm_name(d.arm),
        d.digest
    );
    println!(
        "wording: {}",
        if n.wording == "bundle" {
            "the version's reason_codes.toml"
        } else {
            "riskserve's default (the version has no reason-code table)"
        }
    );
    println!("reasons");
    for r in &n.reasons {
        let code = if r.code.is_empty() { "-" } else { &r.code };
        println!(
            "  {}. {:<6} {:<16} {:+.4}  {}",
            r.rank, code, r.feature, r.contribution, r.text
        );
    }
    println!("\nnotice to the customer:\n");
    print_indented(&n.text);
}

/// A notice's text, indented, its blank lines left empty.
fn print_indented(text: &str) {
    for line in text.lines() {
        if line.is_empty() {
            println!();
        } else {
            println!("  {line}");
        }
    }
}

async fn complaint(mut client: Client, id: String, json: bool) -> anyhow::Result<ExitCode> {
    let c = client
        .complaint(pb::CustomerRef { customer_id: id })
        .await
        .map_err(status)?
        .into_inner();
    show(&c, json, complaint_json, print_complaint);
    Ok(ExitCode::SUCCESS)
}

fn complaint_json(c: &pb::ComplaintAnswer) -> Value {
    json!({
        "decisions": c.decisions,
        "change": c.change.as_ref().map(notice_json),
        "rollout_id": c.rollout_id, "rollout_state": c.rollout_state,
        "rolled_back": c.rolled_back,
        "rollback": c.rollback.as_ref().map(|t| json!({"at": t.at, "actor": t.actor, "reason": t.reason})),
        "remediated": c.remediated,
        "remediation_decision_id": c.remediation.as_ref().map(|r| r.decision_id.clone()),
    })
}

fn print_complaint(c: &pb::ComplaintAnswer) {
    let Some(n) = &c.change else {
        println!(
            "no decision changed this customer's limit ({} decisions on record)",
            c.decisions
        );
        return;
    };
    let d = n.decision.clone().unwrap_or_default();
    println!(
        "latest limit change: {} on {} by {} {} ({})",
        limit_change(&d),
        d.recorded_at,
        d.model,
        d.version,
        arm_name(d.arm)
    );
    println!("decision     {}", d.decision_id);
    let rollout = if c.rollout_id.is_empty() {
        "none (the serving version decided)".to_string()
    } else {
        format!("{} ({})", c.rollout_id, c.rollout_state)
    };
    println!("rollout      {rollout}");
    let rolled_back = match (&c.rollback, c.rolled_back) {
        (Some(t), true) => format!(
            "YES: {} was rolled back at {} by {}: {}",
            d.version, t.at, t.actor, t.reason
        ),
        _ => "no".into(),
    };
    println!("rolled back  {rolled_back}");
    let remediated = match &c.remediation {
        Some(r) => format!(
            "yes: decision {} on {} granted {}",
            r.decision_id, r.recorded_at, r.granted_limit
        ),
        None => "no".into(),
    };
    println!("remediated   {remediated}");
    if n.required {
        println!("\nnotice ({}):\n", notice_action(n.action));
        print_indented(&n.text);
    } else {
        println!("notice       none needed: {}", n.not_needed);
    }
}

async fn verify(mut client: Client, json: bool) -> anyhow::Result<ExitCode> {
    let v = client
        .verify(pb::VerifyRequest {})
        .await
        .map_err(status)?
        .into_inner();
    Ok(print_verify(&v, json))
}

/// Prints a verification, online or offline alike; exit code 1 when the chain is broken.
fn print_verify(v: &pb::VerifyResult, json: bool) -> ExitCode {
    if json {
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
    passed(v.ok)
}

async fn by_version(
    mut client: Client,
    request: pb::ByVersionRequest,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let s = client
        .by_version(request)
        .await
        .map_err(status)?
        .into_inner();
    if json {
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
    Ok(ExitCode::SUCCESS)
}

/// The columns of `export --format csv`, in order.
const EXPORT_COLUMNS: [&str; 18] = [
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
];

async fn export(
    mut client: Client,
    request: pb::ExportRequest,
    csv: bool,
) -> anyhow::Result<ExitCode> {
    let mut stream = client.export(request).await.map_err(status)?.into_inner();
    let mut out = Exporter::new(csv)?;
    while let Some(r) = stream.next().await {
        out.push(&r.map_err(status)?)?;
    }
    out.finish()?;
    Ok(ExitCode::SUCCESS)
}

/// Writes exported records to stdout as JSON lines or CSV (header first), online or offline
/// alike.
struct Exporter {
    csv: Option<csv::Writer<std::io::Stdout>>,
}

impl Exporter {
    fn new(csv: bool) -> anyhow::Result<Exporter> {
        let mut csv = csv.then(|| csv::Writer::from_writer(std::io::stdout()));
        if let Some(w) = csv.as_mut() {
            w.write_record(EXPORT_COLUMNS)?;
        }
        Ok(Exporter { csv })
    }

    fn push(&mut self, r: &pb::DecisionRecord) -> anyhow::Result<()> {
        use std::io::Write as _;
        // Written, not printed: a reader that closed the pipe is an error to end on
        // (`cli::main` ends quietly), where `println!` would panic.
        match self.csv.as_mut() {
            None => writeln!(std::io::stdout().lock(), "{}", record_json(r))?,
            Some(w) => w.write_record(csv_row(r))?,
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<()> {
        if let Some(mut w) = self.csv {
            w.flush()?;
        }
        Ok(())
    }
}

/// A record as one `export --format csv` row, in [`EXPORT_COLUMNS`] order.
fn csv_row(r: &pb::DecisionRecord) -> [String; 18] {
    [
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
    ]
}

/// A record as one JSON object (also the `export --format jsonl` line).
pub(crate) fn record_json(r: &pb::DecisionRecord) -> Value {
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
        "remediates": r.remediates,
        "pre_harm_limit": r.pre_harm_limit,
        "reason": r.reason,
    })
}

/// How a decision moved the limit, for people: "20000 → 0 (withdrawn)".
fn limit_change(r: &pb::DecisionRecord) -> String {
    match (
        r.current_limit,
        LimitMove::of(r.current_limit, r.granted_limit),
    ) {
        (None, _) => format!("{} (new customer)", r.granted_limit),
        (Some(c), LimitMove::Held) => format!("{c} (held)"),
        (Some(c), what) => format!("{c} → {} ({})", r.granted_limit, what.as_str()),
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
    if !r.remediates.is_empty() {
        println!(
            "{:<13} {} (decided on the limit before it, {}; applied by {}: {})",
            "remediates",
            r.remediates,
            r.pre_harm_limit.unwrap_or_default(),
            r.caller,
            if r.reason.is_empty() { "-" } else { &r.reason }
        );
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
