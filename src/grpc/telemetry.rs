//! What the edge tells telemetry of each scoring call: its span, continuing the caller's
//! trace (W3C `traceparent` in the gRPC metadata), and once answered, the span's attributes
//! and the request metrics.

use std::time::Duration;

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{Status as SpanStatus, TraceContextExt as _};
use tonic::Code;
use tonic::metadata::{KeyRef, MetadataMap};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::scoring::Decision;
use crate::telemetry::{SPAN_TARGET, metrics};

/// Reads W3C trace context from gRPC metadata.
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The span of one RPC, a child of the caller's trace when it sent a `traceparent`. Disabled
/// (and free) when traces are not exported.
pub fn rpc_span(metadata: &MetadataMap, method: &'static str) -> Span {
    let span = tracing::debug_span!(
        target: SPAN_TARGET,
        "rpc",
        otel.name = method,
        otel.kind = "server",
        rpc.system = "grpc",
    );
    if !span.is_disabled() {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&MetadataExtractor(metadata))
        });
        // Fails only for a span that has already started a trace of its own; this one has not.
        let _ = span.set_parent(parent);
    }
    span
}

/// The trace id of `span` (the caller's, when it continued one), when traces are exported.
pub fn span_trace_id(span: &Span) -> Option<String> {
    // Without an exporter the span is disabled and has no trace: skip the context lookup.
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// One customer's outcome in a call: the model asked for, and the decision or the refusal.
pub type Outcome<'a> = (&'a str, Result<&'a Decision, Code>);

/// Records what a call decided, one outcome per customer it asked about: the request
/// metrics, and the span's attributes (the decision's own for a one-customer call).
pub fn answered(span: &Span, outcomes: &[Outcome<'_>], took: Duration) {
    // A model that does not exist is no label: callers could otherwise mint series.
    fn label<'a>((model, outcome): &Outcome<'a>) -> &'a str {
        if matches!(outcome, Err(Code::NotFound)) {
            ""
        } else {
            model
        }
    }
    for outcome in outcomes {
        metrics().request(label(outcome), outcome.1.map_err(code_name));
    }
    let uniform = |f: fn(&Decision) -> &str| {
        let mut values = outcomes.iter().map(|(_, o)| o.map_or("", f));
        let first = values.next().unwrap_or("");
        if values.all(|v| v == first) {
            first
        } else {
            ""
        }
    };
    let status = match outcomes {
        [(_, Err(code))] => code_name(*code),
        _ => "OK",
    };
    metrics().call(
        outcomes.first().map_or("", label),
        uniform(|d| d.version.as_str()),
        uniform(|d| d.arm.as_str()),
        status,
        took,
    );
    if span.is_disabled() {
        return;
    }
    match outcomes {
        [(model, Ok(d))] => {
            span.set_attribute("model.name", model.to_string());
            span.set_attribute("model.version", d.version.clone());
            span.set_attribute("model.digest", d.digest.to_string());
            if let Some(id) = &d.rollout_id {
                span.set_attribute("rollout.id", id.clone());
            }
            span.set_attribute("rollout.arm", d.arm.as_str());
            span.set_attribute("decision", d.outcome.as_str());
            span.set_attribute("grade", d.grade.clone());
        }
        [(model, Err(code))] => {
            span.set_attribute("model.name", model.to_string());
            refused(span, *code);
        }
        many => {
            if let Some((model, _)) = many.first() {
                span.set_attribute("model.name", model.to_string());
            }
            span.set_attribute("batch.size", many.len() as i64);
            let failed = many.iter().filter(|(_, o)| o.is_err()).count();
            span.set_attribute("batch.refused", failed as i64);
        }
    }
}

/// Marks the span of a refused call.
pub fn refused(span: &Span, code: Code) {
    span.set_attribute("rpc.grpc.status_code", code as i64);
    span.set_status(SpanStatus::error(code_name(code)));
}

/// The gRPC status name, as the metrics label it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
