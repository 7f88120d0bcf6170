//! Shadow scoring: the candidate also scores champion traffic, off the response path. A
//! request is queued with `try_send` into a bounded queue (full means dropped and counted,
//! never waited for); one worker scores each with the candidate and records it on arm
//! shadow, through the same recorder as every served decision.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::decision::{ScoreRequest, decide};
use super::recorder::{Decided, Recorder};
use crate::rollout::{Observation, Route, Router};

struct ShadowJob {
    route: Route,
    request: ScoreRequest,
}

/// The sending side of the shadow queue, on the request path.
#[derive(Debug, Clone)]
pub struct Shadow {
    tx: mpsc::Sender<ShadowJob>,
    router: Arc<Router>,
}

/// The worker side of the shadow queue.
pub struct ShadowWorker {
    rx: mpsc::Receiver<ShadowJob>,
    recorder: Recorder,
}

impl Shadow {
    /// A queue of `capacity` requests (at least one) and its worker.
    pub fn new(capacity: usize, router: Arc<Router>, recorder: Recorder) -> (Shadow, ShadowWorker) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Shadow { tx, router }, ShadowWorker { rx, recorder })
    }

    /// Queues a shadow scoring of this request if its route asks for one; never waits.
    pub fn offer(&self, route: &Route, request: &ScoreRequest) {
        let Some(route) = route.as_shadow() else {
            return;
        };
        let job = ShadowJob {
            route,
            request: request.clone(),
        };
        if self.tx.try_send(job).is_err() {
            self.router.count_shadow_dropped();
        }
    }
}

impl ShadowWorker {
    /// Scores and records queued requests until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let job = tokio::select! {
                _ = shutdown.cancelled() => return,
                job = self.rx.recv() => match job { Some(j) => j, None => return },
            };
            let started = Instant::now();
            let bundle = job
                .route
                .candidate
                .clone()
                .expect("a shadow route names its candidate");
            let x = match bundle.schema.vector(&job.request.features) {
                Ok(x) => x,
                Err(_) => {
                    job.route.observe(Observation::REFUSED);
                    continue;
                }
            };
            let decision = decide(&bundle, &job.request, &x, &job.route);
            let decided = Decided {
                latency: started.elapsed(),
                route: job.route,
                bundle,
                x,
                decision,
            };
            if let Err(e) = self
                .recorder
                .queue(&job.request, decided)
                .durable(&job.request)
                .await
            {
                tracing::warn!(error = %e, "shadow decision not recorded");
            }
        }
    }
}
