//! The Open Inference Protocol (KServe v2) service, `inference.GRPCInferenceService`.
//!
//! A ModelInfer request is turned into one [`ScoreRequest`] per row and goes down the same
//! path as Score (route → validate → score → policy → record), so a decision made through
//! this protocol is routed, recorded, replayable and traced exactly like any other. Two
//! differences follow from the protocol:
//! - The features come as one FP64 (or FP32, widened exactly) tensor `[batch, n_features]`
//!   whose columns are the serving version's schema order, as ModelMetadata announces; each
//!   row is judged by name against the schema of the version it is routed to, like Score's
//!   feature map. A tensor cannot leave a value out, so NaN in a column whose feature allows
//!   missing values (`missing = "allowed"`) is that feature left out; anywhere else NaN is
//!   refused as not finite.
//! - The protocol has no per-row errors, so a batch is decided whole or not at all: a refused
//!   row fails the call and nothing of it is recorded ([`Scorer::score_all`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use std::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument as _, Span};

use crate::decision_log::LogError;
use crate::grpc::convert::{CallContext, RequestError, current_limit, required_id};
use crate::grpc::status::Refusal;
use crate::grpc::telemetry::{Outcome, answered, rpc_span};
use crate::grpc::v2::{
    self, InferParameter, grpc_inference_service_server::GrpcInferenceService,
    infer_parameter::ParameterChoice, model_infer_response::InferOutputTensor,
    model_metadata_response::TensorMetadata,
};
use crate::registry::{Registry, VersionState};
use crate::schema::RawValue;
use crate::scoring::{Decision, ScoreError, ScoreRequest, Scorer};

/// The one input a model takes.
pub const INPUT: &str = "features";

/// The outputs of ModelInfer, each a `[batch]` tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    ProbabilityOfDefault,
    Grade,
    Decision,
    GrantedLimit,
    Version,
    DecisionId,
    Arm,
}

impl Output {
    /// In the order ModelMetadata announces and ModelInfer returns them by default.
    const ALL: [Output; 7] = [
        Output::ProbabilityOfDefault,
        Output::Grade,
        Output::Decision,
        Output::GrantedLimit,
        Output::Version,
        Output::DecisionId,
        Output::Arm,
    ];

    fn name(self) -> &'static str {
        match self {
            Output::ProbabilityOfDefault => "probability_of_default",
            Output::Grade => "grade",
            Output::Decision => "decision",
            Output::GrantedLimit => "granted_limit",
            Output::Version => "version",
            Output::DecisionId => "decision_id",
            Output::Arm => "arm",
        }
    }

    fn datatype(self) -> &'static str {
        match self {
            Output::ProbabilityOfDefault => "FP64",
            Output::GrantedLimit => "INT64",
            Output::Grade
            | Output::Decision
            | Output::Version
            | Output::DecisionId
            | Output::Arm => "BYTES",
        }
    }

    /// The column, little-endian; a BYTES element is its length (u32) then its bytes.
    fn raw(self, decisions: &[Decision]) -> Vec<u8> {
        let bytes = |f: &dyn Fn(&Decision) -> String| {
            let mut out = Vec::new();
            for d in decisions {
                let s = f(d);
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            out
        };
        match self {
            Output::ProbabilityOfDefault => decisions
                .iter()
                .flat_map(|d| d.probability_of_default.to_le_bytes())
                .collect(),
            Output::GrantedLimit => decisions
                .iter()
                .flat_map(|d| d.granted_limit.to_le_bytes())
                .collect(),
            Output::Grade => bytes(&|d| d.grade.clone()),
            Output::Decision => bytes(&|d| d.outcome.as_str().to_string()),
            Output::Version => bytes(&|d| d.version.clone()),
            Output::DecisionId => bytes(&|d| d.decision_id.to_string()),
            Output::Arm => bytes(&|d| d.arm.as_str().to_string()),
        }
    }
}

/// Serves the inference protocol through the same [`Scorer`] as Score.
#[derive(Debug, Clone)]
pub struct InferenceService {
    scorer: Scorer,
    registry: Arc<Registry>,
    log_healthy: watch::Receiver<bool>,
    /// Cancelled when the server starts shutting down: no longer ready from then on.
    draining: CancellationToken,
    max_batch: usize,
}

impl InferenceService {
    pub fn new(
        scorer: Scorer,
        registry: Arc<Registry>,
        log_healthy: watch::Receiver<bool>,
        draining: CancellationToken,
        max_batch: usize,
    ) -> Self {
        InferenceService {
            scorer,
            registry,
            log_healthy,
            draining,
            max_batch,
        }
    }

    /// Whether decisions can be made and recorded now, whatever the model.
    fn accepting(&self) -> bool {
        !self.draining.is_cancelled() && *self.log_healthy.borrow()
    }

    /// The columns a model's inputs are announced in: its serving version's schema.
    fn columns(&self, model: &str) -> Result<Vec<Column>, Status> {
        let bundle = self.registry.serving(model)?;
        Ok(bundle
            .schema
            .features()
            .iter()
            .map(|f| Column {
                name: f.name.clone(),
                nan_is_missing: f.allows_missing(),
            })
            .collect())
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<v2::ServerLiveRequest>,
    ) -> Result<Response<v2::ServerLiveResponse>, Status> {
        Ok(Response::new(v2::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<v2::ServerReadyRequest>,
    ) -> Result<Response<v2::ServerReadyResponse>, Status> {
        let ready = self.accepting() && self.registry.is_ready();
        Ok(Response::new(v2::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<v2::ModelReadyRequest>,
    ) -> Result<Response<v2::ModelReadyResponse>, Status> {
        let v2::ModelReadyRequest { name, version } = request.into_inner();
        if name.is_empty() {
            return Err(RequestError::required("name").into());
        }
        // Unknown models and versions are simply not ready: that is the question asked.
        let ready = if version.is_empty() {
            self.registry.serving(&name).is_ok() && *self.log_healthy.borrow()
        } else {
            self.registry
                .info(&name, &version)
                .is_ok_and(|v| matches!(v.state, VersionState::Ready | VersionState::Serving))
        };
        Ok(Response::new(v2::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<v2::ServerMetadataRequest>,
    ) -> Result<Response<v2::ServerMetadataResponse>, Status> {
        Ok(Response::new(v2::ServerMetadataResponse {
            name: "riskserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<v2::ModelMetadataRequest>,
    ) -> Result<Response<v2::ModelMetadataResponse>, Status> {
        let v2::ModelMetadataRequest { name, version } = request.into_inner();
        if name.is_empty() {
            return Err(RequestError::required("name").into());
        }
        let bundle = if version.is_empty() {
            self.registry.serving(&name)?
        } else {
            let info = self.registry.info(&name, &version)?;
            info.bundle
                .ok_or(crate::registry::RegistryError::NotReady {
                    model: name.clone(),
                    version: version.clone(),
                    state: info.state.as_str(),
                })?
        };
        let versions = self
            .registry
            .list()
            .into_iter()
            .filter(|m| m.name == name)
            .flat_map(|m| m.versions)
            .filter(|v| matches!(v.state, VersionState::Ready | VersionState::Serving))
            .map(|v| v.version)
            .collect();
        let columns = bundle.schema.names();
        Ok(Response::new(v2::ModelMetadataResponse {
            name,
            versions,
            platform: "riskserve".into(),
            inputs: vec![TensorMetadata {
                name: INPUT.into(),
                datatype: "FP64".into(),
                shape: vec![-1, columns.len() as i64],
                columns,
            }],
            outputs: Output::ALL
                .iter()
                .map(|o| TensorMetadata {
                    name: o.name().into(),
                    datatype: o.datatype().into(),
                    shape: vec![-1],
                    columns: Vec::new(),
                })
                .collect(),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<v2::ModelInferRequest>,
    ) -> Result<Response<v2::ModelInferResponse>, Status> {
        let span = rpc_span(
            request.metadata(),
            "inference.GRPCInferenceService/ModelInfer",
        );
        self.infer(request, &span).instrument(span.clone()).await
    }
}

impl InferenceService {
    async fn infer(
        &self,
        request: Request<v2::ModelInferRequest>,
        span: &Span,
    ) -> Result<Response<v2::ModelInferResponse>, Status> {
        let started = Instant::now();
        let context = CallContext::of(&request, span);
        let request = request.into_inner();
        let model = request.model_name.clone();
        let parsed = if model.is_empty() {
            Err(RequestError::required("model_name").into())
        } else {
            self.columns(&model)
                .and_then(|columns| Ok(InferRequest::parse(request, &columns, self.max_batch)?))
        };
        let infer = match parsed {
            Ok(infer) => infer,
            Err(status) => {
                answered(span, &[(&model, Err(status.code()))], started.elapsed());
                return Err(status);
            }
        };
        let rows: Vec<ScoreRequest> = infer.rows.into_iter().map(|r| context.apply(r)).collect();
        match self.scorer.score_all(&rows).await {
            Ok(decisions) => {
                let outcomes: Vec<Outcome<'_>> =
                    decisions.iter().map(|d| (model.as_str(), Ok(d))).collect();
                answered(span, &outcomes, started.elapsed());
                Ok(Response::new(respond(
                    infer.model,
                    infer.id,
                    &infer.outputs,
                    &decisions,
                )))
            }
            Err(refusal) => {
                let status = row_refusal(refusal);
                answered(span, &[(&model, Err(status.code()))], started.elapsed());
                Err(status)
            }
        }
    }
}

/// A refused row: its features are named by row and column, a clash of its recorded id by
/// the request's `id`; other refusals concern the whole call.
fn row_refusal((row, e): (usize, ScoreError)) -> Status {
    let mut refusal = Refusal::from(&e);
    let field = match &e {
        ScoreError::Feature(f) => Some(format!("{INPUT}[{row}].{}", f.feature)),
        ScoreError::Record(LogError::RequestIdReused(_)) => Some("id".to_string()),
        _ => None,
    };
    if let Some(field) = field {
        refusal.field = Some(field);
        refusal.message = format!("row {row}: {}", refusal.message);
    }
    refusal.into()
}

/// A ModelInfer request whose own fields are well formed; its features are not yet judged.
#[derive(Debug)]
struct InferRequest {
    model: String,
    id: String,
    rows: Vec<ScoreRequest>,
    /// The outputs to return, in the caller's order (all of them when it named none).
    outputs: Vec<Output>,
}

fn invalid(field: impl Into<String>, rule: impl Into<String>) -> RequestError {
    RequestError {
        field: field.into(),
        rule: rule.into(),
    }
}

/// A column of the input tensor.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    /// NaN in this column means the feature was left out.
    nan_is_missing: bool,
}

/// The element types the input tensor may have.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Element {
    Fp64,
    Fp32,
}

impl Element {
    fn size(self) -> usize {
        match self {
            Element::Fp64 => 8,
            Element::Fp32 => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Element::Fp64 => "FP64",
            Element::Fp32 => "FP32",
        }
    }
}

impl InferRequest {
    /// Checks the request's own fields and splits the tensor into one request per row, each
    /// row's values named by `columns`.
    fn parse(
        req: v2::ModelInferRequest,
        columns: &[Column],
        max_batch: usize,
    ) -> Result<InferRequest, RequestError> {
        if !req.model_version.is_empty() {
            return Err(invalid(
                "model_version",
                "must be empty: riskserve routes each customer to a version (see the \
                 \"version\" output)",
            ));
        }
        // The protocol makes the id optional; a decision still needs one to be recorded.
        let id = if req.id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            req.id
        };
        let [input] = req.inputs.as_slice() else {
            return Err(invalid(
                "inputs",
                format!(
                    "must hold exactly one tensor, \"{INPUT}\"; got {}",
                    req.inputs.len()
                ),
            ));
        };
        if input.name != INPUT {
            return Err(invalid(
                "inputs[0].name",
                format!("must be \"{INPUT}\", got {:?}", input.name),
            ));
        }
        let element = match input.datatype.as_str() {
            "FP64" => Element::Fp64,
            "FP32" => Element::Fp32,
            other => {
                return Err(invalid(
                    "inputs[0].datatype",
                    format!("must be FP64 or FP32, got {other:?}"),
                ));
            }
        };
        let n = columns.len();
        let batch = match input.shape.as_slice() {
            [b, c] if *c == n as i64 && *b >= 1 && *b as u64 <= max_batch as u64 => *b as usize,
            _ => {
                return Err(invalid(
                    "inputs[0].shape",
                    format!(
                        "must be [batch, {n}] with 1 ≤ batch ≤ {max_batch}, got {:?}",
                        input.shape
                    ),
                ));
            }
        };
        let values = tensor_values(input, element, &req.raw_input_contents, batch * n)?;
        let customers = customers(&req.parameters, batch)?;
        let outputs = requested_outputs(&req.outputs)?;

        let mut rows = Vec::with_capacity(batch);
        for (i, ((customer_id, limit), row)) in
            customers.into_iter().zip(values.chunks(n)).enumerate()
        {
            rows.push(ScoreRequest {
                request_id: required_id("id", format!("{id}/{i}"))?,
                customer_id,
                model: req.model_name.clone(),
                features: columns
                    .iter()
                    .zip(row)
                    .filter(|(c, x)| !(c.nan_is_missing && x.is_nan()))
                    .map(|(c, x)| (c.name.clone(), RawValue::Number(*x)))
                    .collect(),
                current_limit: limit,
                caller: None,
                deadline: None,
                trace_id: None,
            });
        }
        Ok(InferRequest {
            model: req.model_name,
            id,
            rows,
            outputs,
        })
    }
}

/// The input's `count` values, from raw contents (little-endian) or typed contents, FP32
/// widened to f64 (exactly: every f32 is an f64).
fn tensor_values(
    input: &v2::model_infer_request::InferInputTensor,
    element: Element,
    raw: &[Vec<u8>],
    count: usize,
) -> Result<Vec<f64>, RequestError> {
    let typed: Option<(Vec<f64>, &'static str)> = input.contents.as_ref().map(|c| match element {
        Element::Fp64 => (c.fp64_contents.clone(), "inputs[0].contents.fp64_contents"),
        Element::Fp32 => (
            c.fp32_contents.iter().map(|&x| f64::from(x)).collect(),
            "inputs[0].contents.fp32_contents",
        ),
    });
    let size = element.size();
    match (raw, typed) {
        ([], Some((typed, _))) if typed.len() == count => Ok(typed),
        ([], Some((typed, field))) => Err(invalid(
            field,
            format!(
                "must hold {count} values (the shape's), got {}",
                typed.len()
            ),
        )),
        ([], None) => Err(invalid(
            "inputs[0].contents",
            "is required (or raw_input_contents)",
        )),
        ([bytes], None) if bytes.len() == count * size => Ok(match element {
            Element::Fp64 => bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8")))
                .collect(),
            Element::Fp32 => bytes
                .chunks_exact(4)
                .map(|b| f64::from(f32::from_le_bytes(b.try_into().expect("chunks of 4"))))
                .collect(),
        }),
        ([bytes], None) => Err(invalid(
            "raw_input_contents[0]",
            format!(
                "must hold {count} {} values ({} bytes), got {} bytes",
                element.name(),
                count * size,
                bytes.len()
            ),
        )),
        ([_], Some(_)) => Err(invalid(
            "inputs[0].contents",
            "must be empty when raw_input_contents is given",
        )),
        (more, _) => Err(invalid(
            "raw_input_contents",
            format!("must hold one entry per input (1), got {}", more.len()),
        )),
    }
}

/// Each row's customer id and current limit, from the request parameters: `customer_id`
/// and `current_limit` for a single row, or `customer_ids` and `current_limits` as JSON
/// arrays for any batch.
fn customers(
    params: &BTreeMap<String, InferParameter>,
    batch: usize,
) -> Result<Vec<(String, Option<i64>)>, RequestError> {
    let string = |name: &str| -> Result<Option<&str>, RequestError> {
        match params.get(name).and_then(|p| p.parameter_choice.as_ref()) {
            None => Ok(None),
            Some(ParameterChoice::StringParam(s)) => Ok(Some(s)),
            Some(_) => Err(invalid(format!("parameters.{name}"), "must be a string")),
        }
    };
    let one_or_many = |one: &str, many: &str| {
        if params.contains_key(one) && params.contains_key(many) {
            return Err(invalid(
                format!("parameters.{many}"),
                format!("give {one} or {many}, not both"),
            ));
        }
        if params.contains_key(one) && batch != 1 {
            return Err(invalid(
                format!("parameters.{one}"),
                format!("is for a single row; this batch has {batch}: use {many}"),
            ));
        }
        Ok(())
    };
    one_or_many("customer_id", "customer_ids")?;
    one_or_many("current_limit", "current_limits")?;

    let ids: Vec<String> = match (string("customer_id")?, string("customer_ids")?) {
        (Some(id), _) => vec![id.to_string()],
        (None, Some(json)) => json_array(json, "customer_ids", batch)?,
        (None, None) => {
            return Err(invalid(
                "parameters.customer_ids",
                "is required: a JSON array of the rows' customer ids (or customer_id for one row)",
            ));
        }
    };
    let limits: Vec<Option<i64>> = match params
        .get("current_limit")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(ParameterChoice::Int64Param(limit)) => vec![Some(*limit)],
        Some(_) => {
            return Err(invalid(
                "parameters.current_limit",
                "must be an int64 parameter",
            ));
        }
        None => match string("current_limits")? {
            Some(json) => json_array(json, "current_limits", batch)?,
            None => vec![None; batch],
        },
    };
    ids.into_iter()
        .zip(limits)
        .enumerate()
        .map(|(i, (id, limit))| {
            let id = required_id(&format!("parameters.customer_ids[{i}]"), id)?;
            let limit = current_limit(&format!("parameters.current_limits[{i}]"), limit)?;
            Ok((id, limit))
        })
        .collect()
}

/// A JSON array of exactly `len` items.
fn json_array<T: serde::de::DeserializeOwned>(
    json: &str,
    name: &str,
    len: usize,
) -> Result<Vec<T>, RequestError> {
    let field = format!("parameters.{name}");
    let items: Vec<T> = serde_json::from_str(json)
        .map_err(|e| invalid(&field, format!("must be a JSON array of this kind: {e}")))?;
    if items.len() != len {
        return Err(invalid(
            field,
            format!("must have one item per row ({len}), got {}", items.len()),
        ));
    }
    Ok(items)
}

fn requested_outputs(
    requested: &[v2::model_infer_request::InferRequestedOutputTensor],
) -> Result<Vec<Output>, RequestError> {
    if requested.is_empty() {
        return Ok(Output::ALL.to_vec());
    }
    requested
        .iter()
        .enumerate()
        .map(|(i, o)| {
            Output::ALL
                .into_iter()
                .find(|known| known.name() == o.name)
                .ok_or_else(|| {
                    let known: Vec<&str> = Output::ALL.iter().map(|k| k.name()).collect();
                    invalid(
                        format!("outputs[{i}].name"),
                        format!("unknown output {:?}; known: {}", o.name, known.join(", ")),
                    )
                })
        })
        .collect()
}

/// The response: each requested output as a `[batch]` tensor in raw little-endian contents.
fn respond(
    model: String,
    id: String,
    outputs: &[Output],
    decisions: &[Decision],
) -> v2::ModelInferResponse {
    let first = decisions.first().map(|d| d.version.as_str());
    let model_version = if decisions.iter().all(|d| Some(d.version.as_str()) == first) {
        first.unwrap_or_default().to_string()
    } else {
        String::new()
    };
    let tensors = outputs
        .iter()
        .map(|o| InferOutputTensor {
            name: o.name().to_string(),
            datatype: o.datatype().to_string(),
            shape: vec![decisions.len() as i64],
            parameters: BTreeMap::new(),
            contents: None,
        })
        .collect();
    v2::ModelInferResponse {
        model_name: model,
        model_version,
        id,
        parameters: BTreeMap::new(),
        outputs: tensors,
        raw_output_contents: outputs.iter().map(|o| o.raw(decisions)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::v2::model_infer_request::InferInputTensor;

    fn string(s: &str) -> InferParameter {
        InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam(s.into())),
        }
    }

    fn int(i: i64) -> InferParameter {
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(i)),
        }
    }

    fn request(
        batch: i64,
        values: &[f64],
        params: &[(&str, InferParameter)],
    ) -> v2::ModelInferRequest {
        v2::ModelInferRequest {
            model_name: "m".into(),
            id: "r".into(),
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            inputs: vec![InferInputTensor {
                name: INPUT.into(),
                datatype: "FP64".into(),
                shape: vec![batch, 2],
                ..Default::default()
            }],
            raw_input_contents: vec![values.iter().flat_map(|x| x.to_le_bytes()).collect()],
            ..Default::default()
        }
    }

    fn columns() -> Vec<Column> {
        ["A", "B"]
            .map(|name| Column {
                name: name.into(),
                nan_is_missing: name == "B",
            })
            .to_vec()
    }

    #[test]
    fn rows_take_their_columns_ids_limits_and_numbered_request_ids() {
        let req = request(
            2,
            &[1.0, 2.0, 3.0, 4.5],
            &[
                ("customer_ids", string(r#"["c1", "c2"]"#)),
                ("current_limits", string("[100, null]")),
            ],
        );
        let parsed = InferRequest::parse(req, &columns(), 10).unwrap();
        let [a, b] = parsed.rows.as_slice() else {
            panic!("two rows")
        };
        assert_eq!(
            (a.request_id.as_str(), b.request_id.as_str()),
            ("r/0", "r/1")
        );
        assert_eq!(
            (a.customer_id.as_str(), b.customer_id.as_str()),
            ("c1", "c2")
        );
        assert_eq!((a.current_limit, b.current_limit), (Some(100), None));
        assert_eq!(b.features["A"], RawValue::Number(3.0));
        assert_eq!(b.features["B"], RawValue::Number(4.5));
        assert_eq!(parsed.outputs, Output::ALL);
    }

    #[test]
    fn one_row_takes_single_parameters_and_many_rows_refuse_them() {
        let one = request(
            1,
            &[1.0, 2.0],
            &[("customer_id", string("c1")), ("current_limit", int(5))],
        );
        let parsed = InferRequest::parse(one, &columns(), 10).unwrap();
        assert_eq!(parsed.rows[0].current_limit, Some(5));

        let two = request(2, &[1.0, 2.0, 3.0, 4.0], &[("customer_id", string("c1"))]);
        let err = InferRequest::parse(two, &columns(), 10).unwrap_err();
        assert_eq!(err.field, "parameters.customer_id");

        let both = request(
            1,
            &[1.0, 2.0],
            &[
                ("customer_id", string("c1")),
                ("customer_ids", string(r#"["c1"]"#)),
            ],
        );
        let err = InferRequest::parse(both, &columns(), 10).unwrap_err();
        assert_eq!(err.field, "parameters.customer_ids");

        let wrong_type = request(1, &[1.0, 2.0], &[("customer_id", int(7))]);
        let err = InferRequest::parse(wrong_type, &columns(), 10).unwrap_err();
        assert_eq!(err.rule, "must be a string");
    }

    #[test]
    fn the_batch_limit_and_bad_ids_are_refused_before_anything_is_scored() {
        let ids = |n: usize| {
            let v: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
            string(&serde_json::to_string(&v).unwrap())
        };
        let big = request(3, &[0.0; 6], &[("customer_ids", ids(3))]);
        let err = InferRequest::parse(big, &columns(), 2).unwrap_err();
        assert_eq!(err.field, "inputs[0].shape");
        assert!(err.rule.contains("1 ≤ batch ≤ 2"), "{}", err.rule);

        let empty_id = request(1, &[0.0; 2], &[("customer_ids", string(r#"[""]"#))]);
        let err = InferRequest::parse(empty_id, &columns(), 2).unwrap_err();
        assert_eq!(err.field, "parameters.customer_ids[0]");

        let mut long_id = request(1, &[0.0; 2], &[("customer_ids", ids(1))]);
        long_id.id = "x".repeat(127);
        let err = InferRequest::parse(long_id, &columns(), 2).unwrap_err();
        assert_eq!(err.field, "id", "the row's id \"<id>/0\" is over 128 bytes");
    }

    #[test]
    fn raw_and_typed_contents_must_match_the_shape_and_not_both_be_given() {
        let mut both = request(1, &[0.0; 2], &[("customer_id", string("c"))]);
        both.inputs[0].contents = Some(v2::InferTensorContents {
            fp64_contents: vec![0.0; 2],
            ..Default::default()
        });
        let err = InferRequest::parse(both, &columns(), 2).unwrap_err();
        assert_eq!(err.field, "inputs[0].contents");

        let mut typed = request(1, &[], &[("customer_id", string("c"))]);
        typed.raw_input_contents.clear();
        typed.inputs[0].contents = Some(v2::InferTensorContents {
            fp64_contents: vec![0.0; 3],
            ..Default::default()
        });
        let err = InferRequest::parse(typed, &columns(), 2).unwrap_err();
        assert_eq!(err.field, "inputs[0].contents.fp64_contents");
    }

    #[test]
    fn fp32_is_widened_exactly_and_nan_is_missing_only_where_the_schema_allows() {
        let mut req = request(2, &[], &[("customer_ids", string(r#"["c1", "c2"]"#))]);
        req.inputs[0].datatype = "FP32".into();
        let values = [0.1f32, f32::NAN, f32::NAN, 2.5];
        req.raw_input_contents = vec![values.iter().flat_map(|x| x.to_le_bytes()).collect()];
        let parsed = InferRequest::parse(req.clone(), &columns(), 10).unwrap();
        let [a, b] = parsed.rows.as_slice() else {
            panic!("two rows")
        };
        assert_eq!(a.features["A"], RawValue::Number(f64::from(0.1f32)));
        assert!(!a.features.contains_key("B"), "NaN in B is B left out");
        let RawValue::Number(x) = b.features["A"] else {
            panic!("A is a number")
        };
        assert!(x.is_nan(), "NaN in A stays, for the schema to refuse");
        assert_eq!(b.features["B"], RawValue::Number(2.5));

        req.raw_input_contents = vec![vec![0; 12]];
        let err = InferRequest::parse(req.clone(), &columns(), 10).unwrap_err();
        assert_eq!(err.field, "raw_input_contents[0]");
        assert!(
            err.rule.contains("4 FP32 values (16 bytes)"),
            "{}",
            err.rule
        );
        req.inputs[0].datatype = "INT64".into();
        let err = InferRequest::parse(req, &columns(), 10).unwrap_err();
        assert_eq!(err.field, "inputs[0].datatype");
    }

    #[test]
    fn bytes_outputs_are_length_prefixed() {
        let d = |version: &str| Decision {
            decision_id: uuid::Uuid::nil(),
            request_id: "r".into(),
            model: "m".into(),
            version: version.into(),
            digest: crate::bundle::BundleDigest::recorded("sha256:00".into()),
            probability_of_default: 0.25,
            grade: "B".into(),
            outcome: crate::policy::Outcome::Approve,
            current_limit: None,
            granted_limit: 7,
            reasons: Vec::new(),
            arm: crate::rollout::Arm::Champion,
            rollout_id: None,
        };
        let decisions = [d("v1"), d("v10")];
        assert_eq!(
            Output::Version.raw(&decisions),
            b"\x02\0\0\0v1\x03\0\0\0v10".to_vec()
        );
        assert_eq!(
            Output::GrantedLimit.raw(&decisions)[..8],
            7i64.to_le_bytes()
        );
        let r = respond("m".into(), "r".into(), &[Output::Grade], &decisions);
        assert_eq!(r.model_version, "", "rows decided by two versions");
        assert_eq!(r.outputs[0].shape, [2]);
    }
}
