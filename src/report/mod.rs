//! Reports people look at: one self-contained HTML page per rollout or customer, with inline
//! SVG charts and no reference to anything outside the page.
//!
//! The pages are rendered on the client side from what the gRPC API returns
//! (`Rollouts.History`, `Trace.CustomerHistory` and `Trace.Notice`), so a report shows exactly
//! what any other client of the API would see.

pub mod svg;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::decision_log::PD_BINS;
use crate::grpc::pb;
use crate::rollout::Plan;
use svg::{Band, Histogram, Mark, Series, Style, TimeChart, epoch_secs, escape};

const CHAMPION: &str = "#1f77b4";
const CANDIDATE: &str = "#ff7f0e";
const SHADOW: &str = "#9467bd";
const THRESHOLD: &str = "#d62728";
const PLANNED: &str = "#7f7f7f";
const PROMOTED: &str = "#2ca02c";

const STYLE: &str = "
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1000px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
.meta { color: #555; font-size: 14px; } .bad { color: #d62728; font-weight: 600; }
.good { color: #2ca02c; font-weight: 600; }
svg.chart { display: block; margin: 8px 0; }
svg .title { font-size: 14px; font-weight: 600; fill: #222; }
svg .tick, svg .legend { font-size: 11px; fill: #444; }
svg .mark, svg .note { font-size: 11px; } svg .note { fill: #222; }
svg .band { font-size: 12px; fill: white; font-weight: 600; }
svg .empty { font-size: 13px; fill: #999; }
svg .grid { stroke: #eee; } svg .axis { stroke: #888; }
tr.notice pre { font-family: inherit; font-size: 13px; white-space: pre-wrap; margin: 4px 0 8px 16px; }
";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n{body}\n<p class=\"meta\">Made by riskserve {} from the server's records; this page loads nothing from anywhere.</p></body></html>\n",
        escape(title),
        env!("CARGO_PKG_VERSION")
    )
}

fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    out.push_str("<table><tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{}</td>", escape(cell));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

fn arm_name(a: i32) -> &'static str {
    match pb::Arm::try_from(a) {
        Ok(pb::Arm::Champion) => "champion",
        Ok(pb::Arm::Candidate) => "candidate",
        Ok(pb::Arm::Shadow) => "shadow",
        Ok(pb::Arm::Remediation) => "remediation",
        _ => "?",
    }
}

fn arm_color(a: i32) -> &'static str {
    match pb::Arm::try_from(a) {
        Ok(pb::Arm::Candidate) => CANDIDATE,
        Ok(pb::Arm::Shadow) => SHADOW,
        Ok(pb::Arm::Remediation) => PROMOTED,
        _ => CHAMPION,
    }
}

fn share_label(plan: Option<&Plan>, step: u32) -> String {
    match plan.and_then(|p| p.steps.get(step as usize)) {
        Some(s) if s.share_bp == 0 && s.shadow => "shadow".into(),
        Some(s) => format!("{}%", f64::from(s.share_bp) / 100.0),
        None => format!("step {step}"),
    }
}

/// The rollout page: step timeline, each arm's share over time, each guardrail against its
/// threshold over time, the arms' PD distributions and their decision summaries.
pub fn rollout_page(h: &pb::RolloutHistory) -> String {
    let empty = pb::RolloutStatus::default();
    let s = h.status.as_ref().unwrap_or(&empty);
    let plan: Option<Plan> = if s.plan_toml.trim().is_empty() {
        Some(Plan::default())
    } else {
        toml::from_str(&s.plan_toml).ok()
    };
    let plan = plan.as_ref();
    let times: Vec<Option<f64>> = s.transitions.iter().map(|t| epoch_secs(&t.at)).collect();
    let mut body = String::new();
    rollout_heading(&mut body, s, plan);
    let marks = steps_section(&mut body, h, s, plan, &times);
    traffic_section(&mut body, h, s, plan, &times, &marks);
    guardrails_section(&mut body, h, s, &times, &marks);
    arms_section(&mut body, h);
    backtest_section(&mut body, s);
    page(&format!("Rollout {} of {}", s.id, s.model), &body)
}

/// The title and the rollout's state now.
fn rollout_heading(body: &mut String, s: &pb::RolloutStatus, plan: Option<&Plan>) {
    let _ = write!(
        body,
        "<h1>Rollout of {model} {candidate} against {champion}</h1><p class=\"meta\">Rollout {id} · started {created} · now <span class=\"{class}\">{state}</span> at step {step} of {steps} ({share})</p>",
        model = escape(&s.model),
        candidate = escape(&s.candidate),
        champion = escape(&s.champion),
        id = escape(&s.id),
        created = escape(&s.created_at),
        class = match s.state.as_str() {
            "rolled_back" => "bad",
            "promoted" => "good",
            _ => "",
        },
        state = escape(&s.state.replace('_', " ")),
        step = s.step + 1,
        steps = s.steps,
        share = share_label(plan, s.step),
    );
}

/// Steps over time, from the transitions: the timeline and the table of transitions.
/// Returns the marks of the closing transitions, which every later chart shows too.
fn steps_section(
    body: &mut String,
    h: &pb::RolloutHistory,
    s: &pb::RolloutStatus,
    plan: Option<&Plan>,
    times: &[Option<f64>],
) -> Vec<Mark> {
    let (bands, marks) = step_bands(h, s, plan, times);
    body.push_str("<h2>Steps</h2>");
    body.push_str(&svg::timeline(
        "Step timeline (candidate share per step)",
        &bands,
        &marks,
    ));
    let rows: Vec<Vec<String>> = s
        .transitions
        .iter()
        .map(|t| {
            vec![
                t.at.clone(),
                if t.from_state.is_empty() {
                    t.to_state.clone()
                } else {
                    format!("{} → {}", t.from_state, t.to_state)
                },
                share_label(plan, t.to_step),
                t.actor.clone(),
                t.reason.clone(),
            ]
        })
        .collect();
    table(body, &["at", "state", "share", "by", "why"], &rows);
    marks
}

/// A band for each open step (until the next transition or the last traffic seen) and a
/// mark for each transition that closed the rollout.
fn step_bands(
    h: &pb::RolloutHistory,
    s: &pb::RolloutStatus,
    plan: Option<&Plan>,
    times: &[Option<f64>],
) -> (Vec<Band>, Vec<Mark>) {
    let last_seen = h
        .traffic
        .last()
        .and_then(|t| epoch_secs(&t.start))
        .map(|t| t + h.stretch_secs as f64);
    let mut bands = Vec::new();
    let mut marks = Vec::new();
    for (i, t) in s.transitions.iter().enumerate() {
        let Some(from) = times[i] else { continue };
        let open = matches!(t.to_state.as_str(), "active" | "paused");
        if open {
            let to = times
                .get(i + 1)
                .copied()
                .flatten()
                .or(last_seen)
                .unwrap_or(from)
                .max(from);
            let paused = t.to_state == "paused";
            bands.push(Band {
                from,
                to,
                label: format!(
                    "{}{}",
                    share_label(plan, t.to_step),
                    if paused { " (paused)" } else { "" }
                ),
                color: if paused {
                    PLANNED
                } else if step_is_shadow(plan, t.to_step) {
                    SHADOW
                } else {
                    CANDIDATE
                },
            });
        } else {
            marks.push(Mark {
                at: from,
                label: t.to_state.replace('_', " "),
                color: if t.to_state == "promoted" {
                    PROMOTED
                } else {
                    THRESHOLD
                },
            });
        }
    }
    (bands, marks)
}

/// Each arm's share of the traffic over time, against the plan, and each arm's rate.
fn traffic_section(
    body: &mut String,
    h: &pb::RolloutHistory,
    s: &pb::RolloutStatus,
    plan: Option<&Plan>,
    times: &[Option<f64>],
    marks: &[Mark],
) {
    let mut candidate_share = Vec::new();
    let mut shadow_share = Vec::new();
    let mut volume: [Vec<(f64, f64)>; 3] = Default::default();
    for t in &h.traffic {
        let Some(x) = epoch_secs(&t.start) else {
            continue;
        };
        let served = t.champion + t.candidate;
        if served > 0 {
            candidate_share.push((x, 100.0 * t.candidate as f64 / served as f64));
        }
        if t.shadow > 0 && t.champion > 0 {
            shadow_share.push((x, 100.0 * t.shadow as f64 / t.champion as f64));
        }
        let per_sec = h.stretch_secs.max(1) as f64;
        volume[0].push((x, t.champion as f64 / per_sec));
        volume[1].push((x, t.candidate as f64 / per_sec));
        volume[2].push((x, t.shadow as f64 / per_sec));
    }
    let planned: Vec<(f64, f64)> = s
        .transitions
        .iter()
        .zip(times)
        .filter_map(|(t, x)| {
            let open = matches!(t.to_state.as_str(), "active" | "paused");
            let share = plan
                .and_then(|p| p.steps.get(t.to_step as usize))
                .map_or(0.0, |st| f64::from(st.share_bp) / 100.0);
            x.map(|x| (x, if open { share } else { 0.0 }))
        })
        .collect();
    let mut share_series = vec![
        series("planned share", PLANNED, Style::Steps, planned),
        series("candidate share", CANDIDATE, Style::Line, candidate_share),
    ];
    if !shadow_share.is_empty() {
        share_series.push(series("shadow-scored", SHADOW, Style::Line, shadow_share));
    }
    body.push_str("<h2>Traffic</h2>");
    body.push_str(&time_chart(
        "Each arm's share of the decisions over time".into(),
        "% of served decisions".into(),
        share_series,
        marks,
        260.0,
    ));
    let [champion_rate, candidate_rate, shadow_rate] = volume;
    let mut rate_series = vec![
        series("champion", CHAMPION, Style::Line, champion_rate),
        series("candidate", CANDIDATE, Style::Line, candidate_rate),
    ];
    if shadow_rate.iter().any(|p| p.1 > 0.0) {
        rate_series.push(series("shadow", SHADOW, Style::Line, shadow_rate));
    }
    body.push_str(&time_chart(
        "Decisions per second by arm".into(),
        "decisions / s".into(),
        rate_series,
        marks,
        240.0,
    ));
}

fn series(name: &str, color: &'static str, style: Style, points: Vec<(f64, f64)>) -> Series {
    Series {
        name: name.into(),
        color,
        style,
        points,
    }
}

/// A time chart from 0 up, with the rollout's closing marks.
fn time_chart(
    title: String,
    y_label: String,
    series: Vec<Series>,
    marks: &[Mark],
    height: f64,
) -> String {
    TimeChart {
        title,
        y_label,
        series,
        marks: marks.to_vec(),
        y_floor: Some(0.0),
        ..TimeChart::default()
    }
    .render(height)
}

/// Each guardrail against its threshold, from the snapshots and the transitions.
fn guardrails_section(
    body: &mut String,
    h: &pb::RolloutHistory,
    s: &pb::RolloutStatus,
    times: &[Option<f64>],
    marks: &[Mark],
) {
    body.push_str("<h2>Guardrails</h2>");
    let readings = guardrail_readings(h, s, times);
    if readings.is_empty() {
        body.push_str("<p class=\"meta\">No guardrail readings were kept for this rollout.</p>");
    } else {
        body.push_str(
            "<p class=\"meta\">Values are drawn once both arms have the plan's minimum sample; \
             before that a guardrail is not judged.</p>",
        );
    }
    for (name, mut points) in readings {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        // A reading on too small a sample is not judged, and would mislead drawn as a value.
        let value: Vec<(f64, f64)> = points
            .iter()
            .filter(|(_, g)| g.note.is_empty())
            .map(|(x, g)| (*x, g.value))
            .collect();
        let threshold: Vec<(f64, f64)> = points.iter().map(|(x, g)| (*x, g.threshold)).collect();
        let breached: Vec<(f64, f64)> = points
            .iter()
            .filter(|(_, g)| g.breached)
            .map(|(x, g)| (*x, g.value))
            .collect();
        let mut lines = vec![
            series("value", CANDIDATE, Style::Line, value),
            series("threshold", THRESHOLD, Style::Dashed, threshold),
        ];
        if !breached.is_empty() {
            lines.push(series("breached", THRESHOLD, Style::Dots, breached));
        }
        body.push_str(&time_chart(
            format!("Guardrail {name} against its threshold"),
            name,
            lines,
            marks,
            220.0,
        ));
    }
}

/// Each guardrail's readings (time, figure), guardrails in the order first read.
fn guardrail_readings<'a>(
    h: &'a pb::RolloutHistory,
    s: &'a pb::RolloutStatus,
    times: &[Option<f64>],
) -> Vec<(String, Vec<(f64, &'a pb::Guardrail)>)> {
    let mut readings: BTreeMap<String, Vec<(f64, &pb::Guardrail)>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let moments = h
        .snapshots
        .iter()
        .map(|snap| (epoch_secs(&snap.at), &snap.figures))
        .chain(
            s.transitions
                .iter()
                .zip(times)
                // The figures at the start are the backtest's, not live readings.
                .filter(|(t, _)| !t.from_state.is_empty())
                .map(|(t, x)| (*x, &t.figures)),
        );
    for (x, figures) in moments {
        let Some(x) = x else { continue };
        for g in figures {
            if !readings.contains_key(&g.name) {
                order.push(g.name.clone());
            }
            readings.entry(g.name.clone()).or_default().push((x, g));
        }
    }
    order
        .into_iter()
        .map(|name| {
            let points = readings.remove(&name).unwrap_or_default();
            (name, points)
        })
        .collect()
}

/// The arms side by side: their PD distributions and their decision summaries.
fn arms_section(body: &mut String, h: &pb::RolloutHistory) {
    body.push_str("<h2>Arms</h2>");
    let groups = h
        .arms
        .iter()
        .map(|a| {
            let n: u64 = a.pd_histogram.iter().sum();
            let shares = a
                .pd_histogram
                .iter()
                .map(|c| 100.0 * *c as f64 / n.max(1) as f64)
                .collect();
            let version = a.summary.as_ref().map_or("", |v| v.version.as_str());
            (
                format!("{} {version}", arm_name(a.arm)),
                arm_color(a.arm),
                shares,
            )
        })
        .collect();
    let width = 1.0 / PD_BINS as f64;
    body.push_str(
        &Histogram {
            title: "Probability of default by arm".into(),
            y_label: "% of the arm's decisions".into(),
            bins: (0..PD_BINS)
                .map(|i| format!("{:.2}", i as f64 * width))
                .collect(),
            groups,
        }
        .render(260.0),
    );
    arms_table(body, h);
    if h.arms.iter().any(|a| a.arm == pb::Arm::Shadow as i32) {
        body.push_str("<p class=\"meta\">Shadow decisions were recorded but never returned: no customer saw them.</p>");
    }
    if let Some(r) = h.arms.iter().find(|a| a.arm == pb::Arm::Remediation as i32) {
        let v = r.summary.clone().unwrap_or_default();
        let _ = write!(
            body,
            "<p class=\"meta\"><span class=\"good\">{} customers remediated</span>: after the rollout closed, {} re-decided each customer whose limit the candidate lowered, on the limit they had, and the decision restoring it is recorded (arm remediation).</p>",
            v.decisions,
            escape(&v.version)
        );
    }
}

/// Each arm's version and decision counts.
fn arms_table(body: &mut String, h: &pb::RolloutHistory) {
    let rows: Vec<Vec<String>> = h
        .arms
        .iter()
        .map(|a| {
            let v = a.summary.clone().unwrap_or_default();
            vec![
                arm_name(a.arm).to_string(),
                v.version,
                v.decisions.to_string(),
                v.approve.to_string(),
                v.review.to_string(),
                v.decline.to_string(),
                format!("{:.2}%", 100.0 * v.decline_rate),
                v.raised.to_string(),
                v.held.to_string(),
                v.cut.to_string(),
                v.withdrawn.to_string(),
                v.new_customers.to_string(),
            ]
        })
        .collect();
    table(
        body,
        &[
            "arm",
            "version",
            "decisions",
            "approve",
            "review",
            "decline",
            "decline rate",
            "raised",
            "held",
            "cut",
            "withdrawn",
            "new",
        ],
        &rows,
    );
}

/// The backtest the rollout started with, if it ran.
fn backtest_section(body: &mut String, s: &pb::RolloutStatus) {
    if let Some(b) = &s.backtest {
        let _ = write!(
            body,
            "<h2>Backtest at the start</h2><p class=\"meta\">{} customers compared, {} unscorable, PSI {:.4}: <span class=\"{}\">{}</span></p>",
            b.compared,
            b.unscorable,
            b.psi,
            if b.passed { "good" } else { "bad" },
            if b.passed { "passed" } else { "breached" }
        );
    }
}

/// An adverse action's name in lower case ("withdrawal", "cut", "decline"); "" when the
/// decision is not adverse.
pub fn notice_action(a: i32) -> String {
    match pb::AdverseAction::try_from(a) {
        Ok(pb::AdverseAction::Unspecified) | Err(_) => String::new(),
        Ok(a) => a
            .as_str_name()
            .trim_start_matches("ADVERSE_ACTION_")
            .to_lowercase(),
    }
}

fn step_is_shadow(plan: Option<&Plan>, step: u32) -> bool {
    plan.and_then(|p| p.steps.get(step as usize))
        .is_some_and(|s| s.share_bp == 0 && s.shadow)
}

fn limit_text(r: &pb::DecisionRecord) -> String {
    match r.current_limit {
        None => format!("new: {}", r.granted_limit),
        Some(c) if c == r.granted_limit => format!("{c} held"),
        Some(c) => format!("{c} → {}", r.granted_limit),
    }
}

/// The customer page: the limit over time, each change marked by the version and arm that
/// made it, and every decision with its reasons; under each adverse decision, its notice as
/// the customer reads it (`notices`: the server's notices of these records, any order; those
/// not required are ignored).
pub fn customer_page(
    customer_id: &str,
    records: &[pb::DecisionRecord],
    notices: &[pb::AdverseActionNotice],
) -> String {
    let mut body = String::new();
    let served: Vec<&pb::DecisionRecord> = records
        .iter()
        .filter(|r| r.arm != pb::Arm::Shadow as i32)
        .collect();
    let _ = write!(
        body,
        "<h1>Customer {}</h1><p class=\"meta\">{} decisions ({} served, {} shadow); the log holds only the pseudonym {}.</p>",
        escape(customer_id),
        records.len(),
        served.len(),
        records.len() - served.len(),
        escape(records.first().map_or("", |r| r.customer_ref.as_str()))
    );
    let mut limit = Vec::new();
    let mut notes = Vec::new();
    let mut by_arm: BTreeMap<i32, Vec<(f64, f64)>> = BTreeMap::new();
    let mut previous: Option<i64> = None;
    for r in &served {
        let Some(x) = epoch_secs(&r.recorded_at) else {
            continue;
        };
        let before = previous.or(r.current_limit);
        if limit.is_empty()
            && let Some(c) = before
        {
            limit.push((x, c as f64));
        }
        limit.push((x, r.granted_limit as f64));
        by_arm
            .entry(r.arm)
            .or_default()
            .push((x, r.granted_limit as f64));
        if before != Some(r.granted_limit) {
            notes.push((
                x,
                r.granted_limit as f64,
                format!("{} {}", r.version, arm_name(r.arm)),
            ));
        }
        previous = Some(r.granted_limit);
    }
    let mut series = vec![Series {
        name: "credit limit".into(),
        color: PLANNED,
        style: Style::Steps,
        points: limit,
    }];
    for (arm, points) in by_arm {
        series.push(Series {
            name: format!("decided by {}", arm_name(arm)),
            color: arm_color(arm),
            style: Style::Dots,
            points,
        });
    }
    let shadow: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.arm == pb::Arm::Shadow as i32)
        .filter_map(|r| epoch_secs(&r.recorded_at).map(|x| (x, r.granted_limit as f64)))
        .collect();
    if !shadow.is_empty() {
        series.push(Series {
            name: "shadow (not served)".into(),
            color: SHADOW,
            style: Style::Dots,
            points: shadow,
        });
    }
    body.push_str(
        &TimeChart {
            title: "Credit limit over time, each change marked by its version and arm".into(),
            y_label: "credit limit".into(),
            series,
            notes,
            y_floor: Some(0.0),
            ..TimeChart::default()
        }
        .render(300.0),
    );
    body.push_str("<h2>Decisions</h2>");
    let notice_of = |r: &pb::DecisionRecord| {
        notices.iter().find(|n| {
            n.required
                && n.decision
                    .as_ref()
                    .is_some_and(|d| d.decision_id == r.decision_id)
        })
    };
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let reasons: Vec<String> = r
                .reasons
                .iter()
                .map(|x| format!("{} {:+.2}", x.feature, x.contribution))
                .collect();
            vec![
                r.recorded_at.clone(),
                format!("{} {}", r.model, r.version),
                arm_name(r.arm).to_string(),
                pb::Decision::try_from(r.decision)
                    .map(|d| {
                        d.as_str_name()
                            .trim_start_matches("DECISION_")
                            .to_lowercase()
                    })
                    .unwrap_or_default(),
                r.grade.clone(),
                format!("{:.4}", r.probability_of_default),
                limit_text(r),
                reasons.join(", "),
                r.decision_id.clone(),
            ]
        })
        .collect();
    let head = [
        "recorded at",
        "version",
        "arm",
        "decision",
        "grade",
        "PD",
        "limit",
        "reasons",
        "decision id",
    ];
    let mut decisions = String::new();
    table(&mut decisions, &head, &[]);
    // The table without its closing tag: each row, and under an adverse one its notice.
    decisions.truncate(decisions.len() - "</table>".len());
    for (r, row) in records.iter().zip(&rows) {
        decisions.push_str("<tr>");
        for cell in row {
            let _ = write!(decisions, "<td>{}</td>", escape(cell));
        }
        decisions.push_str("</tr>");
        if !r.remediates.is_empty() {
            let harm = records.iter().find(|h| h.decision_id == r.remediates);
            let _ = write!(
                decisions,
                "<tr class=\"remediation\"><td class=\"text\" colspan=\"{}\"><div class=\"meta\"><span class=\"good\">Remediation</span> of decision {}{}: {} {} re-decided it on the limit before it ({}) and restored {}. Applied by {}{}.</div></td></tr>",
                head.len(),
                escape(&r.remediates),
                escape(&harm.map_or(String::new(), |h| format!(
                    " ({} {}, {})",
                    h.version,
                    arm_name(h.arm),
                    limit_text(h)
                ))),
                escape(&r.model),
                escape(&r.version),
                r.pre_harm_limit.unwrap_or_default(),
                r.granted_limit,
                escape(&r.caller),
                escape(&if r.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", r.reason)
                })
            );
        }
        if let Some(n) = notice_of(r) {
            let codes: Vec<String> = n
                .reasons
                .iter()
                .map(|x| {
                    let code = if x.code.is_empty() {
                        "no code"
                    } else {
                        &x.code
                    };
                    format!("{} {} ({code})", x.rank, x.feature)
                })
                .collect();
            let _ = write!(
                decisions,
                "<tr class=\"notice\"><td class=\"text\" colspan=\"{}\"><div class=\"meta\">Notice sent for this {}: reasons {}</div><pre>{}</pre></td></tr>",
                head.len(),
                escape(&notice_action(n.action)),
                escape(&codes.join(", ")),
                escape(&n.text)
            );
        }
    }
    decisions.push_str("</table>");
    body.push_str(&decisions);
    page(&format!("Customer {customer_id}"), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, current: i64, granted: i64) -> pb::DecisionRecord {
        pb::DecisionRecord {
            decision_id: id.into(),
            recorded_at: "2026-12-02T10:00:00Z".into(),
            model: "credit-limit".into(),
            version: "v9".into(),
            arm: pb::Arm::Candidate as i32,
            decision: pb::Decision::Decline as i32,
            current_limit: Some(current),
            granted_limit: granted,
            ..Default::default()
        }
    }

    #[test]
    fn the_notice_of_an_adverse_decision_is_printed_under_it_and_only_there() {
        let records = [record("d-1", 50_000, 60_000), record("d-2", 60_000, 0)];
        let notice = pb::AdverseActionNotice {
            decision: Some(records[1].clone()),
            required: true,
            action: pb::AdverseAction::Withdrawal as i32,
            reasons: vec![pb::NoticeReason {
                rank: 1,
                feature: "AGE".into(),
                code: "R41".into(),
                text: "Your age".into(),
                ..Default::default()
            }],
            text: "On 2026-12-02 we withdrew your credit limit of 60,000. <Your limit is now 0.>"
                .into(),
            ..Default::default()
        };
        let page = customer_page("7", &records, &[notice]);
        let at = |s: &str| {
            page.find(s)
                .unwrap_or_else(|| panic!("no {s:?} in the page"))
        };
        assert_eq!(page.matches("<tr class=\"notice\">").count(), 1);
        // Under d-2's row, after d-1's: escaped, with the action and the codes.
        assert!(at("d-1") < at("d-2") && at("d-2") < at("<tr class=\"notice\">"));
        assert!(page.contains("Notice sent for this withdrawal: reasons 1 AGE (R41)"));
        assert!(page.contains("60,000. &lt;Your limit is now 0.&gt;</pre>"));
    }

    #[test]
    fn a_remediation_is_marked_under_its_row_with_the_harm_it_undoes() {
        let harm = record("d-2", 60_000, 0);
        let remedy = pb::DecisionRecord {
            version: "v1".into(),
            arm: pb::Arm::Remediation as i32,
            decision: pb::Decision::Approve as i32,
            remediates: "d-2".into(),
            pre_harm_limit: Some(60_000),
            caller: "ops".into(),
            reason: "v9 rolled back".into(),
            ..record("d-3", 0, 60_000)
        };
        let page = customer_page("7", &[harm, remedy], &[]);
        assert_eq!(page.matches("<tr class=\"remediation\">").count(), 1);
        assert!(page.find("d-3").unwrap() < page.find("<tr class=\"remediation\">").unwrap());
        assert!(
            page.contains(
                "Remediation</span> of decision d-2 (v9 candidate, 60000 → 0): credit-limit v1 \
                 re-decided it on the limit before it (60000) and restored 60000. Applied by \
                 ops: v9 rolled back."
            ),
            "{page}"
        );
        assert!(page.contains("<td>remediation</td>"));
    }

    #[test]
    fn a_rollout_page_counts_the_customers_remediated_after_it() {
        let arm = |arm: pb::Arm, version: &str, decisions: u64| pb::ArmSummary {
            arm: arm as i32,
            summary: Some(pb::VersionSummary {
                version: version.into(),
                decisions,
                ..Default::default()
            }),
            pd_histogram: vec![0; PD_BINS],
        };
        let mut h = pb::RolloutHistory {
            arms: vec![
                arm(pb::Arm::Champion, "v1", 900),
                arm(pb::Arm::Candidate, "v9", 100),
            ],
            ..Default::default()
        };
        assert!(!rollout_page(&h).contains("remediated"));
        h.arms.push(arm(pb::Arm::Remediation, "v1", 17));
        let page = rollout_page(&h);
        assert!(
            page.contains("<span class=\"good\">17 customers remediated</span>: after the rollout closed, v1 re-decided"),
            "{page}"
        );
        assert!(
            page.contains("<td>remediation</td><td>v1</td><td>17</td>"),
            "{page}"
        );
    }
}
