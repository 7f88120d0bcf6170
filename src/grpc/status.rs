//! The one mapping from domain errors to gRPC statuses.
//!
//! Every variant is matched by name (no catch-all arm), so a new error variant does not
//! compile until someone decides what a caller should see for it.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::backtest::BacktestError;
use crate::bundle::BundleError;
use crate::decision_log::LogError;
use crate::grpc::convert::RequestError;
use crate::grpc::gate::admission::AdmissionError;
use crate::grpc::gate::auth::AuthError;
use crate::registry::RegistryError;
use crate::remediation::RemediationError;
use crate::rollout::RolloutError;
use crate::rollout::store::StoreError;
use crate::schema::FeatureError;
use crate::scoring::ScoreError;
use crate::trace::TraceError;

/// What a caller is told: a code, a message, the offending field when there is one, and how
/// long to wait before retrying when the server asks for a wait.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub code: Code,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<Duration>,
}

/// The trailer gRPC retry policies read for the server's wait (gRFC A6), in milliseconds.
pub const PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

impl Refusal {
    fn new(code: Code, err: &impl ToString) -> Self {
        Refusal {
            code,
            message: err.to_string(),
            field: None,
            retry_after: None,
        }
    }

    fn on_field(mut self, field: String) -> Self {
        self.field = Some(field);
        self
    }
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        let mut status = match r.field {
            Some(field) => Status::with_error_details(
                r.code,
                r.message.clone(),
                ErrorDetails::with_bad_request_violation(field, r.message),
            ),
            None => Status::new(r.code, r.message),
        };
        if let Some(wait) = r.retry_after {
            status
                .metadata_mut()
                .insert(PUSHBACK_HEADER, (wait.as_millis() as u64).into());
        }
        status
    }
}

impl From<&RequestError> for Refusal {
    fn from(e: &RequestError) -> Self {
        Refusal::new(Code::InvalidArgument, e).on_field(e.field.clone())
    }
}

impl From<&FeatureError> for Refusal {
    fn from(e: &FeatureError) -> Self {
        Refusal::new(Code::InvalidArgument, e).on_field(format!("features.{}", e.feature))
    }
}

impl From<&RegistryError> for Refusal {
    fn from(e: &RegistryError) -> Self {
        let code = match e {
            RegistryError::UnknownModel(_) => Code::NotFound,
            RegistryError::UnknownVersion { .. } => Code::NotFound,
            RegistryError::NoBundle(_) => Code::NotFound,
            // The model exists but cannot answer now; a retry may succeed.
            RegistryError::NoServingVersion(_) => Code::Unavailable,
            RegistryError::NotReady { .. } => Code::FailedPrecondition,
            RegistryError::UnloadServing { .. } => Code::FailedPrecondition,
            RegistryError::AlreadyLoading { .. } => Code::Aborted,
            RegistryError::InvalidName { field, .. } => {
                return Refusal::new(Code::InvalidArgument, e).on_field(field.to_string());
            }
            RegistryError::Load { source, .. } => match source {
                BundleError::Io { .. } => Code::FailedPrecondition,
                BundleError::Incomplete(_) => Code::FailedPrecondition,
                BundleError::DigestMismatch { .. } => Code::FailedPrecondition,
                BundleError::Parse { .. } => Code::FailedPrecondition,
                BundleError::Invalid(_) => Code::FailedPrecondition,
                BundleError::ReasonCodes(_) => Code::FailedPrecondition,
            },
            RegistryError::Unusable { .. } => Code::FailedPrecondition,
            RegistryError::Persist { .. } => Code::Internal,
        };
        Refusal::new(code, e)
    }
}

impl From<&LogError> for Refusal {
    fn from(e: &LogError) -> Self {
        match e {
            // Fail closed: nothing was acknowledged; the caller may retry with the same id.
            LogError::Unavailable(_) => Refusal::new(Code::Unavailable, e),
            LogError::Damaged(_) => Refusal::new(Code::Unavailable, e),
            LogError::RequestIdReused(_) => {
                Refusal::new(Code::AlreadyExists, e).on_field("request_id".into())
            }
            LogError::Query(_) => Refusal::new(Code::Internal, e),
        }
    }
}

impl From<&ScoreError> for Refusal {
    fn from(e: &ScoreError) -> Self {
        match e {
            ScoreError::Route(e) => e.into(),
            ScoreError::Feature(e) => e.into(),
            ScoreError::Record(e) => e.into(),
            ScoreError::DeadlinePassed => Refusal::new(Code::DeadlineExceeded, e),
        }
    }
}

impl From<LogError> for Status {
    fn from(e: LogError) -> Status {
        Refusal::from(&e).into()
    }
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Status {
        Refusal::from(&e).into()
    }
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        Refusal::from(&e).into()
    }
}

impl From<ScoreError> for Status {
    fn from(e: ScoreError) -> Status {
        Refusal::from(&e).into()
    }
}

impl From<&TraceError> for Refusal {
    fn from(e: &TraceError) -> Self {
        match e {
            TraceError::NoDecision(_) => Refusal::new(Code::NotFound, e),
            TraceError::BadDecisionId(_) => {
                Refusal::new(Code::InvalidArgument, e).on_field("decision_id".into())
            }
            TraceError::NoBundle(_) => Refusal::new(Code::FailedPrecondition, e),
            TraceError::Bundle { .. } => Refusal::new(Code::FailedPrecondition, e),
            TraceError::BadTime { field, .. } => {
                Refusal::new(Code::InvalidArgument, e).on_field(field.to_string())
            }
            TraceError::NoCustomer => Refusal::new(Code::NotFound, e),
            // A record the log holds but this build cannot read: the server's fault.
            TraceError::BadRecord { .. } => Refusal::new(Code::Internal, e),
            TraceError::Rollouts(_) => Refusal::new(Code::Unavailable, e),
            TraceError::Log(e) => e.into(),
        }
    }
}

impl From<TraceError> for Status {
    fn from(e: TraceError) -> Status {
        Refusal::from(&e).into()
    }
}

/// A server task that ended without an answer: it panicked or was cancelled.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {source}")]
pub struct TaskFailed {
    what: &'static str,
    source: tokio::task::JoinError,
}

impl TaskFailed {
    pub fn new(what: &'static str, source: tokio::task::JoinError) -> Self {
        TaskFailed { what, source }
    }
}

impl From<TaskFailed> for Status {
    fn from(e: TaskFailed) -> Status {
        Refusal::new(Code::Internal, &e).into()
    }
}

impl From<&RolloutError> for Refusal {
    fn from(e: &RolloutError) -> Self {
        match e {
            RolloutError::NoRollout(_) => Refusal::new(Code::NotFound, e),
            RolloutError::UnknownId(_) => Refusal::new(Code::NotFound, e).on_field("id".into()),
            RolloutError::Log(e) => e.into(),
            RolloutError::AlreadyOpen { .. } => Refusal::new(Code::AlreadyExists, e),
            RolloutError::Plan(_) => {
                Refusal::new(Code::InvalidArgument, e).on_field("plan_toml".into())
            }
            RolloutError::SameVersion(_) => {
                Refusal::new(Code::InvalidArgument, e).on_field("candidate".into())
            }
            RolloutError::LastStep => Refusal::new(Code::FailedPrecondition, e),
            RolloutError::DecidedByRollout(_) => Refusal::new(Code::FailedPrecondition, e),
            RolloutError::InRollout { .. } => Refusal::new(Code::FailedPrecondition, e),
            RolloutError::WrongState(_) => Refusal::new(Code::FailedPrecondition, e),
            RolloutError::BacktestFailed { .. } => Refusal::new(Code::FailedPrecondition, e),
            // The inner refusal's code and field, under the outer message ("backtest: …").
            RolloutError::Backtest(inner) => Refusal {
                message: e.to_string(),
                ..inner.into()
            },
            RolloutError::Registry(e) => e.into(),
            // Another replica got there first: the caller reads the new state and decides.
            RolloutError::Store(StoreError::Changed { .. }) => Refusal::new(Code::Aborted, e),
            RolloutError::Store(StoreError::AlreadyOpen { .. }) => {
                Refusal::new(Code::AlreadyExists, e)
            }
            RolloutError::Store(StoreError::Failed(_)) => Refusal::new(Code::Unavailable, e),
        }
    }
}

impl From<&BacktestError> for Refusal {
    fn from(e: &BacktestError) -> Self {
        match e {
            BacktestError::Empty(_) => Refusal::new(Code::FailedPrecondition, e),
            BacktestError::Unscorable(..) => Refusal::new(Code::FailedPrecondition, e),
            BacktestError::TooLarge(_) => {
                Refusal::new(Code::FailedPrecondition, e).on_field("sample".into())
            }
            BacktestError::Log(e) => e.into(),
            BacktestError::Candidate(e) => e.into(),
            BacktestError::Thread(_) => Refusal::new(Code::Internal, e),
        }
    }
}

impl From<BacktestError> for Status {
    fn from(e: BacktestError) -> Status {
        Refusal::from(&e).into()
    }
}

impl From<RolloutError> for Status {
    fn from(e: RolloutError) -> Status {
        Refusal::from(&e).into()
    }
}

impl From<&RemediationError> for Refusal {
    fn from(e: &RemediationError) -> Self {
        match e {
            RemediationError::UnknownRollout(_) => {
                Refusal::new(Code::NotFound, e).on_field("rollout_id".into())
            }
            RemediationError::Open { .. } => {
                Refusal::new(Code::FailedPrecondition, e).on_field("rollout_id".into())
            }
            // The recorded inputs cannot be re-decided by the version asked for.
            RemediationError::Inputs { .. } => Refusal::new(Code::FailedPrecondition, e),
            RemediationError::WithVersion(inner) => Refusal {
                message: e.to_string(),
                ..Refusal::from(inner).on_field("with_version".into())
            },
            RemediationError::Registry(inner) => inner.into(),
            RemediationError::Store(_) => Refusal::new(Code::Unavailable, e),
            RemediationError::Log(inner) => inner.into(),
            RemediationError::Task(_) => Refusal::new(Code::Internal, e),
        }
    }
}

impl From<RemediationError> for Status {
    fn from(e: RemediationError) -> Status {
        Refusal::from(&e).into()
    }
}

impl From<&AuthError> for Refusal {
    fn from(e: &AuthError) -> Self {
        match e {
            AuthError::Missing
            | AuthError::Malformed
            | AuthError::UnknownToken
            | AuthError::UnknownClient(_) => Refusal::new(Code::Unauthenticated, e),
            AuthError::Forbidden { .. } => Refusal::new(Code::PermissionDenied, e),
        }
    }
}

impl From<&AdmissionError> for Refusal {
    fn from(e: &AdmissionError) -> Self {
        match e {
            AdmissionError::Overloaded { retry_after, .. } => Refusal {
                retry_after: *retry_after,
                ..Refusal::new(Code::ResourceExhausted, e)
            },
        }
    }
}
