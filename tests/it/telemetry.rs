//! OpenTelemetry export from the real server process to an in-process OTLP receiver (the
//! collector's gRPC trace and metrics services): request spans carry the decision's
//! attributes and continue the caller's trace, whose id the decision record stores, and the
//! metrics arrive; a signal the environment turns off sends nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{
    ChildServer, MODEL, customers, infer_outputs, infer_request, models_v1_v2, request,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use riskserve::grpc::pb;
use riskserve::grpc::pb::rollouts_client::RolloutsClient;
use riskserve::grpc::pb::scoring_client::ScoringClient;
use riskserve::grpc::pb::trace_client::TraceClient;
use riskserve::grpc::v2::grpc_inference_service_client::GrpcInferenceServiceClient;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// A span as received: ids in hex, attributes as strings.
#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: BTreeMap<String, String>,
    error: bool,
}

/// One metric data point: the metric's name and the point's attributes.
#[derive(Debug, Clone)]
struct Point {
    metric: String,
    attributes: BTreeMap<String, String>,
    /// A gauge's or sum's value, or a histogram's count.
    value: f64,
}

/// What the receiver has been sent.
#[derive(Debug, Default)]
struct Received {
    spans: Vec<Span>,
    points: Vec<Point>,
    service_names: Vec<String>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Received>>);

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(x)) => x.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn service_name(resource: &Option<opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .as_ref()
        .map(|r| attributes(&r.attributes))
        .and_then(|a| a.get("service.name").cloned())
        .unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            got.service_names.push(service_name(&rs.resource));
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.spans.push(Span {
                    name: span.name,
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent: hex::encode(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                    error: span.status.is_some_and(|s| s.code == 2),
                });
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut got = self.0.lock().unwrap();
        for rm in request.into_inner().resource_metrics {
            got.service_names.push(service_name(&rm.resource));
            for metric in rm.scope_metrics.into_iter().flat_map(|s| s.metrics) {
                let points: Vec<(BTreeMap<String, String>, f64)> = match metric.data {
                    Some(Data::Sum(s)) => s
                        .data_points
                        .iter()
                        .map(|p| (attributes(&p.attributes), number(&p.value)))
                        .collect(),
                    Some(Data::Gauge(g)) => g
                        .data_points
                        .iter()
                        .map(|p| (attributes(&p.attributes), number(&p.value)))
                        .collect(),
                    Some(Data::Histogram(h)) => h
                        .data_points
                        .iter()
                        .map(|p| (attributes(&p.attributes), p.count as f64))
                        .collect(),
                    _ => Vec::new(),
                };
                for (attributes, value) in points {
                    got.points.push(Point {
                        metric: metric.name.clone(),
                        attributes,
                        value,
                    });
                }
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn number(v: &Option<opentelemetry_proto::tonic::metrics::v1::number_data_point::Value>) -> f64 {
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value;
    match v {
        Some(Value::AsDouble(x)) => *x,
        Some(Value::AsInt(i)) => *i as f64,
        None => f64::NAN,
    }
}

impl Receiver {
    /// Serves the collector's trace and metrics services on a loopback port.
    async fn start() -> (Receiver, String) {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .add_service(MetricsServiceServer::new(receiver.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        (receiver, format!("http://{addr}"))
    }

    /// Waits until `test` holds for what has been received (exports are periodic).
    async fn until<T>(&self, what: &str, test: impl Fn(&Received) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(t) = test(&self.0.lock().unwrap()) {
                return t;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let got = self.0.lock().unwrap();
                let names: std::collections::BTreeSet<_> =
                    got.points.iter().map(|p| p.metric.as_str()).collect();
                panic!(
                    "never received {what}; {} spans, metrics {names:?}",
                    got.spans.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The receiver's address as the server's OTLP endpoint, exports every few hundred ms.
fn otel_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string()),
        ("OTEL_SERVICE_NAME", "riskserve-under-test".into()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300".into()),
    ]
}

async fn start_server(data: &std::path::Path, env: &[(&'static str, String)]) -> ChildServer {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ChildServer::start_with_env(models_v1_v2(), data, &data.join("server.log"), &env).await
}

fn with_traceparent<T>(msg: T, trace_id: &str, parent: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent}-01").parse().unwrap(),
    );
    r
}

/// Half the customers go to v1 (the candidate; v2 serves, being the highest version).
const PLAN: &str = r#"
[[steps]]
share_bp = 5000
min_bake_secs = 3600
min_decisions = 1000000
[[steps]]
share_bp = 10000
min_bake_secs = 3600
min_decisions = 1000000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_continue_the_callers_trace_and_metrics_arrive_over_otlp() {
    let (receiver, endpoint) = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let server = start_server(data.path(), &otel_env(&endpoint)).await;
    let ch = server.channel.clone();
    let rollout = RolloutsClient::new(ch.clone())
        .start(pb::StartRolloutRequest {
            model: MODEL.into(),
            candidate: "v1".into(),
            plan_toml: PLAN.into(),
            actor: "test".into(),
            skip_backtest: true,
        })
        .await
        .unwrap()
        .into_inner();
    let rollout_id = rollout.id;

    // One Score continuing the caller's trace, then enough traffic for both arms.
    let (caller_trace, caller_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let mut scoring = ScoringClient::new(ch.clone());
    let traced = scoring
        .score(with_traceparent(
            request(&customers()[0], "traced"),
            caller_trace,
            caller_span,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut decisions = vec![traced.clone()];
    for (i, c) in customers()[1..60].iter().enumerate() {
        let r = scoring.score(request(c, &format!("plain-{i}"))).await;
        decisions.push(r.unwrap().into_inner());
    }
    let mut bad = request(&customers()[61], "bad");
    bad.features
        .insert("AGE".into(), crate::harness::number(5.0));
    assert!(scoring.score(bad).await.is_err());
    // ModelInfer continues a trace too.
    let infer_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let inferred = GrpcInferenceServiceClient::new(ch.clone())
        .model_infer(with_traceparent(
            infer_request(&customers()[70..71], "traced-v2"),
            infer_trace,
            "00f067aa0ba902b7",
        ))
        .await
        .unwrap()
        .into_inner();

    // The Score span: a child of the caller's span, with the decision's attributes.
    let rpc = receiver
        .until("the traced Score span", |r| {
            r.spans
                .iter()
                .find(|s| s.trace_id == caller_trace && s.name == "riskserve.v1.Scoring/Score")
                .cloned()
        })
        .await;
    assert_eq!(rpc.parent, caller_span, "the caller's span is the parent");
    let a = &rpc.attributes;
    assert_eq!(a["model.name"], MODEL);
    assert_eq!(a["model.version"], traced.version);
    assert_eq!(a["model.digest"], traced.digest);
    assert_eq!(
        a["decision"],
        pb::Decision::try_from(traced.decision)
            .unwrap()
            .as_str_name()
            .trim_start_matches("DECISION_")
            .to_lowercase()
    );
    assert_eq!(a["grade"], traced.grade);
    let arm = if traced.arm == pb::Arm::Candidate as i32 {
        "candidate"
    } else {
        "champion"
    };
    assert_eq!(a["rollout.arm"], arm);
    // Both arms of an open rollout are part of it.
    assert_eq!(a["rollout.id"], rollout_id);

    // Its children: one span per phase of the request path.
    let children = receiver
        .until("the four phase spans", |r| {
            let mut names: Vec<String> = r
                .spans
                .iter()
                .filter(|s| s.parent == rpc.span_id)
                .map(|s| s.name.clone())
                .collect();
            names.sort();
            (names.len() == 4).then_some(names)
        })
        .await;
    assert_eq!(children, ["record", "route", "score", "validate"]);

    // A candidate decision's span names the rollout.
    let candidate = decisions
        .iter()
        .find(|d| d.arm == pb::Arm::Candidate as i32)
        .expect("half the customers are on the candidate");
    let candidate_span = receiver
        .until("a candidate span", |r| {
            r.spans
                .iter()
                .find(|s| s.attributes.get("rollout.arm").map(String::as_str) == Some("candidate"))
                .cloned()
        })
        .await;
    assert_eq!(candidate_span.attributes["rollout.id"], rollout_id);
    assert_eq!(
        candidate_span.attributes["model.version"],
        candidate.version
    );

    // The refused request's span is an error.
    receiver
        .until("the refused Score's error span", |r| {
            r.spans
                .iter()
                .find(|s| {
                    s.error
                        && s.attributes.get("rpc.grpc.status_code").map(String::as_str) == Some("3")
                })
                .cloned()
        })
        .await;

    // The decision records store the trace: the caller's, or the one the server began.
    let mut trace = TraceClient::new(ch.clone());
    let record = |id: String| pb::DecisionRef { decision_id: id };
    let traced_record = trace
        .get_decision(record(traced.decision_id.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(traced_record.trace_id, caller_trace);
    let plain = trace
        .get_decision(record(decisions[5].decision_id.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain.trace_id.len(), 32, "a trace begun by the server");
    let plain_trace = plain.trace_id.clone();
    receiver
        .until("the span of the server-begun trace", |r| {
            r.spans
                .iter()
                .find(|s| s.trace_id == plain_trace && s.parent.is_empty())
                .cloned()
        })
        .await;
    let v2_id = infer_outputs(&inferred).strings["decision_id"][0].clone();
    let v2_record = trace
        .get_decision(record(v2_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2_record.trace_id, infer_trace);
    receiver
        .until("the ModelInfer span", |r| {
            r.spans
                .iter()
                .find(|s| {
                    s.trace_id == infer_trace
                        && s.name == "inference.GRPCInferenceService/ModelInfer"
                })
                .cloned()
        })
        .await;

    // The metrics, with their labels.
    let wanted = [
        "riskserve.requests",
        "riskserve.request.duration",
        "riskserve.decisions",
        "riskserve.granted_limit",
        "riskserve.limit_changes",
        "riskserve.decision_log.batch_size",
        "riskserve.decision_log.commit.duration",
        "riskserve.decision_log.view_lag",
        "riskserve.versions.loads",
        "riskserve.versions",
        "riskserve.rollout.share",
        "riskserve.rollout.guardrail",
        "riskserve.rollout.guardrail.threshold",
    ];
    for name in wanted {
        receiver
            .until(name, |r| {
                r.points.iter().find(|p| p.metric == name).cloned()
            })
            .await;
    }
    let requests_ok = receiver
        .until("requests by version, arm and status", |r| {
            let ok: f64 = r
                .points
                .iter()
                .filter(|p| p.metric == "riskserve.requests" && p.attributes["status"] == "OK")
                .map(|p| p.value)
                .sum();
            // Sums are cumulative: the latest export holds them all.
            (ok >= 62.0).then_some(ok)
        })
        .await;
    assert!(requests_ok >= 62.0);
    // The view's lag is reported, never more than this test's decisions (under 1,000), and
    // falls to 0 once the load stops and the indexer catches up.
    receiver
        .until("the query view caught up", |r| {
            let lags: Vec<f64> = r
                .points
                .iter()
                .filter(|p| p.metric == "riskserve.decision_log.view_lag")
                .map(|p| p.value)
                .collect();
            assert!(
                lags.iter().all(|&l| (0.0..=1_000.0).contains(&l)),
                "{lags:?}"
            );
            lags.last().is_some_and(|&l| l == 0.0).then_some(())
        })
        .await;
    receiver
        .until("a refused request by status", |r| {
            r.points
                .iter()
                .find(|p| {
                    p.metric == "riskserve.requests"
                        && p.attributes["status"] == "INVALID_ARGUMENT"
                        && p.attributes["model"] == MODEL
                })
                .cloned()
        })
        .await;
    let share = receiver
        .until("the rollout share", |r| {
            r.points
                .iter()
                .find(|p| {
                    p.metric == "riskserve.rollout.share"
                        && p.attributes.get("rollout.id") == Some(&rollout_id)
                })
                .cloned()
        })
        .await;
    assert_eq!(share.value, 0.5);
    assert_eq!(share.attributes["candidate"], "v1");
    let decision_point = receiver
        .until("decisions by version, arm and outcome", |r| {
            r.points
                .iter()
                .find(|p| p.metric == "riskserve.decisions")
                .cloned()
        })
        .await;
    for label in ["model", "version", "arm", "decision"] {
        assert!(
            decision_point.attributes.contains_key(label),
            "{decision_point:?}"
        );
    }
    let names = receiver.0.lock().unwrap().service_names.clone();
    assert!(
        names.iter().all(|n| n == "riskserve-under-test"),
        "{names:?}"
    );
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_set_to_none_exports_nothing() {
    let (receiver, endpoint) = Receiver::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut env = otel_env(&endpoint);
    env.push(("OTEL_TRACES_EXPORTER", "none".into()));
    let server = start_server(data.path(), &env).await;
    let mut scoring = ScoringClient::new(server.channel.clone());
    for (i, c) in customers()[..20].iter().enumerate() {
        scoring.score(request(c, &format!("r-{i}"))).await.unwrap();
    }
    // Metrics still flow, so the exporter had every chance to send spans too.
    receiver
        .until("request metrics", |r| {
            r.points
                .iter()
                .find(|p| p.metric == "riskserve.requests")
                .cloned()
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        receiver.0.lock().unwrap().spans.is_empty(),
        "no spans with OTEL_TRACES_EXPORTER=none"
    );
    server.kill();
}
