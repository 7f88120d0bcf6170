//! `riskserve demo` on less traffic: the flawed v2 is caught and rolled back, the customer
//! it harmed is traced and replayed, the log verifies, v2's harm is remediated (the traced
//! customer's complaint says so), and the sound v3 ends up serving.

use crate::harness::repo;
use riskserve::cli::demo::{self, DemoArgs};
use riskserve::grpc::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_catches_the_flaw_traces_the_harm_and_promotes_the_sound_version() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = demo::run(DemoArgs {
        dir: Some(dir.path().join("demo")),
        data: repo().join("data/taiwan_credit_default.csv"),
        schema: repo().join("data/taiwan_schema.toml"),
        customers: 3_000,
        first_step_percent: 10.0,
        min_decisions: 90,
        timeout_secs: 120,
    })
    .await
    .expect("the demo runs through");

    // The backtest flagged v2 before any customer saw it.
    assert!(!outcome.preview.passed);
    assert!(outcome.preview.guardrails.iter().any(|g| g.breached));

    // Rolled out anyway, the live guardrail rolled it back on its own.
    let flawed = &outcome.flawed;
    assert_eq!(
        (flawed.candidate.as_str(), flawed.state.as_str()),
        ("v2", "rolled_back")
    );
    let last = flawed.transitions.last().unwrap();
    assert_eq!(last.actor, "guardrail");
    assert!(last.reason.contains("breached"), "{}", last.reason);
    assert!(flawed.transitions[0].reason.contains("backtest skipped"));

    // The affected customer's history holds v2's withdrawal on the candidate arm.
    let withdrawal = outcome
        .history
        .iter()
        .find(|r| r.decision_id == outcome.decision_id)
        .expect("the traced decision is in the customer's history");
    assert_eq!(withdrawal.version, "v2");
    assert_eq!(withdrawal.arm, pb::Arm::Candidate as i32);
    assert_eq!(withdrawal.granted_limit, 0);
    assert!(withdrawal.current_limit.unwrap() > 0);
    assert!(!withdrawal.reasons.is_empty());
    assert!(
        outcome.history.iter().any(|r| r.version == "v1"),
        "the customer's earlier decision by v1 is missing"
    );
    let replay = &outcome.replay;
    assert!(replay.identical, "{:?}", replay.differences);
    assert_eq!(
        replay.recorded.as_ref().unwrap().decision_id,
        outcome.decision_id
    );

    // Every decision the demo sent is in an intact chain (shadow records would add more).
    assert!(outcome.verify.ok, "{:?}", outcome.verify.first_break);
    assert!(outcome.verify.records >= outcome.sent_at_verify);

    // v2's harm undone: the traced customer among the remediated, nobody left to restore,
    // and the customer's complaint names the remediation.
    let totals = outcome.remediation.totals.unwrap();
    assert_eq!(totals.to_restore, 0);
    assert_eq!(totals.remediated, outcome.remediated.len() as u64);
    let traced = outcome
        .remediation
        .customers
        .iter()
        .find(|h| h.harmful_decision_id == outcome.decision_id)
        .expect("the traced withdrawal is in the remediation");
    assert_eq!(
        (traced.candidate_limit, traced.champion_version.as_str()),
        (0, "v1")
    );
    let complaint = &outcome.complaint;
    assert!(complaint.rolled_back, "{complaint:?}");
    if traced.status == "remediated" {
        assert!(complaint.remediated, "{complaint:?}");
        assert_eq!(
            complaint.remediation.as_ref().unwrap().decision_id,
            traced.remediation_decision_id
        );
    }

    // v3 passed the gate, reached everyone and serves.
    let sound = &outcome.sound;
    assert_eq!(
        (sound.candidate.as_str(), sound.state.as_str()),
        ("v3", "promoted")
    );
    assert!(sound.transitions[0].reason.contains("backtest passed"));
    assert!(sound.backtest.as_ref().is_some_and(|b| b.passed));
    assert_eq!(outcome.serving_after, "v3");

    for report in &outcome.reports {
        let page = std::fs::read_to_string(report).unwrap();
        assert!(page.contains("<svg"), "{} has no chart", report.display());
    }
    // v2's report counts the remediated; the customer's marks the remediation under its row.
    let v2_page = std::fs::read_to_string(&outcome.reports[0]).unwrap();
    assert!(
        v2_page.contains(&format!("{} customers remediated", totals.remediated)),
        "the v2 report does not count the remediated"
    );
    let customer_page = std::fs::read_to_string(&outcome.reports[2]).unwrap();
    if traced.status == "remediated" {
        assert!(customer_page.contains(&format!(
            "Remediation</span> of decision {}",
            outcome.decision_id
        )));
    }
}
