//! The follower of a replica on a shared store: keeps its routing and serving versions in
//! line with what any replica records, and holds the evaluator's lease.
//!
//! It listens on [`CHANGES`] on a connection of its own and re-reads the store on every
//! announcement, and every tick as the fallback for one missed while reconnecting. The same
//! session tries, each tick, to take the evaluator lock (a session advisory lock): the
//! replica that holds it judges the guardrails and advances or rolls back, the others only
//! follow. When that replica dies, PostgreSQL ends its session and frees the lock, and the
//! next follower to tick takes it over.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::control::Control;
use crate::postgres::{CHANGES, Pg};

/// The advisory lock key of the evaluator's lease ("riskeval" in ASCII).
const EVALUATOR_LOCK: i64 = 0x7269_736b_6576_616c;

/// Follows the shared store for one replica.
pub struct Follower {
    pg: Arc<Pg>,
    control: Arc<Control>,
    leading: watch::Sender<bool>,
    every: Duration,
}

impl Follower {
    /// A follower re-reading at least `every`, and the lease it reports: true while this
    /// replica is the one that evaluates.
    pub fn new(
        pg: Arc<Pg>,
        control: Arc<Control>,
        every: Duration,
    ) -> (Follower, watch::Receiver<bool>) {
        let (leading, lease) = watch::channel(false);
        (
            Follower {
                pg,
                control,
                leading,
                every,
            },
            lease,
        )
    }

    /// Follows until shutdown, reconnecting whenever the connection is lost.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            match self.pg.listen(CHANGES).await {
                Ok((client, changes)) => self.follow(&client, changes, &stop).await,
                Err(e) => tracing::warn!(error = %e, "cannot follow the shared store; retrying"),
            }
            // Whatever ended the session ended the lease with it.
            self.lead(false);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.every) => {}
            }
        }
    }

    /// Follows on one connection until it fails or shutdown.
    async fn follow(
        &self,
        client: &tokio_postgres::Client,
        mut changes: tokio::sync::mpsc::UnboundedReceiver<String>,
        stop: &CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                change = changes.recv() => {
                    if change.is_none() {
                        return;
                    }
                    // One re-read covers every announcement queued so far.
                    while changes.try_recv().is_ok() {}
                }
                _ = tick.tick() => {
                    if self.keep_lease(client).await.is_err() {
                        return;
                    }
                }
            }
            if let Err(e) = self.control.sync().await {
                tracing::warn!(error = %e, "following the shared store");
            }
        }
    }

    /// Takes the evaluator lock if this replica lacks it, or checks that the session holding
    /// it is alive.
    async fn keep_lease(&self, client: &tokio_postgres::Client) -> Result<(), ()> {
        let query = if *self.leading.borrow() {
            client.query_one("SELECT true", &[]).await
        } else {
            client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&EVALUATOR_LOCK])
                .await
        };
        match query {
            Ok(row) => {
                if row.get::<_, bool>(0) {
                    self.lead(true);
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %crate::postgres::describe(&e), "lost the shared store's connection");
                Err(())
            }
        }
    }

    fn lead(&self, leading: bool) {
        self.leading.send_if_modified(|now| {
            if *now == leading {
                return false;
            }
            *now = leading;
            if leading {
                tracing::info!("this replica now evaluates the rollouts' guardrails");
            } else {
                tracing::warn!("this replica no longer evaluates the rollouts' guardrails");
            }
            true
        });
    }
}
