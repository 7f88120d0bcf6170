//! The shared backend: rollouts and serving choices in PostgreSQL, for replicas. A change
//! applies only to the rollout as its replica last saw it (state and step), so that two
//! replicas acting at once cannot both advance or close it; each committed change is
//! announced on [`CHANGES`], and the followers of every replica re-read the store.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_postgres::error::SqlState;

use super::{
    RolloutRecord, RolloutRow, Snapshot, StoreError, Transition, TransitionRow, err, from_stored,
    to_stored,
};
use crate::postgres::{CHANGES, Pg, describe};
use crate::rollout::State;

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    StoreError::Failed(describe(&e))
}

/// The columns a rollout is read from, in [`RolloutRow`]'s order.
const ROLLOUT_COLUMNS: &str =
    "id, model, champion, candidate, plan, state, step, step_started_at, created_at, backtest";

#[derive(Debug)]
pub(super) struct Shared {
    pg: Arc<Pg>,
}

impl Shared {
    pub(super) fn new(pg: Arc<Pg>) -> Shared {
        Shared { pg }
    }

    pub(super) fn pg(&self) -> &Arc<Pg> {
        &self.pg
    }

    pub(super) fn save(&self, r: &RolloutRecord, t: &Transition) -> Result<(), StoreError> {
        let plan = to_stored(&r.plan)?;
        let backtest = r.backtest.as_ref().map(to_stored).transpose()?;
        let figures = to_stored(&t.figures)?;
        let (step, to_step) = (r.step as i32, t.to_step as i32);
        self.pg.block(async {
            let mut client = self.pg.pooled().await.map_err(err)?;
            let tx = client.transaction().await.map_err(pg_err)?;
            match t.from_state {
                None => {
                    let inserted = tx
                        .execute(
                            &format!(
                                "INSERT INTO rollouts ({ROLLOUT_COLUMNS}) \
                                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                            ),
                            &[
                                &r.id,
                                &r.model,
                                &r.champion,
                                &r.candidate,
                                &plan,
                                &r.state.as_str(),
                                &step,
                                &r.step_started_at,
                                &r.created_at,
                                &backtest,
                            ],
                        )
                        .await;
                    if let Err(e) = inserted {
                        if e.code() != Some(&SqlState::UNIQUE_VIOLATION) {
                            return Err(pg_err(e));
                        }
                        drop(tx);
                        let open = client
                            .query_opt(
                                "SELECT id FROM rollouts WHERE model = $1 \
                                 AND state IN ('active', 'paused')",
                                &[&r.model],
                            )
                            .await
                            .map_err(pg_err)?;
                        return Err(StoreError::AlreadyOpen {
                            model: r.model.clone(),
                            id: open.map(|row| row.get(0)).unwrap_or_default(),
                        });
                    }
                }
                Some(from) => {
                    let from_step = t.from_step.unwrap_or(t.to_step) as i32;
                    let changed = tx
                        .execute(
                            "UPDATE rollouts SET state = $2, step = $3, step_started_at = $4 \
                             WHERE id = $1 AND state = $5 AND step = $6",
                            &[
                                &r.id,
                                &r.state.as_str(),
                                &step,
                                &r.step_started_at,
                                &from.as_str(),
                                &from_step,
                            ],
                        )
                        .await
                        .map_err(pg_err)?;
                    if changed == 0 {
                        let now = tx
                            .query_opt("SELECT state, step FROM rollouts WHERE id = $1", &[&r.id])
                            .await
                            .map_err(pg_err)?
                            .map(|row| {
                                format!(
                                    "{} at step {}",
                                    row.get::<_, &str>(0),
                                    row.get::<_, i32>(1)
                                )
                            })
                            .unwrap_or_else(|| "gone".into());
                        return Err(StoreError::Changed {
                            id: r.id.clone(),
                            now,
                        });
                    }
                }
            }
            tx.execute(
                "INSERT INTO rollout_transitions (rollout_id, at, from_state, to_state, \
                 from_step, to_step, actor, reason, figures) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &r.id,
                    &t.at,
                    &t.from_state.map(State::as_str),
                    &t.to_state.as_str(),
                    &t.from_step.map(|s| s as i32),
                    &to_step,
                    &t.actor,
                    &t.reason,
                    &figures,
                ],
            )
            .await
            .map_err(pg_err)?;
            if r.state == State::Promoted {
                upsert_serving(&tx, &r.model, &r.candidate).await?;
            }
            notify(&tx, &r.model).await?;
            tx.commit().await.map_err(pg_err)
        })
    }

    pub(super) fn list(&self, open_only: bool) -> Result<Vec<RolloutRecord>, StoreError> {
        let filter = if open_only {
            "WHERE state IN ('active', 'paused')"
        } else {
            ""
        };
        let rows = self.query(
            &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts {filter} ORDER BY created_at DESC"),
            &[],
        )?;
        rows.into_iter()
            .map(|row| {
                RolloutRow {
                    id: row.get(0),
                    model: row.get(1),
                    champion: row.get(2),
                    candidate: row.get(3),
                    plan: row.get(4),
                    state: row.get(5),
                    step: i64::from(row.get::<_, i32>(6)),
                    step_started_at: row.get(7),
                    created_at: row.get(8),
                    backtest: row.get(9),
                }
                .parse()
            })
            .collect()
    }

    pub(super) fn transitions(&self, rollout_id: &str) -> Result<Vec<Transition>, StoreError> {
        let rows = self.query(
            "SELECT at, from_state, to_state, from_step, to_step, actor, reason, figures \
             FROM rollout_transitions WHERE rollout_id = $1 ORDER BY id",
            &[&rollout_id],
        )?;
        rows.into_iter()
            .map(|row| {
                TransitionRow {
                    at: row.get(0),
                    from_state: row.get(1),
                    to_state: row.get(2),
                    from_step: row.get::<_, Option<i32>>(3).map(i64::from),
                    to_step: i64::from(row.get::<_, i32>(4)),
                    actor: row.get(5),
                    reason: row.get(6),
                    figures: row.get(7),
                }
                .parse()
            })
            .collect()
    }

    pub(super) fn save_snapshot(&self, rollout_id: &str, s: &Snapshot) -> Result<(), StoreError> {
        let figures = to_stored(&s.figures)?;
        self.query(
            "INSERT INTO rollout_readings (rollout_id, at, step, share_bp, figures) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &rollout_id,
                &s.at,
                &(s.step as i32),
                &(s.share_bp as i32),
                &figures,
            ],
        )?;
        Ok(())
    }

    pub(super) fn snapshots(&self, rollout_id: &str) -> Result<Vec<Snapshot>, StoreError> {
        let rows = self.query(
            "SELECT at, step, share_bp, figures FROM rollout_readings \
             WHERE rollout_id = $1 ORDER BY id",
            &[&rollout_id],
        )?;
        rows.into_iter()
            .map(|row| {
                Ok(Snapshot {
                    at: row.get(0),
                    step: row.get::<_, i32>(1) as usize,
                    share_bp: row.get::<_, i32>(2) as u32,
                    figures: from_stored(row.get(3))?,
                })
            })
            .collect()
    }

    pub(super) fn save_serving(&self, model: &str, version: &str) -> Result<(), StoreError> {
        self.pg.block(async {
            let mut client = self.pg.pooled().await.map_err(err)?;
            let tx = client.transaction().await.map_err(pg_err)?;
            upsert_serving(&tx, model, version).await?;
            notify(&tx, model).await?;
            tx.commit().await.map_err(pg_err)
        })
    }

    pub(super) fn serving(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let rows = self.query("SELECT model, version FROM serving", &[])?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.pg.block(async {
            let client = self.pg.pooled().await.map_err(err)?;
            client.query(sql, params).await.map_err(pg_err)
        })
    }
}

async fn upsert_serving(
    tx: &deadpool_postgres::Transaction<'_>,
    model: &str,
    version: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO serving (model, version) VALUES ($1, $2) \
         ON CONFLICT (model) DO UPDATE SET version = excluded.version, changed_at = now()",
        &[&model, &version],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}

/// Tells every replica's follower that `model`'s rollouts or serving choice changed; sent
/// when the transaction commits.
async fn notify(tx: &deadpool_postgres::Transaction<'_>, model: &str) -> Result<(), StoreError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES, &model])
        .await
        .map_err(pg_err)?;
    Ok(())
}
