//! Score and ScoreBatch against a real server: a known customer end to end, every validation
//! rule with its code and field, and batches whose items fail on their own.

use crate::harness::*;
use riskserve::grpc::pb;
use tonic::Code;

fn shipped_v1() -> std::path::PathBuf {
    repo().join("models/credit-limit/v1")
}

#[tokio::test]
async fn a_known_taiwan_row_is_scored_with_every_field_filled() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    let customer = &customers()[0];
    let response = server
        .scoring()
        .score(request(customer, "known-row-1"))
        .await
        .expect("score")
        .into_inner();

    let offline = Offline::read(&shipped_v1());
    let id = uuid::Uuid::parse_str(&response.decision_id).expect("decision id is a UUID");
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(response.request_id, "known-row-1");
    assert_eq!(
        (response.model.as_str(), response.version.as_str()),
        (MODEL, "v1")
    );
    assert_eq!(response.digest, offline.digest);
    let expected_pd = offline.pd(&customer.values);
    assert!(
        (response.probability_of_default - expected_pd).abs() < 1e-12,
        "served {} offline {expected_pd}",
        response.probability_of_default
    );
    assert!(!response.grade.is_empty());
    assert_ne!(response.decision, pb::Decision::Unspecified as i32);
    assert_eq!(response.current_limit, Some(customer.limit));
    assert_eq!(response.arm, pb::Arm::Champion as i32);

    // Reasons: the largest positive contributions, largest first, at most four, each equal to
    // the bundle's own term.
    let mut expected: Vec<(String, f64)> = offline
        .contributions(&customer.values)
        .into_iter()
        .filter(|(_, c)| *c > 0.0)
        .collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1));
    expected.truncate(4);
    assert!(!response.reasons.is_empty());
    assert_eq!(response.reasons.len(), expected.len());
    for (got, (name, contribution)) in response.reasons.iter().zip(&expected) {
        assert_eq!(&got.feature, name);
        assert!((got.contribution - contribution).abs() < 1e-12);
        assert_eq!(got.value, customer.values[name]);
    }
    assert!(
        response
            .reasons
            .windows(2)
            .all(|w| w[0].contribution >= w[1].contribution)
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn granted_limits_follow_the_policy_bands() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(shipped_v1().join("manifest.toml")).unwrap())
            .unwrap();
    let bands = manifest["policy"]["band"].as_array().unwrap().clone();
    let mut client = server.scoring();
    let mut grades_seen = std::collections::BTreeSet::new();
    for (i, c) in customers().iter().take(300).enumerate() {
        let r = client
            .score(request(c, &format!("policy-{i}")))
            .await
            .unwrap()
            .into_inner();
        let band = bands
            .iter()
            .find(|b| b["grade"].as_str() == Some(&r.grade))
            .expect("grade is a band of the manifest");
        let (lo, hi) = (
            band["pd_min"].as_float().unwrap(),
            band["pd_max"].as_float().unwrap(),
        );
        assert!(r.probability_of_default >= lo && (r.probability_of_default < hi || hi == 1.0));
        let factor = band["limit_factor"].as_float().unwrap();
        let unit = manifest["policy"]["limit_rounding"].as_integer().unwrap() as f64;
        let cap = manifest["policy"]["limit_cap"].as_integer().unwrap() as f64;
        let expected = (((c.limit as f64 * factor) / unit).round() * unit).min(cap);
        assert_eq!(r.granted_limit, expected as i64, "customer {}", c.id);
        grades_seen.insert(r.grade);
    }
    assert!(grades_seen.len() >= 3, "only grades {grades_seen:?}");

    // A new customer (no current limit) gets the band's starting limit.
    let mut req = request(&customers()[5], "policy-new");
    req.current_limit = None;
    let r = client.score(req).await.unwrap().into_inner();
    let band = bands
        .iter()
        .find(|b| b["grade"].as_str() == Some(&r.grade))
        .unwrap();
    assert_eq!(
        r.granted_limit,
        band["starting_limit"].as_integer().unwrap()
    );
    server.stop().await.unwrap();
}

/// One bad request per rule, each answered with its code and naming the field.
#[tokio::test]
async fn every_validation_rule_is_answered_with_its_code_and_field() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    let base = request(&customers()[0], "validation");
    let with = |f: &dyn Fn(&mut pb::ScoreRequest)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    let set = |name: &'static str, kind: pb::feature_value::Kind| {
        move |r: &mut pb::ScoreRequest| {
            r.features.insert(
                name.into(),
                pb::FeatureValue {
                    kind: Some(kind.clone()),
                },
            );
        }
    };
    use pb::feature_value::Kind;
    let cases: Vec<(&str, pb::ScoreRequest, Code, &str, &str)> = vec![
        (
            "unknown model",
            with(&|r| r.model = "no-such-model".into()),
            Code::NotFound,
            "",
            "no-such-model",
        ),
        (
            "missing model",
            with(&|r| r.model.clear()),
            Code::InvalidArgument,
            "model",
            "required",
        ),
        (
            "missing request id",
            with(&|r| r.request_id.clear()),
            Code::InvalidArgument,
            "request_id",
            "required",
        ),
        (
            "missing customer",
            with(&|r| r.customer_id.clear()),
            Code::InvalidArgument,
            "customer_id",
            "required",
        ),
        (
            "overlong customer",
            with(&|r| r.customer_id = "x".repeat(129)),
            Code::InvalidArgument,
            "customer_id",
            "128",
        ),
        (
            "negative limit",
            with(&|r| r.current_limit = Some(-1)),
            Code::InvalidArgument,
            "current_limit",
            "≥ 0",
        ),
        (
            "missing required feature",
            with(&|r| {
                r.features.remove("AGE");
            }),
            Code::InvalidArgument,
            "features.AGE",
            "required but missing",
        ),
        (
            "unknown feature",
            with(&set("SHOE_SIZE", Kind::Number(42.0))),
            Code::InvalidArgument,
            "features.SHOE_SIZE",
            "not in the model's schema",
        ),
        (
            "prohibited feature is unknown",
            with(&set("SEX", Kind::Integer(1))),
            Code::InvalidArgument,
            "features.SEX",
            "not in the model's schema",
        ),
        (
            "NaN",
            with(&set("BILL_AMT1", Kind::Number(f64::NAN))),
            Code::InvalidArgument,
            "features.BILL_AMT1",
            "finite",
        ),
        (
            "infinity",
            with(&set("PAID_AMT2", Kind::Number(f64::INFINITY))),
            Code::InvalidArgument,
            "features.PAID_AMT2",
            "finite",
        ),
        (
            "below range",
            with(&set("AGE", Kind::Integer(12))),
            Code::InvalidArgument,
            "features.AGE",
            "outside the valid range [18, 120]",
        ),
        (
            "above range",
            with(&set("PAYMENTDELAY_1", Kind::Number(10.0))),
            Code::InvalidArgument,
            "features.PAYMENTDELAY_1",
            "outside the valid range",
        ),
        (
            "text for a number",
            with(&set("AGE", Kind::Text("thirty".into()))),
            Code::InvalidArgument,
            "features.AGE",
            "must be an integer, got text",
        ),
        (
            "flag for a number",
            with(&set("BILL_AMT3", Kind::Flag(true))),
            Code::InvalidArgument,
            "features.BILL_AMT3",
            "must be a number, got flag",
        ),
        (
            "fraction for an integer",
            with(&set("EDUCATION", Kind::Number(1.5))),
            Code::InvalidArgument,
            "features.EDUCATION",
            "must be an integer",
        ),
        (
            "no value",
            with(&|r| {
                r.features
                    .insert("AGE".into(), pb::FeatureValue { kind: None });
            }),
            Code::InvalidArgument,
            "features.AGE",
            "got no value",
        ),
    ];
    let mut client = server.scoring();
    for (name, req, code, field, rule) in cases {
        let status = client.score(req).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {}", status.message());
        assert!(
            status.message().contains(rule),
            "{name}: {}",
            status.message()
        );
        if !field.is_empty() {
            let short = field.trim_start_matches("features.");
            assert!(
                status.message().contains(short),
                "{name}: {}",
                status.message()
            );
            assert_eq!(violation_field(&status), field, "{name}");
        }
    }
    // The server still answers good requests after all that.
    client.score(base).await.expect("good request still scores");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_missing_feature_with_an_impute_rule_is_scored_with_the_imputed_value() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    let customer = &customers()[3];
    let mut req = request(customer, "impute");
    req.features.remove("PAID_AMT1");
    let r = server.scoring().score(req).await.unwrap().into_inner();
    let mut values = customer.values.clone();
    values.insert("PAID_AMT1".into(), 0.0); // the schema's impute value
    let offline = Offline::read(&shipped_v1());
    assert!((r.probability_of_default - offline.pd(&values)).abs() < 1e-12);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn batch_items_succeed_or_fail_on_their_own() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    let mut bad = request(&customers()[1], "batch-bad");
    bad.features.remove("AGE");
    let mut unknown_model = request(&customers()[2], "batch-model");
    unknown_model.model = "nope".into();
    let requests = vec![
        request(&customers()[0], "batch-0"),
        bad,
        unknown_model,
        request(&customers()[3], "batch-3"),
    ];
    let items = server
        .scoring()
        .score_batch(pb::ScoreBatchRequest { requests })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(items.len(), 4);
    use pb::score_batch_item::Outcome;
    let offline = Offline::read(&shipped_v1());
    match &items[0].outcome {
        Some(Outcome::Response(r)) => {
            assert_eq!(r.request_id, "batch-0");
            assert!((r.probability_of_default - offline.pd(&customers()[0].values)).abs() < 1e-12);
        }
        other => panic!("item 0: {other:?}"),
    }
    match &items[1].outcome {
        Some(Outcome::Error(e)) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert_eq!(e.field, "features.AGE");
        }
        other => panic!("item 1: {other:?}"),
    }
    match &items[2].outcome {
        Some(Outcome::Error(e)) => assert_eq!(e.code, Code::NotFound as i32),
        other => panic!("item 2: {other:?}"),
    }
    assert!(matches!(&items[3].outcome, Some(Outcome::Response(r)) if r.request_id == "batch-3"));

    // A batch over the limit is refused whole.
    let requests = (0..1001)
        .map(|i| request(&customers()[0], &format!("big-{i}")))
        .collect();
    let status = server
        .scoring()
        .score_batch(pb::ScoreBatchRequest { requests })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("at most 1000"));
    server.stop().await.unwrap();
}
