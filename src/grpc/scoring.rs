//! The `riskserve.v1.Scoring` service.

use tonic::{Request, Response, Status};

use crate::grpc::convert::CallContext;
use crate::grpc::pb::{self, scoring_server::Scoring};
use crate::grpc::status::Refusal;
use crate::scoring::{Decision, ScoreError, ScoreRequest, Scorer};

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
        let context = CallContext::of(&request);
        let req = context.apply(ScoreRequest::try_from(request.into_inner())?);
        let decision = self.scorer.score(&req).await?;
        Ok(Response::new(decision.into()))
    }

    async fn score_batch(
        &self,
        request: Request<pb::ScoreBatchRequest>,
    ) -> Result<Response<pb::ScoreBatchResponse>, Status> {
        let context = CallContext::of(&request);
        let requests = request.into_inner().requests;
        if requests.len() > self.max_batch {
            return Err(Status::invalid_argument(format!(
                "requests: a batch holds at most {} items, got {}",
                self.max_batch,
                requests.len()
            )));
        }
        let converted: Vec<_> = requests
            .into_iter()
            .map(|r| ScoreRequest::try_from(r).map(|r| context.apply(r)))
            .collect();
        let valid: Vec<ScoreRequest> = converted.iter().filter_map(|r| r.clone().ok()).collect();
        let mut scored = self.scorer.score_many(&valid).await.into_iter();
        let items = converted
            .iter()
            .map(|c| match c {
                Err(e) => item(Err(Refusal::from(e))),
                Ok(_) => {
                    let result = scored.next().expect("one result per valid request");
                    item(result.map_err(|e: ScoreError| Refusal::from(&e)))
                }
            })
            .collect();
        Ok(Response::new(pb::ScoreBatchResponse { items }))
    }
}
