//! The `riskserve.v1.Trace` service: reviewers' reads of the decision log.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::decision_log::Window;
use crate::grpc::convert::RequestError;
use crate::grpc::pb::{self, trace_server::Trace};
use crate::grpc::status::TaskFailed;
use crate::trace::{TraceError, Tracer, parse_bound};

/// Serves the Trace API from a [`Tracer`]; every call runs on a blocking thread.
#[derive(Debug, Clone)]
pub struct TraceService {
    tracer: Arc<Tracer>,
}

impl TraceService {
    pub fn new(tracer: Tracer) -> Self {
        TraceService {
            tracer: Arc::new(tracer),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tracer) -> Result<T, TraceError> + Send + 'static,
    ) -> Result<T, Status> {
        let tracer = self.tracer.clone();
        tokio::task::spawn_blocking(move || f(&tracer))
            .await
            .map_err(|e| TaskFailed::new("trace task", e))?
            .map_err(Status::from)
    }
}

fn window(since: &str, until: &str) -> Result<Window, TraceError> {
    Ok(Window {
        since: parse_bound("since", since)?,
        until: parse_bound("until", until)?,
    })
}

type RecordStream = Pin<Box<dyn Stream<Item = Result<pb::DecisionRecord, Status>> + Send>>;

#[tonic::async_trait]
impl Trace for TraceService {
    async fn get_decision(
        &self,
        request: Request<pb::DecisionRef>,
    ) -> Result<Response<pb::DecisionRecord>, Status> {
        let id = request.into_inner().decision_id;
        let record = self.blocking(move |t| t.decision(&id)).await?;
        Ok(Response::new(record.into()))
    }

    async fn customer_history(
        &self,
        request: Request<pb::CustomerRef>,
    ) -> Result<Response<pb::CustomerHistoryResponse>, Status> {
        let customer = request.into_inner().customer_id;
        if customer.is_empty() {
            return Err(RequestError::required("customer_id").into());
        }
        let records = self.blocking(move |t| t.customer(&customer)).await?;
        Ok(Response::new(pb::CustomerHistoryResponse {
            records: records.into_iter().map(Into::into).collect(),
        }))
    }

    async fn explain(
        &self,
        request: Request<pb::DecisionRef>,
    ) -> Result<Response<pb::Explanation>, Status> {
        let id = request.into_inner().decision_id;
        let e = self.blocking(move |t| t.explain(&id)).await?;
        Ok(Response::new(e.into()))
    }

    async fn replay(
        &self,
        request: Request<pb::DecisionRef>,
    ) -> Result<Response<pb::ReplayResult>, Status> {
        let id = request.into_inner().decision_id;
        let r = self.blocking(move |t| t.replay(&id)).await?;
        Ok(Response::new(r.into()))
    }

    async fn verify(
        &self,
        _: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResult>, Status> {
        let report = self.blocking(|t| t.verify()).await?;
        Ok(Response::new(report.into()))
    }

    async fn by_version(
        &self,
        request: Request<pb::ByVersionRequest>,
    ) -> Result<Response<pb::VersionSummary>, Status> {
        let r = request.into_inner();
        let (model, version) = (r.model.clone(), r.version.clone());
        let stats = self
            .blocking(move |t| t.by_version(&r.model, &r.version, &window(&r.since, &r.until)?))
            .await?;
        Ok(Response::new(crate::grpc::convert::version_summary(
            model, version, stats,
        )))
    }

    async fn notice(
        &self,
        request: Request<pb::DecisionRef>,
    ) -> Result<Response<pb::AdverseActionNotice>, Status> {
        let id = request.into_inner().decision_id;
        let n = self.blocking(move |t| t.notice(&id)).await?;
        Ok(Response::new(n.into()))
    }

    async fn complaint(
        &self,
        request: Request<pb::CustomerRef>,
    ) -> Result<Response<pb::ComplaintAnswer>, Status> {
        let customer = request.into_inner().customer_id;
        if customer.is_empty() {
            return Err(RequestError::required("customer_id").into());
        }
        let c = self.blocking(move |t| t.complaint(&customer)).await?;
        Ok(Response::new(c.into()))
    }

    type ExportStream = RecordStream;

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let r = request.into_inner();
        let window = window(&r.since, &r.until).map_err(Status::from)?;
        // A small buffer: the reader waits for the client, so an export holds no more than
        // this many records in memory.
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let tracer = self.tracer.clone();
        tokio::task::spawn_blocking(move || {
            let result = tracer.export(&window, &mut |record| {
                tx.blocking_send(Ok(record.into())).is_ok()
            });
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(Status::from(e)));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
