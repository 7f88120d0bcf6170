//! Admission: a global limit on requests in flight, with the excess refused at once.
//!
//! Under overload a queue only turns a burst into latency for everyone and memory for the
//! server. So a request that finds every permit taken is answered RESOURCE_EXHAUSTED straight
//! away (the client backs off or goes to another replica), and the accepted ones keep their
//! latency. Health is exempt, so that an overloaded server is not also reported dead.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;

use crate::gate::Gatekeeper;
use crate::grpc::status::Refusal;

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("server busy: {limit} requests already in flight; retry with backoff")]
    Overloaded { limit: usize },
}

/// Admits at most `limit` requests at a time (a [`Gatekeeper`]).
#[derive(Debug, Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl Admission {
    pub fn new(limit: usize) -> Admission {
        Admission {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

impl Gatekeeper for Admission {
    /// Held until the response is ready; none for health.
    type Pass = Option<OwnedSemaphorePermit>;

    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<Self::Pass, Refusal> {
        if request.uri().path().starts_with("/grpc.health.v1.Health/") {
            return Ok(None);
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => Err(Refusal::from(&AdmissionError::Overloaded {
                limit: self.limit,
            })),
        }
    }
}
