//! The Open Inference Protocol (KServe v2) on the real server: metadata announces the serving
//! schema, ModelInfer decides exactly as Score does and records every row, a retry is answered
//! from the log, and a bad row refuses the whole batch with nothing recorded.

use crate::harness::{
    Customer, MODEL, TestServer, customers, infer_outputs, infer_request, models_v1_v2, request,
    schema_features, score_each, violation_field,
};
use riskserve::grpc::pb;
use riskserve::grpc::v2::{self, grpc_inference_service_client::GrpcInferenceServiceClient};
use tonic::Code;
use tonic::transport::Channel;

fn client(server: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(server.channel.clone())
}

#[tokio::test]
async fn metadata_and_readiness_describe_the_serving_version() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let mut v2c = client(&server);

    assert!(
        v2c.server_live(v2::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        v2c.server_ready(v2::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str, version: &str| v2::ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    for (name, version, want) in [
        (MODEL, "", true),
        (MODEL, "v1", true),
        (MODEL, "v2", true),
        (MODEL, "v9", false),
        ("no-such-model", "", false),
    ] {
        let got = v2c
            .model_ready(ready(name, version))
            .await
            .unwrap()
            .into_inner()
            .ready;
        assert_eq!(got, want, "ModelReady({name}, {version:?})");
    }
    let status = v2c.model_ready(ready("", "")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let meta = v2c
        .model_metadata(v2::ModelMetadataRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, MODEL);
    assert_eq!(meta.versions, ["v1", "v2"]);
    let [input] = meta.inputs.as_slice() else {
        panic!("one input: {:?}", meta.inputs)
    };
    let columns = schema_features();
    assert_eq!(input.name, "features");
    assert_eq!(input.datatype, "FP64");
    assert_eq!(input.shape, [-1, columns.len() as i64]);
    assert_eq!(input.columns, columns, "the serving version's schema order");
    let outputs: Vec<(&str, &str)> = meta
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.datatype.as_str()))
        .collect();
    assert_eq!(
        outputs,
        [
            ("probability_of_default", "FP64"),
            ("grade", "BYTES"),
            ("decision", "BYTES"),
            ("granted_limit", "INT64"),
            ("version", "BYTES"),
            ("decision_id", "BYTES"),
            ("arm", "BYTES"),
        ]
    );
    let unknown = v2c
        .model_metadata(v2::ModelMetadataRequest {
            name: "no-such-model".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_infer_decides_as_score_does_and_records_every_row_once() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let mut v2c = client(&server);
    let batch: Vec<Customer> = customers()[..40].to_vec();

    let response = v2c
        .model_infer(infer_request(&batch, "infer-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.model_name, MODEL);
    assert_eq!(response.model_version, "v1");
    assert_eq!(response.id, "infer-1");
    let out = infer_outputs(&response);
    assert_eq!(server.records().await, 40, "one record per row");

    for (i, scored) in score_each(&server, &batch).await.into_iter().enumerate() {
        assert_eq!(
            out.numbers["probability_of_default"][i].to_bits(),
            scored.probability_of_default.to_bits(),
            "row {i}: the same PD to the bit"
        );
        assert_eq!(out.strings["grade"][i], scored.grade, "row {i}");
        let decision = match pb::Decision::try_from(scored.decision).unwrap() {
            pb::Decision::Approve => "approve",
            pb::Decision::Review => "review",
            pb::Decision::Decline => "decline",
            pb::Decision::Unspecified => panic!("unspecified"),
        };
        assert_eq!(out.strings["decision"][i], decision, "row {i}");
        assert_eq!(
            out.integers["granted_limit"][i], scored.granted_limit,
            "row {i}"
        );
        assert_eq!(out.strings["version"][i], "v1");
        assert_eq!(out.strings["arm"][i], "champion");
    }

    // Each row's decision is on record under "<id>/<row>", with the caller's context.
    let record = server
        .trace()
        .get_decision(pb::DecisionRef {
            decision_id: out.strings["decision_id"][7].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.request_id, "infer-1/7");
    assert_eq!(
        record.probability_of_default.to_bits(),
        out.numbers["probability_of_default"][7].to_bits()
    );

    // A retry with the same id is answered from the log: same decisions, nothing new.
    let retried = infer_outputs(
        &v2c.model_infer(infer_request(&batch, "infer-1"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(retried.strings["decision_id"], out.strings["decision_id"]);
    assert_eq!(server.records().await, 40 + 40);

    // A clash of a row's recorded id refuses the whole batch, and the row recorded before the
    // clash, in the same commit, is undone.
    server
        .scoring()
        .score(request(&customers()[300], "clash/1"))
        .await
        .unwrap();
    let before = server.records().await;
    let clash = v2c
        .model_infer(infer_request(&customers()[301..303], "clash"))
        .await
        .unwrap_err();
    assert_eq!(clash.code(), Code::AlreadyExists, "{clash:?}");
    assert!(
        clash.message().starts_with("row 1: "),
        "{}",
        clash.message()
    );
    assert_eq!(violation_field(&clash), "id");
    assert_eq!(
        server.records().await,
        before,
        "nothing of the refused batch"
    );
    // The chain goes on from where it was (records() verifies it).
    v2c.model_infer(infer_request(&customers()[301..303], "after-clash"))
        .await
        .unwrap();
    assert_eq!(server.records().await, before + 2);

    // Typed contents instead of raw bytes decide the same; only the asked outputs come back.
    let mut typed = infer_request(&batch[..3], "infer-typed");
    let raw = typed.raw_input_contents.remove(0);
    typed.inputs[0].contents = Some(v2::InferTensorContents {
        fp64_contents: raw
            .chunks(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        ..Default::default()
    });
    typed.outputs = vec![v2::model_infer_request::InferRequestedOutputTensor {
        name: "probability_of_default".into(),
        ..Default::default()
    }];
    let typed = v2c.model_infer(typed).await.unwrap().into_inner();
    assert_eq!(typed.outputs.len(), 1);
    assert_eq!(
        infer_outputs(&typed).numbers["probability_of_default"],
        out.numbers["probability_of_default"][..3]
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_row_or_field_refuses_the_whole_call_and_records_nothing() {
    use v2::infer_parameter::ParameterChoice;
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let mut v2c = client(&server);
    let batch: Vec<Customer> = customers()[..4].to_vec();
    let columns = schema_features();
    let age = columns.iter().position(|c| c == "AGE").unwrap();
    let width = columns.len();
    let set = move |r: &mut v2::ModelInferRequest, row: usize, col: usize, x: f64| {
        let at = (row * width + col) * 8;
        r.raw_input_contents[0][at..at + 8].copy_from_slice(&x.to_le_bytes());
    };
    let string = |s: &str| v2::InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(s.into())),
    };

    type Edit = Box<dyn Fn(&mut v2::ModelInferRequest)>;
    let cases: Vec<(&str, Edit, Code, &str, &str)> = vec![
        (
            "age out of range in row 2",
            Box::new(move |r| set(r, 2, age, 5.0)),
            Code::InvalidArgument,
            "features[2].AGE",
            "row 2: feature AGE: value 5 is outside",
        ),
        (
            "NaN in row 0",
            Box::new(move |r| set(r, 0, 0, f64::NAN)),
            Code::InvalidArgument,
            "",
            "must be finite",
        ),
        (
            "a pinned version",
            Box::new(|r| r.model_version = "v2".into()),
            Code::InvalidArgument,
            "model_version",
            "routes each customer",
        ),
        (
            "the wrong column count",
            Box::new(|r| r.inputs[0].shape[1] -= 1),
            Code::InvalidArgument,
            "inputs[0].shape",
            "must be [batch, ",
        ),
        (
            "INT64 data",
            Box::new(|r| r.inputs[0].datatype = "INT64".into()),
            Code::InvalidArgument,
            "inputs[0].datatype",
            "must be FP64 or FP32",
        ),
        (
            "FP32 declared, FP64 sent",
            Box::new(|r| r.inputs[0].datatype = "FP32".into()),
            Code::InvalidArgument,
            "raw_input_contents[0]",
            "FP32 values",
        ),
        (
            "short raw contents",
            Box::new(|r| r.raw_input_contents[0].truncate(8)),
            Code::InvalidArgument,
            "raw_input_contents[0]",
            "FP64 values",
        ),
        (
            "no customer ids",
            Box::new(|r| {
                r.parameters.remove("customer_ids");
            }),
            Code::InvalidArgument,
            "parameters.customer_ids",
            "is required",
        ),
        (
            "too few customer ids",
            Box::new(move |r| {
                r.parameters
                    .insert("customer_ids".into(), string(r#"["a","b"]"#));
            }),
            Code::InvalidArgument,
            "parameters.customer_ids",
            "one item per row (4), got 2",
        ),
        (
            "a negative current limit",
            Box::new(move |r| {
                r.parameters
                    .insert("current_limits".into(), string("[1, 2, -3, 4]"));
            }),
            Code::InvalidArgument,
            "parameters.current_limits[2]",
            "must be ≥ 0",
        ),
        (
            "an unknown output",
            Box::new(|r| {
                r.outputs = vec![v2::model_infer_request::InferRequestedOutputTensor {
                    name: "pd".into(),
                    ..Default::default()
                }]
            }),
            Code::InvalidArgument,
            "outputs[0].name",
            "unknown output \"pd\"",
        ),
        (
            "an unknown model",
            Box::new(|r| r.model_name = "no-such-model".into()),
            Code::NotFound,
            "",
            "no-such-model",
        ),
    ];
    for (name, edit, code, field, message) in cases {
        let mut req = infer_request(&batch, &format!("bad-{name}"));
        edit(&mut req);
        let status = v2c.model_infer(req).await.unwrap_err();
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().contains(message),
            "{name}: {}",
            status.message()
        );
        if !field.is_empty() {
            assert_eq!(violation_field(&status), field, "{name}");
        }
    }
    assert_eq!(server.records().await, 0, "no refused call recorded a row");

    // The same batch, untouched, decides every row.
    let fine = v2c
        .model_infer(infer_request(&batch, "fine"))
        .await
        .unwrap();
    assert_eq!(
        infer_outputs(fine.get_ref()).numbers["probability_of_default"].len(),
        4
    );
    assert_eq!(server.records().await, 4);
    server.stop().await.unwrap();
}
