//! Admission: a global limit on requests in flight, with the excess refused at once.
//!
//! Under overload a queue only turns a burst into latency for everyone and memory for the
//! server. So a request that finds every permit taken is answered RESOURCE_EXHAUSTED straight
//! away (the client backs off or goes to another replica), and the accepted ones keep their
//! latency. Health is exempt, so that an overloaded server is not also reported dead.
//!
//! A refusal also says when to come back (`grpc-retry-pushback-ms`, which gRPC retry policies
//! obey). The wait is jittered so that the clients refused in one burst do not all return in
//! the next: a client that retries at once turns every refusal into more work for the same
//! core (BENCHMARKS.md, overload).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;

use super::Gatekeeper;
use crate::grpc::status::Refusal;

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error(
        "server busy: {limit} requests already in flight; {}",
        retry_hint(retry_after)
    )]
    Overloaded {
        limit: usize,
        /// The wait asked of the client, if any.
        retry_after: Option<Duration>,
    },
}

fn retry_hint(retry_after: &Option<Duration>) -> String {
    match retry_after {
        Some(wait) => format!("retry after {} ms", wait.as_millis()),
        None => "retry with backoff".into(),
    }
}

/// Admits at most `limit` requests at a time (a [`Gatekeeper`]).
#[derive(Debug, Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    limit: usize,
    pushback: Duration,
}

impl Admission {
    /// `pushback` is the mean wait asked of a refused client; zero asks none.
    pub fn new(limit: usize, pushback: Duration) -> Admission {
        Admission {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            pushback,
        }
    }

    /// Uniform over ½–1½ × the pushback, to the millisecond the header carries.
    fn retry_after(&self) -> Option<Duration> {
        if self.pushback.is_zero() {
            return None;
        }
        let jittered = self.pushback.mul_f64(rand::random::<f64>() + 0.5);
        Some(Duration::from_millis(jittered.as_millis() as u64))
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
                retry_after: self.retry_after(),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pushback_is_jittered_around_the_configured_wait() {
        let admission = Admission::new(1, Duration::from_millis(10));
        let waits: Vec<u128> = (0..1_000)
            .map(|_| admission.retry_after().unwrap().as_millis())
            .collect();
        assert!(waits.iter().all(|w| (5..=15).contains(w)), "{waits:?}");
        // Spread, not one value: the refused burst does not come back at once.
        assert!(waits.iter().min() < Some(&8) && waits.iter().max() > Some(&12));
        assert_eq!(Admission::new(1, Duration::ZERO).retry_after(), None);
    }

    #[test]
    fn the_refusal_says_how_long_to_wait() {
        let refused = |retry_after| AdmissionError::Overloaded {
            limit: 8,
            retry_after,
        };
        assert_eq!(
            refused(Some(Duration::from_millis(12))).to_string(),
            "server busy: 8 requests already in flight; retry after 12 ms"
        );
        assert_eq!(
            refused(None).to_string(),
            "server busy: 8 requests already in flight; retry with backoff"
        );
    }
}
