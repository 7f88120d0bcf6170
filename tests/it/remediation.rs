//! Remediation against the real server: the demo's incident end to end. A flawed candidate
//! withdraws limits at 1% and the guardrail rolls it back; the preview lists exactly the
//! customers its decisions lowered (checked with SQL on the view file), re-decided by the
//! champion; apply records a remediation for each one still to restore, whose limit is the
//! champion's own answer on the pre-harm limit; applying again records nothing; the
//! remediations verify, replay, and answer the customer's complaint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use riskserve::grpc::pb;
use riskserve::grpc::pb::rollouts_client::RolloutsClient;
use tonic::Code;

use crate::harness::*;

/// 1% (and, never reached by hand, 100%), rolled back by the guardrails once each arm has 50
/// decisions.
const PLAN: &str = "auto_advance = false\n[[steps]]\nshare_bp = 100\nmin_bake_secs = 0\n\
                    [[steps]]\nshare_bp = 10000\n[guardrails]\nmin_sample = 50\n";

fn remediate(rollout_id: &str) -> pb::RemediateRequest {
    pb::RemediateRequest {
        rollout_id: rollout_id.into(),
        actor: "test".into(),
        ..Default::default()
    }
}

/// The `riskserve` program as an operator runs it against `server`.
async fn riskserve(server: &TestServer, args: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_riskserve"));
    cmd.args(args)
        .args(["--server", &format!("http://{}", server.addr)])
        .env("USER", "ops-tester");
    String::from_utf8(run_ok(cmd).await).unwrap()
}

/// The view file reviewers open, read-only, once it holds `records` rows.
fn view_holding(data: &Path, records: u64) -> rusqlite::Connection {
    let db = rusqlite::Connection::open_with_flags(
        data.join("decisions.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    for _ in 0..200 {
        let n: i64 = db
            .query_row("SELECT COUNT(*) FROM decisions", [], |r| r.get(0))
            .unwrap();
        if n as u64 >= records {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    db
}

/// The candidate decisions that lowered a limit, from the view file reviewers open:
/// harmful decision id → (customer ref, current limit, granted limit). Waits until the view
/// holds every record the chain has.
fn lowered_in_sql(
    data: &Path,
    rollout_id: &str,
    records: u64,
) -> BTreeMap<String, (String, i64, i64)> {
    let db = view_holding(data, records);
    let mut stmt = db
        .prepare(
            "SELECT decision_id, customer_ref, current_limit, granted_limit FROM decisions \
             WHERE rollout_id = ?1 AND arm = 'candidate' AND granted_limit < current_limit",
        )
        .unwrap();
    stmt.query_map([rollout_id], |r| {
        Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?)))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The remediations in the view file reviewers open: harmful decision id → (remediation
/// decision id, pre-harm limit, granted limit, reason), once the view holds `records`.
fn remediations_in_sql(data: &Path, records: u64) -> BTreeMap<String, (String, i64, i64, String)> {
    let db = view_holding(data, records);
    let mut stmt = db
        .prepare(
            "SELECT remediates, decision_id, pre_harm_limit, granted_limit, reason \
             FROM decisions WHERE arm = 'remediation'",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_candidates_harm_is_previewed_restored_once_and_traced() {
    let models = scratch_models();
    flawed_candidate(models.path());
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(riskserve::Config {
        rollout_eval_interval_ms: 20,
        ..config(models.path(), data.path())
    })
    .await;
    let mut rollouts = RolloutsClient::new(server.channel.clone());
    let started = start_rollout(&server, "v9", PLAN).await;

    // While it is open, there is nothing to remediate yet: the candidate still decides.
    let err = run_remediation(&server, remediate(&started.id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(violation_field(&err), "rollout_id");
    assert!(
        err.message().contains(&format!(
            "rollout {} is active: a rollout is remediated only once closed",
            started.id
        )),
        "{}",
        err.message()
    );

    // Traffic, 1,000 customers at a time, until the guardrails roll v9 back.
    let all = customers();
    let mut answers: Vec<(Customer, pb::ScoreResponse)> = Vec::new();
    let status = loop {
        let from = answers.len();
        let batch = score_range(&server, "day", from..from + 1_000).await;
        answers.extend(all[from..].iter().cloned().zip(batch));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = rollouts
            .status(pb::RolloutRef {
                model: MODEL.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if s.state != "active" || answers.len() + 1_000 > all.len() {
            break s;
        }
    };
    assert_eq!(status.state, "rolled_back", "{status:?}");
    assert_eq!(status.transitions.last().unwrap().actor, "guardrail");
    let harmed: Vec<&(Customer, pb::ScoreResponse)> = answers
        .iter()
        .filter(|(c, r)| r.arm == pb::Arm::Candidate as i32 && r.granted_limit < c.limit)
        .collect();
    assert!(harmed.len() >= 5, "v9 lowered {} limits", harmed.len());
    assert!(
        harmed.iter().any(|(_, r)| r.granted_limit == 0),
        "v9 withdrew nobody's limit"
    );

    // A first look records nothing. Of the customers it lists to restore, one's limit
    // service restores them itself (a decision on the limit they had), another's took the
    // candidate's limit, which v1 then holds or lowers further.
    let before = server.records().await;
    let (applied, first) = run_remediation(&server, remediate(&started.id))
        .await
        .unwrap();
    assert!(applied.is_empty());
    assert_eq!(server.records().await, before, "a preview records nothing");
    let open: Vec<&pb::HarmedCustomer> = first
        .customers
        .iter()
        .filter(|h| h.status == "to_restore")
        .collect();
    assert!(open.len() >= 3, "{} to restore", open.len());
    let answer_of = |h: &pb::HarmedCustomer| {
        harmed
            .iter()
            .find(|(_, r)| r.decision_id == h.harmful_decision_id)
            .copied()
            .unwrap()
    };
    // The stuck customer is one whose limit v9 withdrew: v1 multiplies the current limit by
    // its band's factor, so on 0 it always holds 0, and the harm stays the latest change.
    // (One v9 only lowered could be cut further by v1, which would then be the change a
    // complaint is about; which customers come first in the list depends on timing.)
    let stuck_at = open
        .iter()
        .position(|h| answer_of(h).1.granted_limit == 0)
        .expect("v9 withdrew a limit that is to restore");
    let fixed_at = usize::from(stuck_at == 0);
    let (fixed, fixed_harm) = answer_of(open[fixed_at]);
    let restoring = server
        .scoring()
        .score(request(fixed, "fixed-by-hand"))
        .await
        .unwrap()
        .into_inner();
    let (stuck, stuck_harm) = answer_of(open[stuck_at]);
    let mut held = request(stuck, "held-where-v9-left-it");
    held.current_limit = Some(stuck_harm.granted_limit);
    let held = server.scoring().score(held).await.unwrap().into_inner();
    assert!(
        held.granted_limit < open[stuck_at].champion_limit,
        "{held:?}"
    );

    // The preview: exactly the candidate decisions the view file says lowered a limit.
    let (_, preview) = run_remediation(&server, remediate(&started.id))
        .await
        .unwrap();
    let records = server.records().await;
    let sql = {
        let (data, id) = (data.path().to_owned(), started.id.clone());
        tokio::task::spawn_blocking(move || lowered_in_sql(&data, &id, records))
            .await
            .unwrap()
    };
    let listed: BTreeMap<String, (String, i64, i64)> = preview
        .customers
        .iter()
        .map(|h| {
            (
                h.harmful_decision_id.clone(),
                (h.customer_ref.clone(), h.limit_before, h.candidate_limit),
            )
        })
        .collect();
    assert_eq!(listed, sql);
    assert_eq!(listed.len(), harmed.len());
    assert_eq!(
        (
            preview.model.as_str(),
            preview.candidate.as_str(),
            preview.state.as_str(),
            preview.champion.as_str()
        ),
        (MODEL, "v9", "rolled_back", "v1")
    );
    let v1 = Offline::read(&models.path().join(MODEL).join("v1"));
    assert_eq!(preview.champion_digest, v1.digest);
    let by_decision: BTreeMap<&str, &pb::HarmedCustomer> = preview
        .customers
        .iter()
        .map(|h| (h.harmful_decision_id.as_str(), h))
        .collect();
    let of = |r: &pb::ScoreResponse| by_decision[r.decision_id.as_str()];
    let fixed_row = of(fixed_harm);
    assert_eq!(fixed_row.status, "restored", "{fixed_row:?}");
    assert_eq!(fixed_row.restored_by_decision_id, restoring.decision_id);
    assert_eq!(fixed_row.champion_limit, restoring.granted_limit);
    assert_eq!(of(stuck_harm).status, "to_restore");
    for h in &preview.customers {
        assert_eq!(h.candidate_version, "v9");
        assert_eq!(h.champion_version, "v1");
        let want = if h.candidate_limit == 0 {
            "withdrawn"
        } else {
            "cut"
        };
        assert_eq!(h.limit_move, want);
        let expected = match h.champion_limit <= h.candidate_limit {
            true => "champion_agrees",
            false if h.harmful_decision_id == fixed_harm.decision_id => "restored",
            false => "to_restore",
        };
        assert_eq!(h.status, expected, "{h:?}");
    }
    let t = preview.totals.unwrap();
    eprintln!(
        "v9 rolled back after {} customers: {} harmed, {} lowered; {} to restore ({}), {} restored, {} where v1 agrees",
        answers.len(),
        t.customers,
        t.amount_lowered,
        t.to_restore,
        t.amount_to_restore,
        t.restored,
        t.champion_agrees
    );
    let to_restore: Vec<&pb::HarmedCustomer> = preview
        .customers
        .iter()
        .filter(|h| h.status == "to_restore")
        .collect();
    assert!(!to_restore.is_empty());
    assert_eq!(
        (t.customers, t.to_restore, t.restored, t.remediated),
        (harmed.len() as u64, to_restore.len() as u64, 1, 0)
    );
    assert_eq!(
        t.amount_lowered,
        harmed
            .iter()
            .map(|(c, r)| c.limit - r.granted_limit)
            .sum::<i64>()
    );
    assert_eq!(
        t.amount_to_restore,
        to_restore
            .iter()
            .map(|h| h.champion_limit - h.candidate_limit)
            .sum::<i64>()
    );

    // Apply: one remediation per customer still to restore, each streamed once durable.
    let (applied, after) = run_remediation(
        &server,
        pb::RemediateRequest {
            apply: true,
            reason: "v9 withdrew young customers' limits".into(),
            ..remediate(&started.id)
        },
    )
    .await
    .unwrap();
    let applied_ids: BTreeSet<&str> = applied
        .iter()
        .map(|h| h.harmful_decision_id.as_str())
        .collect();
    let expected_ids: BTreeSet<&str> = to_restore
        .iter()
        .map(|h| h.harmful_decision_id.as_str())
        .collect();
    assert_eq!(applied_ids, expected_ids);
    let t = after.totals.unwrap();
    assert_eq!((t.to_restore, t.remediated), (0, applied.len() as u64));
    assert_eq!(server.records().await, records + applied.len() as u64);
    // Reviewers' SQL sees each remediation with its link, pre-harm limit and reason.
    let in_sql = {
        let (data, n) = (data.path().to_owned(), records + applied.len() as u64);
        tokio::task::spawn_blocking(move || remediations_in_sql(&data, n))
            .await
            .unwrap()
    };
    let want: BTreeMap<String, (String, i64, i64, String)> = applied
        .iter()
        .map(|h| {
            (
                h.harmful_decision_id.clone(),
                (
                    h.remediation_decision_id.clone(),
                    h.limit_before,
                    h.champion_limit,
                    "v9 withdrew young customers' limits".to_string(),
                ),
            )
        })
        .collect();
    assert_eq!(in_sql, want);

    // Each remediation is the champion's own answer for the same customer on the limit they
    // had: what v1 grants them now on that limit, through Score.
    let customer_of: BTreeMap<&str, &Customer> = answers
        .iter()
        .map(|(c, r)| (r.decision_id.as_str(), c))
        .collect();
    let mut trace = server.trace();
    for h in &applied {
        assert_eq!(h.status, "remediated");
        let record = trace
            .get_decision(pb::DecisionRef {
                decision_id: h.remediation_decision_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(record.arm, pb::Arm::Remediation as i32);
        assert_eq!(
            (record.version.as_str(), record.digest.as_str()),
            ("v1", v1.digest.as_str())
        );
        assert_eq!(record.rollout_id, started.id);
        assert_eq!(record.remediates, h.harmful_decision_id);
        assert_eq!(record.current_limit, Some(h.candidate_limit));
        assert_eq!(record.pre_harm_limit, Some(h.limit_before));
        assert_eq!(record.granted_limit, h.champion_limit);
        assert_eq!(
            (record.caller.as_str(), record.reason.as_str()),
            ("test", "v9 withdrew young customers' limits")
        );
        assert_eq!(
            record.request_id,
            format!("remediate:{}:{}", started.id, h.harmful_decision_id)
        );
        let features: BTreeMap<String, f64> = record.features.clone().into_iter().collect();
        assert!((record.probability_of_default - v1.pd(&features)).abs() < 1e-12);
        // v1's own answer through Score on the limit before: a recorded decision, and one
        // that changes the limit unless v1 holds it, so not for the stuck customer, whose
        // complaint below must still be about v9's harm.
        if h.harmful_decision_id != stuck_harm.decision_id {
            let customer = customer_of[h.harmful_decision_id.as_str()];
            let now = server
                .scoring()
                .score(request(
                    customer,
                    &format!("check-{}", h.harmful_decision_id),
                ))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                (now.version.as_str(), now.arm),
                ("v1", pb::Arm::Champion as i32)
            );
            assert_eq!(now.granted_limit, record.granted_limit, "{customer:?}");
            assert_eq!(now.current_limit, Some(h.limit_before));
        }

        let replay = trace
            .replay(pb::DecisionRef {
                decision_id: h.remediation_decision_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(replay.identical, "{:?}", replay.differences);
        let explained = trace
            .explain(pb::DecisionRef {
                decision_id: h.remediation_decision_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            explained.previous.unwrap().decision_id,
            if h.harmful_decision_id == stuck_harm.decision_id {
                held.decision_id.clone()
            } else {
                h.harmful_decision_id.clone()
            }
        );
        // A remediation restores: it needs no adverse-action notice.
        let n = trace
            .notice(pb::DecisionRef {
                decision_id: h.remediation_decision_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!n.required, "{n:?}");
    }
    let records = server.records().await;

    // Applying again records nothing new: the command line says so, and the chain agrees.
    let again = riskserve(
        &server,
        &[
            "remediate",
            &started.id,
            "--apply",
            "--reason",
            "again",
            "--json",
        ],
    )
    .await;
    let again: serde_json::Value = serde_json::from_str(again.trim()).unwrap();
    assert_eq!(again["applied_now"], serde_json::json!([]));
    assert_eq!(again["totals"]["remediated"], applied.len());
    assert_eq!(again["totals"]["to_restore"], 0);
    assert_eq!(server.records().await, records);

    // The applied set, later, as the limit-management team takes it.
    let csv = data.path().join("applied.csv");
    let table = riskserve(
        &server,
        &[
            "remediate",
            &started.id,
            "--applied",
            "--csv",
            csv.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        table.contains(&format!(
            "rollout {}: credit-limit v9 (rolled_back), re-decided by v1",
            started.id
        )),
        "{table}"
    );
    let mut rows = csv::Reader::from_path(&csv).unwrap();
    assert_eq!(
        rows.headers().unwrap().iter().collect::<Vec<_>>(),
        [
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
            "remediation_decision_id"
        ]
    );
    let in_csv: BTreeSet<String> = rows
        .records()
        .map(|r| {
            let r = r.unwrap();
            assert_eq!(&r[10], "remediated");
            r[1].to_string()
        })
        .collect();
    assert_eq!(
        in_csv,
        applied_ids
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );

    // The stuck customer's complaint and history now show the harm and its remediation.
    let remedy = applied
        .iter()
        .find(|h| h.harmful_decision_id == stuck_harm.decision_id)
        .unwrap();
    let c = trace
        .complaint(pb::CustomerRef {
            customer_id: stuck.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(c.rolled_back && c.remediated, "{c:?}");
    assert_eq!(
        c.change.unwrap().decision.unwrap().decision_id,
        stuck_harm.decision_id
    );
    assert_eq!(
        c.remediation.unwrap().decision_id,
        remedy.remediation_decision_id
    );
    let said = riskserve(&server, &["trace", "complaint", &stuck.id]).await;
    assert!(
        said.contains(&format!(
            "remediated   yes: decision {}",
            remedy.remediation_decision_id
        )),
        "{said}"
    );
    let history = riskserve(&server, &["trace", "customer", &stuck.id]).await;
    assert!(
        history.contains(&format!(
            "← remediation by v1 of {} (v9 candidate: {} → {}",
            stuck_harm.decision_id, stuck.limit, stuck_harm.granted_limit
        )),
        "{history}"
    );
    let record = riskserve(
        &server,
        &["trace", "decision", &remedy.remediation_decision_id],
    )
    .await;
    assert!(
        record.contains(&format!(
            "remediates    {} (decided on the limit before it, {}; applied by test: v9 withdrew young customers' limits)",
            stuck_harm.decision_id, stuck.limit
        )),
        "{record}"
    );
    assert!(record.contains("arm           remediation"), "{record}");
    let verify = riskserve(&server, &["trace", "verify"]).await;
    assert!(verify.starts_with("chain intact: "), "{verify}");

    // The rollout's history counts the remediated customers.
    let history = rollouts
        .history(pb::RolloutHistoryRequest {
            id: started.id.clone(),
            model: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let remediation = history
        .arms
        .iter()
        .find(|a| a.arm == pb::Arm::Remediation as i32)
        .expect("a remediation arm in the rollout's history");
    let summary = remediation.summary.as_ref().unwrap();
    assert_eq!(
        (summary.version.as_str(), summary.decisions),
        ("v1", applied.len() as u64)
    );
    let served: u64 = history
        .arms
        .iter()
        .filter(|a| a.arm != pb::Arm::Remediation as i32)
        .map(|a| a.summary.as_ref().unwrap().decisions)
        .sum();
    assert_eq!(
        history
            .traffic
            .iter()
            .map(|t| t.champion + t.candidate + t.shadow)
            .sum::<u64>(),
        served,
        "remediations are not the rollout's traffic"
    );
    server.stop().await.unwrap();
}

/// Each bad request is refused with the field and the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_remediation_request_names_its_field() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let refused = |request: pb::RemediateRequest| {
        let server = &server;
        async move { run_remediation(server, request).await.unwrap_err() }
    };
    let err = refused(remediate("")).await;
    assert_eq!(
        (err.code(), violation_field(&err).as_str(), err.message()),
        (
            Code::InvalidArgument,
            "rollout_id",
            "rollout_id: is required"
        )
    );
    let unknown = "01930000-0000-7000-8000-000000000000";
    let err = refused(remediate(unknown)).await;
    assert_eq!(
        (err.code(), violation_field(&err)),
        (Code::NotFound, "rollout_id".to_string())
    );
    assert_eq!(err.message(), format!("no rollout has the id {unknown}"));
    let err = refused(pb::RemediateRequest {
        reason: "why".into(),
        ..remediate(unknown)
    })
    .await;
    assert_eq!(
        (err.code(), violation_field(&err)),
        (Code::InvalidArgument, "reason".to_string())
    );

    // A closed rollout to ask about, then a version that does not exist to re-decide with.
    let started = start_rollout(&server, "v2", PLAN).await;
    RolloutsClient::new(server.channel.clone())
        .rollback(pb::RolloutRef {
            model: MODEL.into(),
            actor: "test".into(),
            reason: "by hand".into(),
        })
        .await
        .unwrap();
    let err = refused(pb::RemediateRequest {
        with_version: "v77".into(),
        ..remediate(&started.id)
    })
    .await;
    assert_eq!(
        (err.code(), violation_field(&err)),
        (Code::NotFound, "with_version".to_string())
    );
    assert!(
        err.message().starts_with("with_version: "),
        "{}",
        err.message()
    );
    // Nothing was decided by v2: nothing to remediate, and the totals say so.
    let (_, summary) = run_remediation(&server, remediate(&started.id))
        .await
        .unwrap();
    assert_eq!(summary.customers.len(), 0);
    assert_eq!(summary.totals.unwrap().customers, 0);
    server.stop().await.unwrap();
}
