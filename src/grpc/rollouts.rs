//! The `riskserve.v1.Rollouts` service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::backtest::{BacktestSpec, Backtester};
use crate::grpc::convert::{RequestError, remediate_spec};
use crate::grpc::gate::auth::Caller;
use crate::grpc::pb::{self, rollouts_server::Rollouts as RolloutsApi};
use crate::grpc::to_the_end;
use crate::remediation::Remediator;
use crate::rollout::{Control, History, Plan, Thresholds};
use crate::trace::parse_bound;

/// Rollout control, status, previews and remediation over the server's rollout parts.
#[derive(Debug, Clone)]
pub struct RolloutsService {
    control: Arc<Control>,
    history: Arc<History>,
    backtester: Arc<Backtester>,
    remediator: Arc<Remediator>,
}

impl RolloutsService {
    pub fn new(
        control: Arc<Control>,
        history: Arc<History>,
        backtester: Arc<Backtester>,
        remediator: Arc<Remediator>,
    ) -> Self {
        RolloutsService {
            control,
            history,
            backtester,
            remediator,
        }
    }

    fn status(&self, model: &str) -> Result<Response<pb::RolloutStatus>, Status> {
        Ok(Response::new(self.history.status(model)?.into()))
    }
}

/// Who asked: the authenticated caller, or on an open development server (no credentials
/// configured, loopback only) the actor the client named.
fn actor<T>(request: &Request<T>, given: &str) -> String {
    match request.extensions().get::<Caller>() {
        Some(c) if c.name != "anonymous" => c.name.clone(),
        _ if given.is_empty() => "anonymous".into(),
        _ => given.chars().take(128).collect(),
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
        let who = actor(&request, &request.get_ref().actor);
        let r = request.into_inner();
        let plan: Plan = if r.plan_toml.trim().is_empty() {
            Plan::default()
        } else {
            toml::from_str(&r.plan_toml).map_err(|e| RequestError::new("plan_toml", e.message()))?
        };
        let (control, model) = (self.control.clone(), r.model.clone());
        to_the_end(async move {
            control
                .start(&r.model, &r.candidate, plan, &who, r.skip_backtest)
                .await
        })
        .await?;
        self.status(&model)
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
        let who = actor(&request, &request.get_ref().actor);
        let r = request.into_inner();
        let figures = self.history.status(&r.model)?.readings;
        let (control, model) = (self.control.clone(), r.model.clone());
        let why = reason(&r.reason, "advanced by hand");
        to_the_end(async move { control.advance(&model, None, &who, &why, figures).await }).await?;
        self.status(&r.model)
    }

    async fn pause(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let who = actor(&request, &request.get_ref().actor);
        let r = request.into_inner();
        let (control, model) = (self.control.clone(), r.model.clone());
        let why = reason(&r.reason, "paused by hand");
        to_the_end(async move { control.pause(&model, &who, &why).await }).await?;
        self.status(&r.model)
    }

    async fn resume(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let who = actor(&request, &request.get_ref().actor);
        let r = request.into_inner();
        let (control, model) = (self.control.clone(), r.model.clone());
        let why = reason(&r.reason, "resumed by hand");
        to_the_end(async move { control.resume(&model, &who, &why).await }).await?;
        self.status(&r.model)
    }

    async fn rollback(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let who = actor(&request, &request.get_ref().actor);
        let r = request.into_inner();
        let figures = self.history.status(&r.model)?.readings;
        let (control, model) = (self.control.clone(), r.model.clone());
        let why = reason(&r.reason, "rolled back by hand");
        to_the_end(async move { control.rollback(&model, &who, &why, figures).await }).await?;
        self.status(&r.model)
    }

    async fn promote(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let who = actor(&request, &request.get_ref().actor);
        let r = request.into_inner();
        let (control, model) = (self.control.clone(), r.model.clone());
        let why = reason(&r.reason, "promoted by hand");
        to_the_end(async move { control.promote(&model, &who, &why).await }).await?;
        self.status(&r.model)
    }

    type BacktestStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::BacktestProgress, Status>> + Send>,
    >;

    async fn backtest(
        &self,
        request: Request<pb::BacktestRequest>,
    ) -> Result<Response<Self::BacktestStream>, Status> {
        let r = request.into_inner();
        let window = crate::decision_log::Window {
            since: parse_bound("since", &r.since)?,
            until: parse_bound("until", &r.until)?,
        };
        let max_sample = self.backtester.max_sample();
        if r.sample > max_sample as u64 {
            return Err(RequestError::new(
                "sample",
                format!("must be at most {max_sample} (backtest_max_sample)"),
            )
            .into());
        }
        let spec = BacktestSpec {
            model: r.model,
            window,
            sample: (r.sample > 0).then_some(r.sample as usize),
            all_decisions: r.all_decisions,
            held_at_most: max_sample,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let backtester = self.backtester.clone();
        tokio::spawn(async move {
            let progress = tx.clone();
            let report = backtester
                .preview(
                    &r.candidate,
                    spec,
                    Thresholds::default(),
                    move |done, total| {
                        // Progress is best effort: a slow client skips updates, never stalls.
                        let _ = progress.try_send(Ok(pb::BacktestProgress {
                            update: Some(pb::backtest_progress::Update::Done(done)),
                            total,
                        }));
                    },
                )
                .await;
            let last = match report {
                Ok(report) => Ok(pb::BacktestProgress {
                    total: report.compared + report.unscorable,
                    update: Some(pb::backtest_progress::Update::Report(report.into())),
                }),
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type RemediateStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::RemediateUpdate, Status>> + Send>,
    >;

    async fn remediate(
        &self,
        request: Request<pb::RemediateRequest>,
    ) -> Result<Response<Self::RemediateStream>, Status> {
        let who = actor(&request, &request.get_ref().actor);
        let spec = remediate_spec(request.into_inner(), who)?;
        // A preview's refusals (unknown id, open rollout) come back as the call's status.
        if !spec.apply {
            let survey = self.remediator.survey(&spec).await?;
            let summary = pb::RemediateUpdate {
                update: Some(pb::remediate_update::Update::Summary((&survey).into())),
            };
            return Ok(Response::new(Box::pin(tokio_stream::once(Ok(summary)))));
        }
        // Applying runs to the end on its own task: a client that goes away stops reading,
        // not recording. Each remediation is sent once durable, the summary last.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let remediator = self.remediator.clone();
        tokio::spawn(async move {
            let each = tx.clone();
            let applied = remediator
                .apply(&spec, |harm| {
                    let _ = each.send(Ok(pb::RemediateUpdate {
                        update: Some(pb::remediate_update::Update::Applied(harm.into())),
                    }));
                })
                .await;
            let last = applied.map(|survey| pb::RemediateUpdate {
                update: Some(pb::remediate_update::Update::Summary((&survey).into())),
            });
            let _ = tx.send(last.map_err(Status::from));
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn history(
        &self,
        request: Request<pb::RolloutHistoryRequest>,
    ) -> Result<Response<pb::RolloutHistory>, Status> {
        let r = request.into_inner();
        if r.id.is_empty() && r.model.is_empty() {
            return Err(RequestError::new(
                "id",
                "give a rollout id, or a model for its latest rollout",
            )
            .into());
        }
        let history = self.history.history(&r.id, &r.model).await?;
        Ok(Response::new(history.into()))
    }

    async fn list(
        &self,
        _: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let rollouts = self.history.list()?.into_iter().map(Into::into).collect();
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }
}
