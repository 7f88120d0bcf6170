//! The `riskserve.v1.Scoring` service.

use tonic::{Request, Response, Status};

use crate::grpc::pb::{self, scoring_server::Scoring};
use crate::grpc::status::Refusal;
use crate::scoring::{ScoreError, ScoreRequest, Scorer};

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

    fn score_one(&self, req: pb::ScoreRequest) -> Result<pb::ScoreResponse, Refusal> {
        let req = ScoreRequest::try_from(req).map_err(|e| Refusal::from(&e))?;
        let decision = self
            .scorer
            .score(&req)
            .map_err(|e: ScoreError| Refusal::from(&e))?;
        Ok(decision.into())
    }
}

#[tonic::async_trait]
impl Scoring for ScoringService {
    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let response = self.score_one(request.into_inner())?;
        Ok(Response::new(response))
    }

    async fn score_batch(
        &self,
        request: Request<pb::ScoreBatchRequest>,
    ) -> Result<Response<pb::ScoreBatchResponse>, Status> {
        let requests = request.into_inner().requests;
        if requests.len() > self.max_batch {
            return Err(Status::invalid_argument(format!(
                "requests: a batch holds at most {} items, got {}",
                self.max_batch,
                requests.len()
            )));
        }
        let items = requests
            .into_iter()
            .map(|req| {
                let outcome = match self.score_one(req) {
                    Ok(response) => pb::score_batch_item::Outcome::Response(response),
                    Err(refusal) => pb::score_batch_item::Outcome::Error(pb::ItemError {
                        code: refusal.code as i32,
                        message: refusal.message,
                        field: refusal.field.unwrap_or_default(),
                    }),
                };
                pb::ScoreBatchItem {
                    outcome: Some(outcome),
                }
            })
            .collect();
        Ok(Response::new(pb::ScoreBatchResponse { items }))
    }
}
