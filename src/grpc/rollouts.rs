//! The `riskserve.v1.Rollouts` service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::grpc::pb::{self, rollouts_server::Rollouts as RolloutsApi};
use crate::rollout::{Plan, Rollouts};

/// Rollout control over the server's [`Rollouts`].
#[derive(Debug, Clone)]
pub struct RolloutsService {
    rollouts: Arc<Rollouts>,
}

impl RolloutsService {
    pub fn new(rollouts: Arc<Rollouts>) -> Self {
        RolloutsService { rollouts }
    }

    fn status(&self, model: &str) -> Result<Response<pb::RolloutStatus>, Status> {
        Ok(Response::new(self.rollouts.status(model)?.into()))
    }
}

/// Who asked, until authentication names the caller.
fn actor(given: &str) -> String {
    if given.is_empty() {
        "anonymous".into()
    } else {
        given.chars().take(128).collect()
    }
}

fn reason(given: &str, default: &str) -> String {
    if given.is_empty() {
        default.into()
    } else {
        given.chars().take(1024).collect()
    }
}

#[tonic::async_trait]
impl RolloutsApi for RolloutsService {
    async fn start(
        &self,
        request: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let r = request.into_inner();
        let plan: Plan = if r.plan_toml.trim().is_empty() {
            Plan::default()
        } else {
            toml::from_str(&r.plan_toml).map_err(|e| {
                crate::grpc::status::invalid_field(
                    "plan_toml",
                    &format!("plan_toml: {}", e.message()),
                )
            })?
        };
        let status = self
            .rollouts
            .start(&r.model, &r.candidate, plan, &actor(&r.actor))
            .await?;
        Ok(Response::new(status.into()))
    }

    async fn status(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.status(&request.into_inner().model)
    }

    async fn advance(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let r = request.into_inner();
        let figures = self.rollouts.status(&r.model)?.readings;
        self.rollouts
            .advance(
                &r.model,
                &actor(&r.actor),
                &reason(&r.reason, "advanced by hand"),
                figures,
            )
            .await?;
        self.status(&r.model)
    }

    async fn pause(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let r = request.into_inner();
        self.rollouts
            .pause(
                &r.model,
                &actor(&r.actor),
                &reason(&r.reason, "paused by hand"),
            )
            .await?;
        self.status(&r.model)
    }

    async fn resume(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let r = request.into_inner();
        self.rollouts
            .resume(
                &r.model,
                &actor(&r.actor),
                &reason(&r.reason, "resumed by hand"),
            )
            .await?;
        self.status(&r.model)
    }

    async fn rollback(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let r = request.into_inner();
        let figures = self.rollouts.status(&r.model)?.readings;
        self.rollouts
            .rollback(
                &r.model,
                &actor(&r.actor),
                &reason(&r.reason, "rolled back by hand"),
                figures,
            )
            .await?;
        self.status(&r.model)
    }

    async fn promote(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let r = request.into_inner();
        self.rollouts
            .promote(
                &r.model,
                &actor(&r.actor),
                &reason(&r.reason, "promoted by hand"),
            )
            .await?;
        self.status(&r.model)
    }

    async fn list(
        &self,
        _: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let rollouts = self.rollouts.list()?.into_iter().map(Into::into).collect();
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }
}
