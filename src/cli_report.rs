//! `riskserve report …`: fetches a rollout's or a customer's history over the API and writes
//! it as one self-contained HTML page (see [`crate::report`]).

use std::path::Path;

use anyhow::Context;

use crate::cli::{connect, status_error};
use crate::grpc::pb;
use crate::grpc::pb::rollouts_client::RolloutsClient;
use crate::grpc::pb::trace_client::TraceClient;
use crate::report;

/// Writes the report of rollout `id` (or, with an empty id, `model`'s open or latest one).
pub async fn rollout(
    server: &str,
    id: &str,
    model: &str,
    out: &Path,
) -> anyhow::Result<pb::RolloutHistory> {
    let history = RolloutsClient::new(connect(server).await?)
        .history(pb::RolloutHistoryRequest {
            id: id.into(),
            model: model.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    write(out, &report::rollout_page(&history))?;
    Ok(history)
}

/// Writes the report of one customer's limit over time; returns their decisions.
pub async fn customer(
    server: &str,
    customer_id: &str,
    out: &Path,
) -> anyhow::Result<Vec<pb::DecisionRecord>> {
    let records = TraceClient::new(connect(server).await?)
        .customer_history(pb::CustomerRef {
            customer_id: customer_id.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .records;
    write(out, &report::customer_page(customer_id, &records))?;
    Ok(records)
}

fn write(out: &Path, page: &str) -> anyhow::Result<()> {
    std::fs::write(out, page).with_context(|| format!("writing {}", out.display()))
}
