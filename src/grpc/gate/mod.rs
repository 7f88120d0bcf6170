//! Gates in front of every service: each request is let through, holding a pass until its
//! response is ready, or answered at once with the refusal, before any handler runs.
//!
//! [`auth`] (callers and roles) and [`admission`] (the in-flight limit, the excess shed) are
//! the gatekeepers; this module is the tower plumbing they share. They belong to the edge:
//! they read HTTP requests and answer with a [`Refusal`], never reaching a service.

pub mod admission;
pub mod auth;

use std::task::{Context, Poll};

use tonic::codegen::http;

use crate::grpc::status::Refusal;

/// Decides one request: a pass to hold while it runs, or why it is refused.
pub trait Gatekeeper: Clone + Send + Sync + 'static {
    type Pass: Send + 'static;

    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<Self::Pass, Refusal>;
}

/// The tower layer for a gatekeeper.
#[derive(Debug, Clone)]
pub struct GateLayer<G>(pub G);

impl<S, G: Clone> tower::Layer<S> for GateLayer<G> {
    type Service = Gate<S, G>;

    fn layer(&self, inner: S) -> Gate<S, G> {
        Gate {
            inner,
            keeper: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Gate<S, G> {
    inner: S,
    keeper: G,
}

impl<S, G, B> tower::Service<http::Request<B>> for Gate<S, G>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    G: Gatekeeper,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.keeper.admit(&mut request) {
            Ok(pass) => {
                let response = self.inner.call(request);
                Box::pin(async move {
                    let r = response.await;
                    drop(pass);
                    r
                })
            }
            Err(refusal) => {
                let status = tonic::Status::from(refusal);
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
