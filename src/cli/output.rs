//! Formatting shared by several commands: enum names as people read them, and reasons as
//! JSON.

use std::process::ExitCode;

use serde_json::{Value, json};

use crate::grpc::pb;

/// A decision's name in lower case: "approve", "review", "decline".
pub(crate) fn decision_name(d: i32) -> String {
    pb::Decision::try_from(d)
        .map(|d| {
            d.as_str_name()
                .trim_start_matches("DECISION_")
                .to_lowercase()
        })
        .unwrap_or_default()
}

/// An arm's name in lower case: "champion", "candidate", "shadow".
pub(crate) fn arm_name(a: i32) -> String {
    pb::Arm::try_from(a)
        .map(|a| a.as_str_name().trim_start_matches("ARM_").to_lowercase())
        .unwrap_or_default()
}

/// The reasons of a decision as a JSON array of {feature, contribution, value}.
pub(crate) fn reasons_json(reasons: &[pb::Reason]) -> Value {
    reasons
        .iter()
        .map(|r| json!({"feature": r.feature, "contribution": r.contribution, "value": r.value}))
        .collect()
}

/// Prints `x` as one JSON line or for people.
pub(crate) fn show<T>(x: &T, json: bool, as_json: fn(&T) -> Value, for_people: fn(&T)) {
    if json {
        println!("{}", as_json(x));
    } else {
        for_people(x);
    }
}

/// Success, or exit code 1 for a check that did not pass.
pub(crate) fn passed(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
