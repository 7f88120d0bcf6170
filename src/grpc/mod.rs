//! The gRPC edge: the only place that knows prost types.
//!
//! Wire messages become domain types in [`convert`] (with `TryFrom`, where the request's own
//! fields are checked) and domain errors become `tonic::Status` in [`status`], in one
//! exhaustive mapping. The services themselves only sequence calls into the domain.

pub(crate) mod convert;
pub mod gate;
mod inference;
mod models;
mod rollouts;
mod scoring;
pub(crate) mod status;
mod telemetry;
mod trace;

pub use inference::InferenceService;
pub use models::ModelsService;
pub use rollouts::RolloutsService;
pub use scoring::ScoringService;
pub use trace::TraceService;

/// Runs `op` on a task of its own and waits for it: a caller that goes away (cancels, or its
/// deadline passes) stops waiting, not the operation. Control operations write the disk and
/// then memory; cut off between the two they would leave them disagreeing (a version stuck
/// "loading", a rollout stored open that routes nobody).
pub(crate) async fn to_the_end<T, E>(
    op: impl std::future::Future<Output = Result<T, E>> + Send + 'static,
) -> Result<T, tonic::Status>
where
    T: Send + 'static,
    E: Into<tonic::Status> + Send + 'static,
{
    match tokio::spawn(op).await {
        Ok(result) => result.map_err(Into::into),
        Err(join) => Err(status::TaskFailed::new("the operation", join).into()),
    }
}

/// Generated protobuf and gRPC types of `riskserve.v1`, also used by the CLI's clients.
pub mod pb {
    // Generated code: a report variant next to a counter is fine for a progress stream.
    #![allow(clippy::large_enum_variant)]
    tonic::include_proto!("riskserve.v1");

    /// The encoded descriptor set (riskserve.v1 and inference), served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/riskserve_descriptor.bin"));
}

/// Generated types of the Open Inference Protocol (`inference`, KServe v2).
pub mod v2 {
    tonic::include_proto!("inference");
}
