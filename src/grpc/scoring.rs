//! The `riskserve.v1.Scoring` service.

use std::time::Instant;

use tonic::{Code, Request, Response, Status};
use tracing::{Instrument as _, Span};

use crate::grpc::convert::{CallContext, RequestError};
use crate::grpc::pb::{self, scoring_server::Scoring};
use crate::grpc::status::Refusal;
use crate::grpc::telemetry::{Outcome, answered, refused, rpc_span};
use crate::scoring::{Decision, ScoreRequest, Scorer};

/// Serves Score and ScoreBatch through a [`Scorer`].
#[derive(Debug, Clone)]
pub struct ScoringService {
    scorer: Scorer,
    max_batch: usize,
}

impl ScoringService {
    pub fn new(scorer: Scorer, max_batch: usize) -> Self {
        ScoringService { scorer, max_batch }
    }
}

fn item(result: Result<Decision, Refusal>) -> pb::ScoreBatchItem {
    let outcome = match result {
        Ok(decision) => pb::score_batch_item::Outcome::Response(decision.into()),
        Err(refusal) => pb::score_batch_item::Outcome::Error(pb::ItemError {
            code: refusal.code as i32,
            message: refusal.message,
            field: refusal.field.unwrap_or_default(),
        }),
    };
    pb::ScoreBatchItem {
        outcome: Some(outcome),
    }
}

#[tonic::async_trait]
impl Scoring for ScoringService {
    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let span = rpc_span(request.metadata(), "riskserve.v1.Scoring/Score");
        self.score_one(request, &span)
            .instrument(span.clone())
            .await
    }

    async fn score_batch(
        &self,
        request: Request<pb::ScoreBatchRequest>,
    ) -> Result<Response<pb::ScoreBatchResponse>, Status> {
        let span = rpc_span(request.metadata(), "riskserve.v1.Scoring/ScoreBatch");
        self.score_many(request, &span)
            .instrument(span.clone())
            .await
    }
}

impl ScoringService {
    async fn score_one(
        &self,
        request: Request<pb::ScoreRequest>,
        span: &Span,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let started = Instant::now();
        let context = CallContext::of(&request, span);
        let req = match ScoreRequest::try_from(request.into_inner()) {
            Ok(req) => context.apply(req),
            Err(e) => {
                answered(span, &[("", Err(Code::InvalidArgument))], started.elapsed());
                return Err(e.into());
            }
        };
        let result = self.scorer.score(&req).await;
        let outcome = result.as_ref().map_err(|e| Refusal::from(e).code);
        answered(span, &[(&req.model, outcome)], started.elapsed());
        Ok(Response::new(result?.into()))
    }

    async fn score_many(
        &self,
        request: Request<pb::ScoreBatchRequest>,
        span: &Span,
    ) -> Result<Response<pb::ScoreBatchResponse>, Status> {
        let started = Instant::now();
        let context = CallContext::of(&request, span);
        let requests = request.into_inner().requests;
        if requests.len() > self.max_batch {
            refused(span, Code::InvalidArgument);
            return Err(RequestError::new(
                "requests",
                format!(
                    "a batch holds at most {} items, got {}",
                    self.max_batch,
                    requests.len()
                ),
            )
            .into());
        }
        // Each item converted: valid requests move into `valid` (no copy), each slot keeps
        // its request's index there or why it was refused.
        let mut valid: Vec<ScoreRequest> = Vec::with_capacity(requests.len());
        let slots: Vec<Result<usize, RequestError>> = requests
            .into_iter()
            .map(|r| {
                let req = context.apply(ScoreRequest::try_from(r)?);
                valid.push(req);
                Ok(valid.len() - 1)
            })
            .collect();
        let scored = self.scorer.score_many(&valid).await;
        let outcomes: Vec<Outcome<'_>> = slots
            .iter()
            .map(|slot| match slot {
                Err(_) => ("", Err(Code::InvalidArgument)),
                Ok(i) => (
                    valid[*i].model.as_str(),
                    scored[*i].as_ref().map_err(|e| Refusal::from(e).code),
                ),
            })
            .collect();
        answered(span, &outcomes, started.elapsed());
        drop(outcomes);
        let mut results = scored.into_iter();
        let items = slots
            .iter()
            .map(|slot| match slot {
                Err(e) => item(Err(Refusal::from(e))),
                Ok(_) => {
                    let result = results.next().expect("one result per valid request");
                    item(result.map_err(|e| Refusal::from(&e)))
                }
            })
            .collect();
        Ok(Response::new(pb::ScoreBatchResponse { items }))
    }
}
