//! A stock inference-protocol client against the real server: NVIDIA's Python
//! `tritonclient[grpc]` (installed by .ci/deps into .ci/venv) reads the model's metadata and
//! readiness and runs ModelInfer; its PDs must equal Score's for the same customers, to the bit.

use std::path::PathBuf;
use std::process::Command;

use crate::harness::{
    Customer, MODEL, TestServer, customers, models_v1_v2, repo, run_ok, schema_features, score_each,
};
use riskserve::grpc::pb;

/// The Python with tritonclient: $RISKSERVE_PYTHON, or the venv .ci/deps makes.
fn python() -> PathBuf {
    let path = std::env::var_os("RISKSERVE_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".ci/venv/bin/python"));
    assert!(
        path.exists(),
        "{} is missing: run .ci/deps, which makes .ci/venv with tritonclient[grpc]",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_reads_metadata_and_gets_the_pds_score_gives() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let batch: Vec<Customer> = customers()[100..125].to_vec();
    let columns = schema_features();
    let spec = serde_json::json!({
        "model": MODEL,
        "columns": columns,
        "customers": batch.iter().map(|c| serde_json::json!({
            "id": c.id,
            "limit": c.limit,
            "values": c.values,
        })).collect::<Vec<_>>(),
    });
    let spec_path = data.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();

    let address = server.addr.to_string();
    let script = repo().join("tests/it/tritonclient_check.py");
    let mut check = Command::new(python());
    check.arg(script).arg(address).arg(spec_path);
    let seen: serde_json::Value = serde_json::from_slice(&run_ok(check).await).unwrap();

    // Metadata as the stock client parsed it (its JSON form drops riskserve's `columns`).
    let input = &seen["metadata"]["inputs"][0];
    assert_eq!(input["name"], "features");
    assert_eq!(input["datatype"], "FP64");
    assert_eq!(
        input["shape"],
        serde_json::json!(["-1", columns.len().to_string()])
    );
    assert_eq!(
        seen["metadata"]["versions"],
        serde_json::json!(["v1", "v2"])
    );
    assert_eq!(seen["model_version"], "v1");

    for (i, scored) in score_each(&server, &batch).await.into_iter().enumerate() {
        let pd = seen["probability_of_default"][i].as_f64().unwrap();
        assert_eq!(
            pd.to_bits(),
            scored.probability_of_default.to_bits(),
            "row {i}: tritonclient's PD and Score's"
        );
        assert_eq!(seen["grade"][i], scored.grade.as_str(), "row {i}");
        assert_eq!(seen["granted_limit"][i], scored.granted_limit, "row {i}");
        assert_eq!(seen["version"][i], "v1");
    }
    let single = seen["single_probability_of_default"][0].as_f64().unwrap();
    assert_eq!(
        single.to_bits(),
        seen["probability_of_default"][0]
            .as_f64()
            .unwrap()
            .to_bits()
    );
    assert_eq!(
        seen["single_outputs"],
        serde_json::json!(["probability_of_default"])
    );

    // Every ModelInfer row was recorded (26) besides the 25 Score decisions.
    assert_eq!(server.records().await, 25 + 1 + 25);
    let first = seen["decision_id"][0].as_str().unwrap().to_string();
    let record = server
        .trace()
        .get_decision(pb::DecisionRef { decision_id: first })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.request_id, "triton-batch/0");
    server.stop().await.unwrap();
}
