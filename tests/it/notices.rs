//! Adverse-action notices and complaints against the real server: a notice states the
//! recorded principal reasons, in order, at most four, in the words of the deciding version's
//! reason-code table (or the default words for a version without one); a favourable decision
//! needs none; a complaint traces a customer's latest limit change to a rolled-back candidate.

use std::path::Path;

use riskserve::grpc::pb;
use riskserve::grpc::pb::rollouts_client::RolloutsClient;
use riskserve::reason_codes::ReasonCodes;
use tonic::Code;

use crate::harness::*;

/// Copies v1 as `version` with a reason-code table of its own words ("Edited: …", codes
/// "C01"…), listed in the manifest, and seals it; returns the table.
fn v1_with_table(models: &Path, version: &str) -> ReasonCodes {
    let dir = models.join(MODEL).join(version);
    copy_bundle(
        &models.join(MODEL).join("v1"),
        &dir,
        ("version = \"v1\"", &format!("version = \"{version}\"")),
    );
    let features = schema_features();
    let names: Vec<&str> = features.iter().map(String::as_str).collect();
    let mut table = ReasonCodes::default_for(&names);
    for (i, r) in table.reasons.iter_mut().enumerate() {
        r.code = format!("C{:02}", i + 1);
        r.text = format!("Edited: {}", r.text);
    }
    let manifest = std::fs::read_to_string(dir.join("manifest.toml")).unwrap();
    let at = manifest.find("trainer = ").unwrap();
    let end = at + manifest[at..].find('\n').unwrap() + 1;
    std::fs::write(
        dir.join("manifest.toml"),
        format!(
            "{}reason_codes = \"reason_codes.toml\"\n{}",
            &manifest[..end],
            &manifest[end..]
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("reason_codes.toml"),
        toml::to_string_pretty(&table).unwrap(),
    )
    .unwrap();
    riskserve::bundle::seal(&dir).unwrap();
    table
}

/// Scores customers [0, n); each answer with the customer it was for.
async fn score(server: &TestServer, tag: &str, n: usize) -> Vec<(Customer, pb::ScoreResponse)> {
    let answers = record_traffic(server, tag, n).await;
    customers().iter().cloned().zip(answers).collect()
}

/// Runs the `riskserve` program (off the runtime, which serves it) and returns its stdout.
async fn riskserve<const N: usize>(args: [&str; N]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_riskserve"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

async fn notice(server: &TestServer, decision_id: &str) -> pb::AdverseActionNotice {
    server
        .trace()
        .notice(pb::DecisionRef {
            decision_id: decision_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The notice's reasons are the record's positive ones, in order, at most four, each with
/// the table's code and words (or, without a table, the default words and no code), and the
/// text states them in that order.
fn assert_states_the_recorded_reasons(n: &pb::AdverseActionNotice, table: Option<&ReasonCodes>) {
    let record = n.decision.as_ref().unwrap();
    let expected: Vec<&pb::Reason> = record
        .reasons
        .iter()
        .filter(|r| r.contribution > 0.0)
        .take(4)
        .collect();
    assert!(!expected.is_empty(), "{record:?}");
    assert!(n.reasons.len() <= 4);
    assert_eq!(n.reasons.len(), expected.len(), "{n:?}");
    let defaults = ReasonCodes::default_for(
        &record
            .reasons
            .iter()
            .map(|r| r.feature.as_str())
            .collect::<Vec<_>>(),
    );
    let mut at = 0;
    for (i, (got, want)) in n.reasons.iter().zip(&expected).enumerate() {
        assert_eq!(got.rank as usize, i + 1);
        assert_eq!(got.feature, want.feature);
        assert_eq!(got.contribution.to_bits(), want.contribution.to_bits());
        assert_eq!(got.value.to_bits(), want.value.to_bits());
        if i > 0 {
            assert!(got.contribution <= n.reasons[i - 1].contribution);
        }
        let (code, text) = match table {
            Some(t) => {
                let e = t.get(&got.feature).unwrap();
                (e.code.as_str(), e.text.as_str())
            }
            None => ("", defaults.get(&got.feature).unwrap().text.as_str()),
        };
        assert_eq!((got.code.as_str(), got.text.as_str()), (code, text));
        let line = format!("  {}. {text}\n", i + 1);
        at += n.text[at..]
            .find(&line)
            .unwrap_or_else(|| panic!("{line:?} (in order) in {}", n.text));
    }
    assert!(
        n.text
            .contains(&format!("credit-limit version {}", record.version)),
        "{}",
        n.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_states_the_principal_reasons_in_the_deciding_versions_words() {
    let models = scratch_models();
    let table = v1_with_table(models.path(), "v5");
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(riskserve::Config {
        serving: [(MODEL.to_string(), "v5".to_string())].into(),
        ..config(models.path(), data.path())
    })
    .await;
    let answers = score(&server, "v5", 3_000).await;
    let pick = |f: &dyn Fn(i64, i64) -> bool| {
        answers
            .iter()
            .filter(|(c, r)| f(c.limit, r.granted_limit))
            .map(|(c, r)| (c.clone(), r.clone()))
            .collect::<Vec<_>>()
    };
    let withdrawn = pick(&|current, granted| current > 0 && granted == 0);
    let cut = pick(&|current, granted| granted > 0 && granted < current);
    let raised = pick(&|current, granted| granted > current);
    assert!(
        withdrawn.len() >= 10 && !cut.is_empty() && !raised.is_empty(),
        "{} withdrawn, {} cut, {} raised",
        withdrawn.len(),
        cut.len(),
        raised.len()
    );

    let mut most = 0;
    for (c, r) in withdrawn.iter().take(20) {
        let n = notice(&server, &r.decision_id).await;
        assert!(n.required, "{n:?}");
        assert_eq!(n.action, pb::AdverseAction::Withdrawal as i32);
        assert_eq!(n.wording, "bundle");
        assert_states_the_recorded_reasons(&n, Some(&table));
        assert!(
            n.text.contains(&format!(
                "we withdrew your credit limit of {}. Your limit is now 0.",
                riskserve::notice::amount(c.limit)
            )),
            "{}",
            n.text
        );
        most = most.max(n.reasons.len());
    }
    assert_eq!(most, 4, "no withdrawal had four reasons to state");

    let (c, r) = &cut[0];
    let n = notice(&server, &r.decision_id).await;
    assert_eq!(n.action, pb::AdverseAction::Cut as i32);
    assert_states_the_recorded_reasons(&n, Some(&table));
    assert!(n.text.contains(&format!(
        "we reduced your credit limit from {} to {}.",
        riskserve::notice::amount(c.limit),
        riskserve::notice::amount(r.granted_limit)
    )));

    // A raise needs no notice, and says why.
    let n = notice(&server, &raised[0].1.decision_id).await;
    assert!(
        !n.required && n.text.is_empty() && n.reasons.is_empty(),
        "{n:?}"
    );
    assert_eq!(n.action, pb::AdverseAction::Unspecified as i32);
    assert!(
        n.not_needed.contains("limit raised from"),
        "{}",
        n.not_needed
    );
    assert!(
        n.not_needed.contains("no notice is needed"),
        "{}",
        n.not_needed
    );

    // A new applicant declined: the same customer with no current limit.
    let mut applicant = request(&withdrawn[0].0, "applicant");
    applicant.current_limit = None;
    let declined = server
        .scoring()
        .score(applicant)
        .await
        .unwrap()
        .into_inner();
    let n = notice(&server, &declined.decision_id).await;
    assert_eq!(n.action, pb::AdverseAction::Decline as i32, "{n:?}");
    assert!(n.text.contains("we declined your application for credit."));
    assert_states_the_recorded_reasons(&n, Some(&table));

    // v1 has no table: the default words, no codes, and the notice says whose they are.
    server
        .models()
        .serve_version(pb::VersionRef {
            model: MODEL.into(),
            version: "v1".into(),
        })
        .await
        .unwrap();
    let on_v1 = server
        .scoring()
        .score(request(&withdrawn[0].0, "on-v1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((on_v1.version.as_str(), on_v1.granted_limit), ("v1", 0));
    let n = notice(&server, &on_v1.decision_id).await;
    assert_eq!(n.wording, "default");
    assert_states_the_recorded_reasons(&n, None);

    // Unknown and malformed ids.
    let unknown = "01930000-0000-7000-8000-000000000000";
    let err = server
        .trace()
        .notice(pb::DecisionRef {
            decision_id: unknown.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), format!("no decision {unknown} in the log"));
    let err = server
        .trace()
        .notice(pb::DecisionRef {
            decision_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violation_field(&err), "decision_id");
    server.stop().await.unwrap();
}

/// The flawed v9 at 100% (no guardrail can judge with no champion traffic), rolled back by
/// hand: a customer whose limit v9 withdrew asks why, and the complaint names v9, the
/// candidate arm, the rollback and its reason, with the notice; a customer whose latest
/// change was the champion's raise gets no rollback and no notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complaint_traces_the_latest_change_to_a_rolled_back_candidate() {
    let models = scratch_models();
    flawed_candidate(models.path());
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models.path(), data.path()).await;
    let day_one = score(&server, "day1", 1_000).await;

    let mut rollouts = RolloutsClient::new(server.channel.clone());
    let started = start_rollout(
        &server,
        "v9",
        "auto_advance = false\n[[steps]]\nshare_bp = 10000\nmin_bake_secs = 0\n",
    )
    .await;
    let on_v9 = score(&server, "v9", 300).await;
    let (harmed, by_v9) = on_v9
        .iter()
        .find(|(c, r)| c.limit > 0 && r.granted_limit == 0 && r.version == "v9")
        .expect("v9 withdrew someone's limit");
    assert_eq!(by_v9.arm, pb::Arm::Candidate as i32);
    let rolled = rollouts
        .rollback(pb::RolloutRef {
            model: MODEL.into(),
            actor: "test".into(),
            reason: "young customers' limits withdrawn".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rolled.state, "rolled_back");

    let complaint = |id: String| {
        let mut trace = server.trace();
        async move {
            trace
                .complaint(pb::CustomerRef { customer_id: id })
                .await
                .map(|r| r.into_inner())
        }
    };
    let c = complaint(harmed.id.clone()).await.unwrap();
    assert_eq!(c.decisions, 2, "day one's and v9's");
    let change = c.change.as_ref().unwrap();
    let d = change.decision.as_ref().unwrap();
    assert_eq!(
        (d.decision_id.as_str(), d.version.as_str(), d.arm),
        (by_v9.decision_id.as_str(), "v9", pb::Arm::Candidate as i32)
    );
    assert!(c.rolled_back, "{c:?}");
    assert_eq!(
        (c.rollout_id.as_str(), c.rollout_state.as_str()),
        (started.id.as_str(), "rolled_back")
    );
    let rollback = c.rollback.as_ref().unwrap();
    assert_eq!(
        (rollback.actor.as_str(), rollback.reason.as_str()),
        ("test", "young customers' limits withdrawn")
    );
    assert!(!c.remediated && c.remediation.is_none());
    assert_eq!(change.action, pb::AdverseAction::Withdrawal as i32);
    assert_states_the_recorded_reasons(change, None);

    // The command line a support agent uses says the same.
    let addr = format!("http://{}", server.addr);
    let said = riskserve(["trace", "complaint", &harmed.id, "--server", &addr]).await;
    for needle in [
        "by credit-limit v9 (candidate)",
        "rolled back  YES: v9 was rolled back",
        "young customers' limits withdrawn",
        "remediated   no",
        "we withdrew your credit limit of",
    ] {
        assert!(said.contains(needle), "{needle:?} in {said}");
    }
    let json = riskserve([
        "trace",
        "notice",
        &by_v9.decision_id,
        "--json",
        "--server",
        &addr,
    ])
    .await;
    let json: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(json["action"], "withdrawal");
    assert_eq!(json["version"], "v9");
    assert_eq!(json["reasons"][0]["feature"], change.reasons[0].feature);
    assert_eq!(json["text"], change.text);

    // A customer v1 raised on day one, not routed to v9: the champion's raise, no notice.
    let v9_customers: std::collections::BTreeSet<&str> =
        on_v9.iter().map(|(c, _)| c.id.as_str()).collect();
    let (lucky, raised) = day_one
        .iter()
        .find(|(c, r)| r.granted_limit > c.limit && !v9_customers.contains(c.id.as_str()))
        .expect("v1 raised someone");
    let c = complaint(lucky.id.clone()).await.unwrap();
    let change = c.change.unwrap();
    assert_eq!(change.decision.unwrap().decision_id, raised.decision_id);
    assert!(!c.rolled_back && c.rollout_id.is_empty() && c.rollback.is_none());
    assert!(!change.required);

    // Nobody by that id: NOT_FOUND, and the id is not echoed (statuses reach logs).
    let err = complaint("no-such-customer".into()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.message(),
        "no decisions are recorded for this customer under any configured key"
    );
    server.stop().await.unwrap();
}

/// A table is part of the bundle: refused at load when it does not fit the model (naming the
/// entry), when the manifest does not list it, or when the manifest lists one that is not
/// there; v1, without one, loads with its shipped digest.
#[test]
fn a_reason_code_table_that_does_not_fit_its_bundle_is_refused_at_load() {
    let models = scratch_models();
    v1_with_table(models.path(), "v5");
    let good = models.path().join(MODEL).join("v5");
    let loaded = riskserve::bundle::Bundle::load(&good, None).unwrap();
    assert_eq!(loaded.reason_codes.unwrap().get("AGE").unwrap().code, "C03");
    let v1 = riskserve::bundle::Bundle::load(&repo().join("models/credit-limit/v1"), None).unwrap();
    assert!(v1.reason_codes.is_none());
    assert_eq!(
        v1.digest.to_string(),
        std::fs::read_to_string(repo().join("models/credit-limit/v1/bundle.sha256"))
            .unwrap()
            .trim()
    );

    let refused = |name: &str, edit: &dyn Fn(&Path)| {
        let dir = models.path().join(MODEL).join(name);
        copy_dir(&good, &dir);
        edit(&dir);
        riskserve::bundle::seal(&dir).unwrap();
        riskserve::bundle::Bundle::load(&dir, None)
            .unwrap_err()
            .to_string()
    };
    let rewrite = |dir: &Path, file: &str, from: &str, to: &str| {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(text.contains(from), "{from:?} in {file}");
        std::fs::write(dir.join(file), text.replacen(from, to, 1)).unwrap();
    };
    let err = refused("unknown", &|d| {
        rewrite(d, "reason_codes.toml", "\"AGE\"", "\"SEX\"")
    });
    assert_eq!(
        err,
        "reason_codes.toml: reason 3: feature \"SEX\" is not a feature of the model"
    );
    let err = refused("empty", &|d| {
        rewrite(
            d,
            "reason_codes.toml",
            "text = \"Edited: Your age\"",
            "text = \"\"",
        )
    });
    assert_eq!(
        err,
        "reason_codes.toml: reason 3 (feature \"AGE\"): text is empty"
    );
    let err = refused("unlisted", &|d| {
        rewrite(
            d,
            "manifest.toml",
            "reason_codes = \"reason_codes.toml\"\n",
            "",
        )
    });
    assert!(err.contains("the manifest does not list it"), "{err}");
    let err = refused("missing", &|d| {
        std::fs::remove_file(d.join("reason_codes.toml")).unwrap()
    });
    assert_eq!(err, "bundle is incomplete: reason_codes.toml is missing");
}

/// `import --reason-codes` puts the table in the imported bundle, checked against the model
/// file's features; one that misses a feature is refused and nothing is written.
#[test]
fn an_import_takes_a_reason_code_table_for_the_model_files_features() {
    let models = tempfile::tempdir().unwrap();
    let fixtures = repo().join("tests/fixtures/trees");
    let schema: toml::Value =
        toml::from_str(&std::fs::read_to_string(fixtures.join("schema.toml")).unwrap()).unwrap();
    let names: Vec<String> = schema["feature"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    let mut table = ReasonCodes::default_for(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let file = models.path().join("codes.toml");
    std::fs::write(&file, toml::to_string_pretty(&table).unwrap()).unwrap();
    let spec = |version: &str| riskserve::import::ImportSpec {
        format: riskserve::bundle::SourceFormat::Xgboost,
        file: fixtures.join("xgboost.json"),
        model: MODEL.into(),
        version: version.into(),
        schema: Some(fixtures.join("schema.toml")),
        policy: None,
        data: None,
        label: None,
        models_dir: models.path().to_owned(),
        created_at: "2026-12-02T00:00:00Z".into(),
        reason_codes: Some(file.clone()),
    };
    let report = riskserve::import::import(&spec("v3")).unwrap();
    assert_eq!(
        report.manifest.reason_codes.as_deref(),
        Some("reason_codes.toml")
    );
    let bundle = riskserve::bundle::Bundle::load(&report.dir, None).unwrap();
    assert_eq!(bundle.reason_codes.as_ref(), Some(&table));

    let missing = table.reasons.pop().unwrap().feature;
    std::fs::write(&file, toml::to_string_pretty(&table).unwrap()).unwrap();
    let err = riskserve::import::import(&spec("v4"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("reason codes: ")
            && err.ends_with(&format!(
                "feature \"{missing}\" of the model has no reason (every feature needs words)"
            )),
        "{err}"
    );
    assert!(!models.path().join(MODEL).join("v4").exists());
}
