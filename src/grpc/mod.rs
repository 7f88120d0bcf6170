//! The gRPC edge: the only place that knows prost types.
//!
//! Wire messages become domain types in [`convert`] (with `TryFrom`, where the request's own
//! fields are checked) and domain errors become `tonic::Status` in [`status`], in one
//! exhaustive mapping. The services themselves only sequence calls into the domain.

pub(crate) mod convert;
mod models;
mod rollouts;
mod scoring;
pub(crate) mod status;
mod trace;

pub use models::ModelsService;
pub use rollouts::RolloutsService;
pub use scoring::ScoringService;
pub use trace::TraceService;

/// Generated protobuf and gRPC types of `riskserve.v1`, also used by the CLI's clients.
pub mod pb {
    // Generated code: a report variant next to a counter is fine for a progress stream.
    #![allow(clippy::large_enum_variant)]
    tonic::include_proto!("riskserve.v1");

    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/riskserve_descriptor.bin"));
}
