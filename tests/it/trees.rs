//! Imported tree ensembles on the real server: XGBoost's and LightGBM's own model files
//! (tests/fixtures/trees, made by make.py with the real libraries) imported with `riskserve
//! import`, scored over Score and the inference protocol for 300 held-out rows with missing
//! values, and compared with what the libraries themselves predicted: the probability of
//! default and every principal reason's Shapley value; the same for models make.py trains
//! afresh with the libraries in .ci/venv. Then replay, and refusals.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::harness::*;
use riskserve::bundle::SourceFormat;
use riskserve::grpc::pb;
use riskserve::grpc::v2::{self, grpc_inference_service_client::GrpcInferenceServiceClient};
use riskserve::import::{ImportSpec, import};

fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// One held-out row and what the library said of it.
struct Expected {
    /// The features present (a missing one is absent), in the file's column order.
    values: Vec<(String, Option<f64>)>,
    pd: f64,
    phi: BTreeMap<String, f64>,
}

fn expected(dir: &Path, file: &str) -> Vec<Expected> {
    let mut reader = csv::Reader::from_path(dir.join(file)).unwrap();
    let headers: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let pd_at = headers.iter().position(|h| h == "pd").unwrap();
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            let values = headers[..pd_at]
                .iter()
                .zip(r.iter())
                .map(|(h, v)| (h.clone(), (!v.is_empty()).then(|| v.parse().unwrap())))
                .collect();
            let phi = headers[pd_at + 1..]
                .iter()
                .zip(r.iter().skip(pd_at + 1))
                .filter_map(|(h, v)| Some((h.strip_prefix("phi_")?.to_string(), v.parse().ok()?)))
                .collect();
            Expected {
                values,
                pd: r[pd_at].parse().unwrap(),
                phi,
            }
        })
        .collect()
}

fn spec(format: SourceFormat, file: PathBuf, model: &str, models: &Path) -> ImportSpec {
    ImportSpec {
        format,
        file,
        model: model.into(),
        version: "v1".into(),
        schema: Some(fixture("schema.toml")),
        policy: None,
        data: None,
        label: None,
        models_dir: models.to_owned(),
        created_at: "2026-12-01T00:00:00Z".into(),
        reason_codes: None,
    }
}

const XGB: &str = "trees-xgboost";
const LGB: &str = "trees-lightgbm";

/// The committed fixtures.
fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/trees")
}

/// Both models of `dir` (as make.py writes them) imported into a fresh models directory, and
/// a server serving them.
async fn serve_both(data: &Path, dir: &Path) -> (tempfile::TempDir, TestServer) {
    let models = tempfile::tempdir().unwrap();
    let xgb = spec(
        SourceFormat::Xgboost,
        dir.join("xgboost.json"),
        XGB,
        models.path(),
    );
    import(&xgb).unwrap();
    let lgb = spec(
        SourceFormat::Lightgbm,
        dir.join("lightgbm.txt"),
        LGB,
        models.path(),
    );
    import(&lgb).unwrap();
    let config = riskserve::Config {
        serving: [
            (XGB.to_string(), "v1".to_string()),
            (LGB.to_string(), "v1".to_string()),
        ]
        .into(),
        ..config(models.path(), data)
    };
    let server = TestServer::start_with(config).await;
    (models, server)
}

fn score_request(model: &str, row: &Expected, i: usize) -> pb::ScoreRequest {
    pb::ScoreRequest {
        request_id: format!("{model}-{i}"),
        customer_id: format!("customer-{i}"),
        model: model.into(),
        features: row
            .values
            .iter()
            .filter_map(|(n, v)| Some((n.clone(), number((*v)?))))
            .collect(),
        current_limit: Some(50_000),
    }
}

/// The reasons are the library's four largest positive Shapley values, each within 1e-5:
/// every reason's contribution is the library's for that feature, they come largest first,
/// and no feature left out has a clearly larger positive value than the last one given.
fn assert_reasons(reasons: &[pb::Reason], row: &Expected, what: &str) {
    assert!(reasons.len() <= 4, "{what}: {} reasons", reasons.len());
    for r in reasons {
        let lib = row.phi[&r.feature];
        assert!(
            (r.contribution - lib).abs() < 1e-5,
            "{what}: {} contributes {} here, {lib} in the library",
            r.feature,
            r.contribution
        );
        assert!(r.contribution > 0.0, "{what}: a reason must push PD up");
    }
    assert!(
        reasons
            .windows(2)
            .all(|w| w[0].contribution >= w[1].contribution)
    );
    let floor = match reasons.len() {
        4 => reasons[3].contribution,
        _ => 0.0,
    };
    for (feature, &phi) in &row.phi {
        if feature != "bias" && !reasons.iter().any(|r| &r.feature == feature) {
            assert!(
                phi <= floor + 1e-5,
                "{what}: {feature} ({phi}) is missing from the reasons {reasons:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_trees_score_as_the_libraries_do_with_their_shapley_values_as_reasons() {
    let data = tempfile::tempdir().unwrap();
    let (_models, server) = serve_both(data.path(), &fixtures()).await;
    // Operators see which kind of model each version is.
    let list = server
        .models()
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap();
    let kinds: BTreeMap<String, String> = list
        .into_inner()
        .models
        .into_iter()
        .flat_map(|m| m.versions)
        .map(|v| (v.model, v.kind))
        .collect();
    assert_eq!(kinds[XGB], "XGBoost tree ensemble");
    assert_eq!(kinds[LGB], "LightGBM tree ensemble");
    score_and_compare(&server, &fixtures()).await;
    server.stop().await.unwrap();
}

/// Models the libraries train now, on another seed (so other trees and other missing
/// values), through the same import and the same comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_the_libraries_train_now_score_as_the_libraries_say() {
    let python = repo().join(".ci/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run .ci/deps, which installs xgboost-cpu and lightgbm",
        python.display()
    );
    let fresh = tempfile::tempdir().unwrap();
    let made = std::process::Command::new(&python)
        .arg(fixtures().join("make.py"))
        .arg(fresh.path())
        .arg("23")
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let committed = std::fs::read(fixtures().join("xgboost.json")).unwrap();
    assert_ne!(
        std::fs::read(fresh.path().join("xgboost.json")).unwrap(),
        committed
    );
    let data = tempfile::tempdir().unwrap();
    let (_models, server) = serve_both(data.path(), fresh.path()).await;
    score_and_compare(&server, fresh.path()).await;
    server.stop().await.unwrap();
}

/// Scores every expected row of `dir` through Score on both models, compares PD and reasons
/// with the library's, and replays a share of the decisions (every one with a missing value
/// among the first 40).
async fn score_and_compare(server: &TestServer, dir: &Path) {
    let mut scoring = server.scoring();
    let mut trace = server.trace();
    for (model, file) in [
        (XGB, "xgboost_expected.csv"),
        (LGB, "lightgbm_expected.csv"),
    ] {
        let rows = expected(dir, file);
        assert_eq!(rows.len(), 300);
        let with_missing = rows
            .iter()
            .filter(|r| r.values.iter().any(|(_, v)| v.is_none()))
            .count();
        assert!(
            with_missing >= 30,
            "{with_missing} rows with a missing value"
        );
        let mut replayed = 0;
        for (i, row) in rows.iter().enumerate() {
            let r = scoring
                .score(score_request(model, row, i))
                .await
                .unwrap()
                .into_inner();
            let what = format!("{model} row {i}");
            assert!(
                (r.probability_of_default - row.pd).abs() < 1e-6,
                "{what}: PD {} here, {} in the library",
                r.probability_of_default,
                row.pd
            );
            assert_reasons(&r.reasons, row, &what);
            // The record keeps a missing value missing, so the replay sees what was scored.
            if i % 10 == 0 || row.values.iter().any(|(_, v)| v.is_none()) && replayed < 40 {
                let replay = trace
                    .replay(pb::DecisionRef {
                        decision_id: r.decision_id.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(replay.identical, "{what}: {:?}", replay.differences);
                let bits = |rs: &[pb::Reason]| -> Vec<(String, u64, u64)> {
                    rs.iter()
                        .map(|r| {
                            (
                                r.feature.clone(),
                                r.contribution.to_bits(),
                                r.value.to_bits(),
                            )
                        })
                        .collect()
                };
                assert_eq!(bits(&replay.reasons), bits(&r.reasons), "{what}");
                replayed += 1;
            }
        }
    }
}

/// A ModelInfer request for rows of a fixture: FP64 with NaN for a missing value, or FP32.
fn infer_request(model: &str, rows: &[&Expected], fp32: bool) -> v2::ModelInferRequest {
    use v2::infer_parameter::ParameterChoice;
    let values = rows
        .iter()
        .flat_map(|r| r.values.iter().map(|(_, v)| v.unwrap_or(f64::NAN)));
    let raw: Vec<u8> = match fp32 {
        false => values.flat_map(f64::to_le_bytes).collect(),
        true => values.flat_map(|v| (v as f32).to_le_bytes()).collect(),
    };
    let ids: Vec<String> = (0..rows.len()).map(|i| format!("c{i}")).collect();
    v2::ModelInferRequest {
        model_name: model.into(),
        id: format!("{model}-fp32-{fp32}"),
        parameters: [(
            "customer_ids".to_string(),
            v2::InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(
                    serde_json::to_string(&ids).unwrap(),
                )),
            },
        )]
        .into(),
        inputs: vec![v2::model_infer_request::InferInputTensor {
            name: "features".into(),
            datatype: if fp32 { "FP32" } else { "FP64" }.into(),
            shape: vec![rows.len() as i64, rows[0].values.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inference_protocol_takes_nan_as_missing_and_fp32_exactly() {
    let data = tempfile::tempdir().unwrap();
    let (_models, server) = serve_both(data.path(), &fixtures()).await;
    let mut client = GrpcInferenceServiceClient::new(server.channel.clone());
    for (model, file) in [
        (XGB, "xgboost_expected.csv"),
        (LGB, "lightgbm_expected.csv"),
    ] {
        let rows = expected(&fixtures(), file);
        let all: Vec<&Expected> = rows.iter().collect();
        // FP32 only for rows whose values are all exact in float32 (the CREDIT_LIMIT rows
        // just under a threshold are not), so the library's answers still apply.
        let exact: Vec<&Expected> = rows
            .iter()
            .filter(|r| {
                r.values
                    .iter()
                    .all(|(_, v)| v.is_none_or(|v| f64::from(v as f32) == v))
            })
            .collect();
        assert!(exact.len() >= 200, "{} float32-exact rows", exact.len());
        for (batch, fp32) in [(all, false), (exact, true)] {
            let r = client
                .model_infer(infer_request(model, &batch, fp32))
                .await
                .unwrap()
                .into_inner();
            let pd = &infer_outputs(&r).numbers["probability_of_default"];
            assert_eq!(pd.len(), batch.len());
            for (i, (got, row)) in pd.iter().zip(&batch).enumerate() {
                assert!(
                    (got - row.pd).abs() < 1e-6,
                    "{model} fp32={fp32} row {i}: {got} vs the library's {}",
                    row.pd
                );
            }
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_and_left_out_features_are_refused_where_the_schema_requires_them() {
    let data = tempfile::tempdir().unwrap();
    // The logistic v1 requires every feature: NaN in its tensor is refused, naming it.
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let mut infer = crate::harness::infer_request(&customers()[..2], "nan");
    let at = 8 * 3; // row 0, column 3
    infer.raw_input_contents[0][at..at + 8].copy_from_slice(&f64::NAN.to_le_bytes());
    let err = GrpcInferenceServiceClient::new(server.channel.clone())
        .model_infer(infer)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let column = &schema_features()[3];
    assert!(
        err.message().contains(column.as_str()) && err.message().contains("finite"),
        "{}",
        err.message()
    );
    server.stop().await.unwrap();

    // A tree model allows missing values (schema.toml), but Score's explicit NaN is still
    // not a number: leaving the feature out is how Score says "missing".
    let (_models, server) = serve_both(data.path(), &fixtures()).await;
    let row = &expected(&fixtures(), "xgboost_expected.csv")[0];
    let mut req = score_request(XGB, row, 0);
    req.features.insert("AGE".into(), number(f64::NAN));
    let err = server.scoring().score(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(violation_field(&err), "features.AGE");
    server.stop().await.unwrap();
}

fn import_err(edit: impl FnOnce(&mut ImportSpec, &Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(
        SourceFormat::Xgboost,
        fixture("xgboost.json"),
        XGB,
        dir.path(),
    );
    edit(&mut s, dir.path());
    let err = import(&s).unwrap_err().to_string();
    assert!(
        !dir.path().join(XGB).join("v1").exists(),
        "a refused import leaves no bundle ({err})"
    );
    err
}

#[test]
fn an_unsupported_corrupt_or_mismatched_model_file_is_refused_with_what_and_where() {
    let write = |dir: &Path, name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let xgb = std::fs::read_to_string(fixture("xgboost.json")).unwrap();
    let lgb = std::fs::read_to_string(fixture("lightgbm.txt")).unwrap();
    let schema = std::fs::read_to_string(fixture("schema.toml")).unwrap();

    let err = import_err(|s, d| s.file = write(d, "cut.json", xgb[..xgb.len() / 2].into()));
    assert!(
        err.contains("XGBoost model") && err.contains("cut.json"),
        "{err}"
    );

    let err = import_err(|s, d| {
        s.file = write(
            d,
            "multi.json",
            xgb.replace("binary:logistic", "multi:softprob"),
        );
    });
    assert!(
        err.contains("multi:softprob") && err.contains("not supported"),
        "{err}"
    );

    let err = import_err(|s, d| {
        s.format = SourceFormat::Lightgbm;
        s.file = write(d, "multi.txt", lgb.replace("num_class=1", "num_class=3"));
    });
    assert!(err.contains("num_class=3"), "{err}");

    let err = import_err(|s, d| {
        s.format = SourceFormat::Lightgbm;
        let edited = lgb.replacen("decision_type=", "decision_type=1 ", 1);
        s.file = write(d, "broken.txt", edited);
    });
    assert!(
        err.contains("LightGBM model") && err.contains("tree 0"),
        "{err}"
    );

    // A schema that leaves out one of the model's features, or has one it lacks.
    let without_age = schema.replace("name = \"AGE\"", "name = \"AGE_AT_APPLICATION\"");
    let err = import_err(|s, d| s.schema = Some(write(d, "s.toml", without_age)));
    assert!(
        err.contains("AGE_AT_APPLICATION") && err.contains("not a feature"),
        "{err}"
    );

    // A monotone direction the trees break, named with the feature and the tree.
    let age_up = schema.replace(
        "name = \"AGE\"",
        "name = \"AGE\"\nmonotone = \"decreasing\"",
    );
    let err = import_err(|s, d| s.schema = Some(write(d, "s.toml", age_up)));
    assert!(
        err.contains("feature AGE is declared decreasing") && err.contains("tree "),
        "{err}"
    );
    // LightGBM's own constraint (PAYMENTDELAY_1 increasing) contradicted by the schema.
    let down = schema.replace("monotone = \"increasing\"", "monotone = \"decreasing\"");
    let err = import_err(|s, d| {
        s.format = SourceFormat::Lightgbm;
        s.file = fixture("lightgbm.txt");
        s.schema = Some(write(d, "s.toml", down));
    });
    assert!(
        err.contains("PAYMENTDELAY_1") && err.contains("trained increasing"),
        "{err}"
    );

    // Without a schema or data there are no ranges to judge requests by.
    let err = import_err(|s, _| s.schema = None);
    assert!(err.contains("--schema or --data"), "{err}");
}

#[test]
fn a_logistic_bundle_refuses_missing_values_and_a_broken_monotone_direction_at_load() {
    let models = tempfile::tempdir().unwrap();
    let schema = std::fs::read_to_string(repo().join("data/taiwan_schema.toml")).unwrap();
    let first = schema.find("missing = ").unwrap();
    let end = first + schema[first..].find('\n').unwrap();
    let allowed = format!(
        "{}missing = \"allowed\"{}",
        &schema[..first],
        &schema[end..]
    );
    let path = models.path().join("allowed.toml");
    std::fs::write(&path, allowed).unwrap();
    let spec = riskserve::train::TrainSpec {
        schema: Some(path),
        ..v1_spec(models.path())
    };
    let err = riskserve::train::train(&spec, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing = \"allowed\"") && err.contains("logistic regression"),
        "{err}"
    );

    // A logistic model is monotone in each feature its coefficient's way: more payment delay
    // raises the PD of v1, so "decreasing" is refused and "increasing" kept.
    for (direction, version) in [("decreasing", "v5"), ("increasing", "v6")] {
        let declared = schema.replace(
            "name = \"PAYMENTDELAY_1\"",
            &format!("name = \"PAYMENTDELAY_1\"\nmonotone = \"{direction}\""),
        );
        let path = models.path().join(format!("{direction}.toml"));
        std::fs::write(&path, declared).unwrap();
        let spec = riskserve::train::TrainSpec {
            schema: Some(path),
            version: version.into(),
            ..v1_spec(models.path())
        };
        let trained = riskserve::train::train(&spec, &mut |_| {});
        match direction {
            "decreasing" => {
                let err = trained.unwrap_err().to_string();
                assert!(
                    err.contains("PAYMENTDELAY_1 is declared decreasing, but its coefficient"),
                    "{err}"
                );
            }
            _ => assert!(trained.is_ok(), "{:?}", trained.err()),
        }
    }
}

#[test]
fn an_import_with_data_records_its_metrics_and_the_source_digest() {
    use sha2::Digest as _;
    let models = tempfile::tempdir().unwrap();
    let s = ImportSpec {
        schema: None,
        data: Some(taiwan_csv()),
        label: Some("DID_DEFAULT_PAYMENT".into()),
        ..spec(
            SourceFormat::Lightgbm,
            fixture("lightgbm.txt"),
            LGB,
            models.path(),
        )
    };
    let report = import(&s).unwrap();
    let source = report.manifest.source.as_ref().unwrap();
    let file = std::fs::read(fixture("lightgbm.txt")).unwrap();
    assert_eq!(source.sha256, hex::encode(sha2::Sha256::digest(&file)));
    assert_eq!(
        std::fs::read(report.dir.join("model.txt")).unwrap(),
        file,
        "the bundle holds the file byte for byte"
    );
    let m = report.manifest.metrics.as_ref().unwrap();
    assert_eq!(m.holdout_rows, 30_000);
    // Trained on most of these rows: well above chance, and AUC and Gini agree.
    assert!(
        m.auc > 0.7 && (m.gini - (2.0 * m.auc - 1.0)).abs() < 1e-9,
        "{m:?}"
    );
    // Observed ranges, and LightGBM's own monotone constraint carried into the schema.
    let delay = report
        .manifest
        .features
        .iter()
        .find(|f| f.name == "PAYMENTDELAY_1")
        .unwrap();
    assert_eq!(
        delay.monotone,
        Some(riskserve::schema::Monotone::Increasing)
    );
    assert_eq!((delay.min, delay.max), (0.0, 8.0));
    // Bundles are immutable: the same version again is refused.
    let again = import(&s).unwrap_err().to_string();
    assert!(again.contains("already exists"), "{again}");
}
