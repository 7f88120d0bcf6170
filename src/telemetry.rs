//! OpenTelemetry traces and metrics, exported over OTLP/gRPC where the standard `OTEL_*`
//! environment says, and nowhere when it says nothing.
//!
//! A request only records: its spans go into the batch processor's queue and its metrics into
//! in-memory aggregates, and the SDK's own threads export them. Without an endpoint no
//! provider is installed, so the request spans (target [`SPAN_TARGET`], level DEBUG, below
//! the default log filter) are disabled where they are created and the metric instruments are
//! no-ops: the default run pays next to nothing and needs no collector.
//!
//! Which variables are read, and by whom: this module decides whether each signal is on
//! (`OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER`, `OTEL_METRICS_EXPORTER`, the endpoints,
//! `OTEL_EXPORTER_OTLP_PROTOCOL`); the SDK reads the rest (endpoint, headers, timeout,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`,
//! `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL`).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableGauge};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::decision_log::DecisionLog;
use crate::policy::LimitMove;
use crate::registry::Registry;
use crate::rollout::{GuardrailReading, OpenRollout, Router};
use crate::scoring::Decision;

/// The target of the request spans; only these are exported as traces.
pub const SPAN_TARGET: &str = "riskserve::otel";

/// The instrumentation scope of every span and instrument.
const SCOPE: &str = "riskserve";

/// Why telemetry could not start as the environment asks.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{var}={value}: riskserve exports OTLP over gRPC only; set it to grpc or unset it")]
    Protocol { var: String, value: String },
    #[error("{var}={value}: riskserve exports with otlp or none")]
    Exporter { var: String, value: String },
    #[error("building the OTLP {signal} exporter: {message}")]
    Build {
        signal: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Copy)]
enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
        }
    }

    fn upper(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
        }
    }
}

/// Whether `signal` is to be exported, by the OTEL_* variables `var` reads.
fn wanted(signal: Signal, var: impl Fn(&str) -> Option<String>) -> Result<bool, TelemetryError> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    let exporter_var = format!("OTEL_{}_EXPORTER", signal.upper());
    let explicit = match set(&exporter_var) {
        None => false,
        Some(v) if v.trim() == "otlp" => true,
        Some(v) if v.trim() == "none" => return Ok(false),
        Some(value) => {
            return Err(TelemetryError::Exporter {
                var: exporter_var,
                value,
            });
        }
    };
    let endpoint = set(&format!("OTEL_EXPORTER_OTLP_{}_ENDPOINT", signal.upper()))
        .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if endpoint.is_none() && !explicit {
        return Ok(false);
    }
    for protocol_var in [
        format!("OTEL_EXPORTER_OTLP_{}_PROTOCOL", signal.upper()),
        "OTEL_EXPORTER_OTLP_PROTOCOL".to_string(),
    ] {
        if let Some(value) = set(&protocol_var) {
            if value.trim() != "grpc" {
                return Err(TelemetryError::Protocol {
                    var: protocol_var,
                    value,
                });
            }
            break;
        }
    }
    Ok(true)
}

/// The providers installed from the environment. Shut down to flush what is queued.
#[derive(Debug, Default)]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
    metrics: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Installs the providers the environment asks for, globally (metrics) and for the
    /// tracing layer (traces). Call it inside the Tokio runtime the process serves on: the
    /// exporters' gRPC connections run on it.
    pub fn from_env() -> Result<Telemetry, TelemetryError> {
        let var = |name: &str| std::env::var(name).ok();
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let mut telemetry = Telemetry::default();
        if wanted(Signal::Traces, var)? {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| build_error(Signal::Traces, e))?;
            telemetry.traces = Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource())
                    .build(),
            );
        }
        if wanted(Signal::Metrics, var)? {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| build_error(Signal::Metrics, e))?;
            let provider = SdkMeterProvider::builder()
                .with_periodic_exporter(exporter)
                .with_resource(resource())
                .build();
            opentelemetry::global::set_meter_provider(provider.clone());
            METRICS_EXPORTED.store(true, std::sync::atomic::Ordering::Relaxed);
            telemetry.metrics = Some(provider);
        }
        Ok(telemetry)
    }

    /// The tracer for the tracing layer, when traces are exported.
    pub fn tracer(&self) -> Option<opentelemetry_sdk::trace::SdkTracer> {
        use opentelemetry::trace::TracerProvider as _;
        self.traces.as_ref().map(|p| p.tracer(SCOPE))
    }

    /// What is on, for the start-up log.
    pub fn describe(&self) -> String {
        match (self.traces.is_some(), self.metrics.is_some()) {
            (true, true) => "traces and metrics".into(),
            (true, false) => "traces".into(),
            (false, true) => "metrics".into(),
            (false, false) => "nothing".into(),
        }
    }

    /// Exports what is still queued and stops the exporters. Blocks; call it off the
    /// runtime's workers (the exports need them).
    pub fn shutdown(self) {
        if let Some(p) = self.traces
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces at shutdown");
        }
        if let Some(p) = self.metrics
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "flushing metrics at shutdown");
        }
    }
}

fn build_error(signal: Signal, e: impl std::fmt::Display) -> TelemetryError {
    TelemetryError::Build {
        signal: signal.name(),
        message: e.to_string(),
    }
}

/// The SDK's resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES), named riskserve unless
/// the environment names it.
fn resource() -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if named {
        builder.build()
    } else {
        builder.with_service_name(SCOPE).build()
    }
}

/// The instruments every part of the server records into. Taken from the global meter
/// provider on first use: installed by [`Telemetry::from_env`] before the server starts, or
/// the no-op one, whose instruments record nothing.
#[derive(Debug)]
pub struct Metrics {
    /// Whether a meter provider exports them; if not, recording skips even building the
    /// attributes (the no-op instruments would drop them anyway).
    on: bool,
    requests: Counter<u64>,
    duration: Histogram<f64>,
    decisions: Counter<u64>,
    granted: Histogram<f64>,
    limit_changes: Counter<u64>,
    log_batch: Histogram<u64>,
    log_commit: Histogram<f64>,
    version_loads: Counter<u64>,
}

/// Set once a meter provider is installed, before the first [`metrics`] call.
static METRICS_EXPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics::new(&meter()))
}

/// The meter of riskserve's instruments.
pub fn meter() -> Meter {
    opentelemetry::global::meter(SCOPE)
}

/// What happened to a customer's limit.
/// The label values are an API of the metric (dashboards filter on them), so they keep their
/// names ("unchanged", "lowered") rather than [`LimitMove::as_str`]'s.
fn limit_change(d: &Decision) -> &'static str {
    match LimitMove::of(d.current_limit, d.granted_limit) {
        LimitMove::New => "new",
        LimitMove::Held => "unchanged",
        LimitMove::Withdrawn => "withdrawn",
        LimitMove::Raised => "raised",
        LimitMove::Cut => "lowered",
    }
}

impl Metrics {
    fn new(meter: &Meter) -> Metrics {
        // Seconds, from 50 µs (a cached score) to 2.5 s (a stalled commit).
        let seconds = vec![
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.5,
        ];
        Metrics {
            on: METRICS_EXPORTED.load(std::sync::atomic::Ordering::Relaxed),
            requests: meter
                .u64_counter("riskserve.requests")
                .with_description(
                    "Decisions asked for (one per customer, batch rows included), by model, \
                     version, arm and gRPC status",
                )
                .build(),
            duration: meter
                .f64_histogram("riskserve.request.duration")
                .with_unit("s")
                .with_description(
                    "Time to answer a call, by model, version, arm and gRPC status (a batch \
                     decided by several versions or arms has them empty)",
                )
                .with_boundaries(seconds.clone())
                .build(),
            decisions: meter
                .u64_counter("riskserve.decisions")
                .with_description(
                    "Decisions answered (a retry answered from the log counts again), by \
                     version, arm and outcome",
                )
                .build(),
            granted: meter
                .f64_histogram("riskserve.granted_limit")
                .with_description("Credit limits granted, by version and arm")
                .with_boundaries(vec![
                    0.0,
                    10_000.0,
                    20_000.0,
                    50_000.0,
                    100_000.0,
                    200_000.0,
                    500_000.0,
                    1_000_000.0,
                ])
                .build(),
            limit_changes: meter
                .u64_counter("riskserve.limit_changes")
                .with_description(
                    "Decisions by what they did to the current limit (new, unchanged, raised, \
                     lowered, withdrawn), by version and arm",
                )
                .build(),
            log_batch: meter
                .u64_histogram("riskserve.decision_log.batch_size")
                .with_description("Decisions per decision-log commit")
                .with_boundaries(vec![
                    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
                ])
                .build(),
            log_commit: meter
                .f64_histogram("riskserve.decision_log.commit.duration")
                .with_unit("s")
                .with_description("Time to commit one batch of decisions")
                .with_boundaries(seconds)
                .build(),
            version_loads: meter
                .u64_counter("riskserve.versions.loads")
                .with_description("Version loads, by model and outcome (ready or failed)")
                .build(),
        }
    }

    /// One decision asked for (a customer of a call): answered (`Ok`) or refused with a gRPC
    /// status name.
    pub fn request(&self, model: &str, answer: Result<&Decision, &str>) {
        if !self.on {
            return;
        }
        let attributes = match answer {
            Ok(d) => [
                KeyValue::new("model", model.to_string()),
                KeyValue::new("version", d.version.clone()),
                KeyValue::new("arm", d.arm.as_str()),
                KeyValue::new("status", "OK"),
            ],
            Err(status) => [
                KeyValue::new("model", model.to_string()),
                KeyValue::new("version", ""),
                KeyValue::new("arm", ""),
                KeyValue::new("status", status.to_string()),
            ],
        };
        self.requests.add(1, &attributes);
        if let Ok(d) = answer {
            let [m, v, a, _] = attributes;
            self.granted
                .record(d.granted_limit as f64, &[m.clone(), v.clone(), a.clone()]);
            self.decisions.add(
                1,
                &[
                    m.clone(),
                    v.clone(),
                    a.clone(),
                    KeyValue::new("decision", d.outcome.as_str()),
                ],
            );
            self.limit_changes
                .add(1, &[m, v, a, KeyValue::new("change", limit_change(d))]);
        }
    }

    /// One call answered, after `elapsed`. A batch whose rows went to several versions or
    /// arms has empty `version` and `arm`.
    pub fn call(&self, model: &str, version: &str, arm: &str, status: &str, elapsed: Duration) {
        if !self.on {
            return;
        }
        let attributes = [
            KeyValue::new("model", model.to_string()),
            KeyValue::new("version", version.to_string()),
            KeyValue::new("arm", arm.to_string()),
            KeyValue::new("status", status.to_string()),
        ];
        self.duration.record(elapsed.as_secs_f64(), &attributes);
    }

    /// One decision-log commit of `batch` records.
    pub fn log_commit(&self, batch: usize, elapsed: Duration) {
        if !self.on {
            return;
        }
        self.log_batch.record(batch as u64, &[]);
        self.log_commit.record(elapsed.as_secs_f64(), &[]);
    }

    /// One version load, ready or failed.
    pub fn version_load(&self, model: &str, ready: bool) {
        if !self.on {
            return;
        }
        self.version_loads.add(
            1,
            &[
                KeyValue::new("model", model.to_string()),
                KeyValue::new("outcome", if ready { "ready" } else { "failed" }),
            ],
        );
    }
}

/// Gauges read from the server's state at each export: the open rollouts' shares and
/// guardrail values, the versions loaded per model and state, and how far the decision
/// log's query view trails its writes. They report while the returned handles are kept.
pub fn observe_state(
    registry: Arc<Registry>,
    router: Arc<Router>,
    log: Arc<dyn DecisionLog>,
) -> Vec<ObservableGauge<f64>> {
    let meter = meter();
    let for_rollout = |r: &OpenRollout| {
        vec![
            KeyValue::new("model", r.model.clone()),
            KeyValue::new("rollout.id", r.id.clone()),
            KeyValue::new("candidate", r.candidate.clone()),
        ]
    };
    let share = {
        let router = router.clone();
        meter
            .f64_observable_gauge("riskserve.rollout.share")
            .with_description("The share of customers an open rollout's candidate decides for")
            .with_callback(move |o| {
                for r in router.open_now() {
                    o.observe(r.share_bp as f64 / 10_000.0, &for_rollout(&r));
                }
            })
            .build()
    };
    let guardrails =
        |name: &'static str, what: &'static str, value: fn(&GuardrailReading) -> f64| {
            let router = router.clone();
            meter
                .f64_observable_gauge(name)
                .with_description(what)
                .with_callback(move |o| {
                    for r in router.open_now() {
                        for reading in &r.readings {
                            let mut attributes = for_rollout(&r);
                            attributes.push(KeyValue::new("guardrail", reading.name.clone()));
                            o.observe(value(reading), &attributes);
                        }
                    }
                })
                .build()
        };
    let versions = meter
        .f64_observable_gauge("riskserve.versions")
        .with_description("Versions in the registry, by model and state")
        .with_callback(move |o| {
            for model in registry.list() {
                let mut by_state: BTreeMap<&str, u32> = BTreeMap::new();
                for v in &model.versions {
                    *by_state.entry(v.state.as_str()).or_default() += 1;
                }
                for (state, n) in by_state {
                    let attributes = [
                        KeyValue::new("model", model.name.clone()),
                        KeyValue::new("state", state),
                    ];
                    o.observe(n as f64, &attributes);
                }
            }
        })
        .build();
    vec![
        share,
        guardrails(
            "riskserve.rollout.guardrail",
            "The latest value of each guardrail of an open rollout",
            |r| r.value,
        ),
        guardrails(
            "riskserve.rollout.guardrail.threshold",
            "The threshold each guardrail of an open rollout is held to",
            |r| r.threshold,
        ),
        versions,
        // Memory the tail holds, and what an aggregate waits for: an operator's sign that
        // the indexer does not keep up (BENCHMARKS.md: it trails by up to ~200,000 records
        // under sustained batch load, and catches up within seconds once it eases).
        meter
            .f64_observable_gauge("riskserve.decision_log.view_lag")
            .with_description(
                "Durable decisions the query view does not hold yet (read from memory meanwhile)",
            )
            .with_callback(move |o| {
                if let Some(lag) = log.view_lag() {
                    o.observe(lag as f64, &[]);
                }
            })
            .build(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn nothing_is_exported_unless_an_endpoint_or_exporter_is_named() {
        assert!(!wanted(Signal::Traces, env(&[])).unwrap());
        let endpoint = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")];
        assert!(wanted(Signal::Traces, env(&endpoint)).unwrap());
        assert!(wanted(Signal::Metrics, env(&endpoint)).unwrap());
        let only_traces = [("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")];
        assert!(wanted(Signal::Traces, env(&only_traces)).unwrap());
        assert!(!wanted(Signal::Metrics, env(&only_traces)).unwrap());
        let explicit = [("OTEL_METRICS_EXPORTER", "otlp")];
        assert!(wanted(Signal::Metrics, env(&explicit)).unwrap());
    }

    #[test]
    fn none_and_disabled_turn_a_signal_off_and_other_protocols_are_refused() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317");
        assert!(
            !wanted(
                Signal::Traces,
                env(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")])
            )
            .unwrap()
        );
        assert!(
            !wanted(
                Signal::Metrics,
                env(&[endpoint, ("OTEL_SDK_DISABLED", "true")])
            )
            .unwrap()
        );
        let http = [endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")];
        let err = wanted(Signal::Traces, env(&http)).unwrap_err();
        assert!(err.to_string().contains("gRPC only"), "{err}");
        let zipkin = [endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")];
        assert!(wanted(Signal::Traces, env(&zipkin)).is_err());
        // The signal's own protocol variable wins over the general one.
        let own = [
            endpoint,
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ];
        assert!(wanted(Signal::Traces, env(&own)).unwrap());
    }

    #[test]
    fn limit_changes_are_named_by_what_they_did() {
        let d = |current: Option<i64>, granted: i64| Decision {
            decision_id: uuid::Uuid::nil(),
            request_id: String::new(),
            model: String::new(),
            version: String::new(),
            digest: crate::bundle::BundleDigest::recorded(String::new()),
            probability_of_default: 0.1,
            grade: String::new(),
            outcome: crate::policy::Outcome::Approve,
            current_limit: current,
            granted_limit: granted,
            reasons: Vec::new(),
            arm: crate::rollout::Arm::Champion,
            rollout_id: None,
        };
        assert_eq!(limit_change(&d(None, 10)), "new");
        assert_eq!(limit_change(&d(Some(10), 10)), "unchanged");
        assert_eq!(limit_change(&d(Some(10), 0)), "withdrawn");
        assert_eq!(limit_change(&d(Some(10), 20)), "raised");
        assert_eq!(limit_change(&d(Some(10), 5)), "lowered");
    }
}
