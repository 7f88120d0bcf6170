//! The embedded backend: the rollout tables in their own SQLite file (`rollouts.db`, fsynced
//! at each commit), apart from the query view, which is written without fsync and may be
//! rebuilt. One server owns the file, so its control turns alone order the changes.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, params};

use super::{
    RolloutRecord, RolloutRow, Snapshot, StoreError, Transition, TransitionRow, err, from_stored,
    to_stored,
};
use crate::rollout::State;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rollouts (
    id              TEXT PRIMARY KEY,
    model           TEXT NOT NULL,
    champion        TEXT NOT NULL,
    candidate       TEXT NOT NULL,
    plan            TEXT NOT NULL,
    state           TEXT NOT NULL,
    step            INTEGER NOT NULL,
    step_started_at TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    backtest        TEXT
);
CREATE INDEX IF NOT EXISTS rollouts_model ON rollouts(model, created_at);
CREATE TABLE IF NOT EXISTS rollout_transitions (
    id          INTEGER PRIMARY KEY,
    rollout_id  TEXT NOT NULL REFERENCES rollouts(id),
    at          TEXT NOT NULL,
    from_state  TEXT,
    to_state    TEXT NOT NULL,
    from_step   INTEGER,
    to_step     INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    figures     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_transitions_rollout ON rollout_transitions(rollout_id, id);
-- What the guardrails read while a rollout ran, sampled, for charts of each against its
-- threshold over time (transitions keep the figures of each decision point besides).
CREATE TABLE IF NOT EXISTS rollout_readings (
    id          INTEGER PRIMARY KEY,
    rollout_id  TEXT NOT NULL REFERENCES rollouts(id),
    at          TEXT NOT NULL,
    step        INTEGER NOT NULL,
    share_bp    INTEGER NOT NULL,
    figures     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_readings_rollout ON rollout_readings(rollout_id, id);
";

/// The rollout tables, on their own connection.
#[derive(Debug)]
pub(super) struct Embedded {
    conn: Mutex<Connection>,
}

impl Embedded {
    pub(super) fn open(path: &Path) -> Result<Embedded, StoreError> {
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        // Stores created before the backtest gate lack its column.
        let has_backtest: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('rollouts') WHERE name = 'backtest'")
            .and_then(|mut s| s.exists([]))
            .map_err(err)?;
        if !has_backtest {
            conn.execute_batch("ALTER TABLE rollouts ADD COLUMN backtest TEXT")
                .map_err(err)?;
        }
        Ok(Embedded {
            conn: Mutex::new(conn),
        })
    }

    /// Writes the rollout's current row and one transition, atomically.
    pub(super) fn save(&self, r: &RolloutRecord, t: &Transition) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().expect("store lock poisoned");
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute(
            "INSERT INTO rollouts (id, model, champion, candidate, plan, state, step, \
             step_started_at, created_at, backtest) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
             ON CONFLICT(id) DO UPDATE SET state = excluded.state, step = excluded.step, \
             step_started_at = excluded.step_started_at",
            params![
                r.id,
                r.model,
                r.champion,
                r.candidate,
                to_stored(&r.plan)?,
                r.state.as_str(),
                r.step as i64,
                r.step_started_at,
                r.created_at,
                r.backtest.as_ref().map(to_stored).transpose()?
            ],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO rollout_transitions (rollout_id, at, from_state, to_state, from_step, \
             to_step, actor, reason, figures) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                r.id,
                t.at,
                t.from_state.map(State::as_str),
                t.to_state.as_str(),
                t.from_step.map(|s| s as i64),
                t.to_step as i64,
                t.actor,
                t.reason,
                to_stored(&t.figures)?
            ],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Every rollout, newest first; only those still routing traffic if `open_only`.
    pub(super) fn list(&self, open_only: bool) -> Result<Vec<RolloutRecord>, StoreError> {
        let conn = self.conn.lock().expect("store lock poisoned");
        let mut stmt = conn
            .prepare(
                "SELECT id, model, champion, candidate, plan, state, step, step_started_at, \
                 created_at, backtest FROM rollouts ORDER BY created_at DESC",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(RolloutRow {
                    id: r.get(0)?,
                    model: r.get(1)?,
                    champion: r.get(2)?,
                    candidate: r.get(3)?,
                    plan: r.get(4)?,
                    state: r.get(5)?,
                    step: r.get(6)?,
                    step_started_at: r.get(7)?,
                    created_at: r.get(8)?,
                    backtest: r.get(9)?,
                })
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let record = row.map_err(err)?.parse()?;
            if !open_only || record.state.is_open() {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// A rollout's transitions, oldest first.
    pub(super) fn transitions(&self, rollout_id: &str) -> Result<Vec<Transition>, StoreError> {
        let conn = self.conn.lock().expect("store lock poisoned");
        let mut stmt = conn
            .prepare(
                "SELECT at, from_state, to_state, from_step, to_step, actor, reason, figures \
                 FROM rollout_transitions WHERE rollout_id = ?1 ORDER BY id",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([rollout_id], |r| {
                Ok(TransitionRow {
                    at: r.get(0)?,
                    from_state: r.get(1)?,
                    to_state: r.get(2)?,
                    from_step: r.get(3)?,
                    to_step: r.get(4)?,
                    actor: r.get(5)?,
                    reason: r.get(6)?,
                    figures: r.get(7)?,
                })
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(err)?.parse()?);
        }
        Ok(out)
    }

    /// Keeps one guardrail snapshot.
    pub(super) fn save_snapshot(&self, rollout_id: &str, s: &Snapshot) -> Result<(), StoreError> {
        let conn = self.conn.lock().expect("store lock poisoned");
        conn.execute(
            "INSERT INTO rollout_readings (rollout_id, at, step, share_bp, figures) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                rollout_id,
                s.at,
                s.step as i64,
                s.share_bp,
                to_stored(&s.figures)?
            ],
        )
        .map_err(err)?;
        Ok(())
    }

    /// A rollout's guardrail snapshots, oldest first.
    pub(super) fn snapshots(&self, rollout_id: &str) -> Result<Vec<Snapshot>, StoreError> {
        let conn = self.conn.lock().expect("store lock poisoned");
        let mut stmt = conn
            .prepare(
                "SELECT at, step, share_bp, figures FROM rollout_readings \
                 WHERE rollout_id = ?1 ORDER BY id",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([rollout_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (at, step, share_bp, figures) = row.map_err(err)?;
            out.push(Snapshot {
                at,
                step: step as usize,
                share_bp,
                figures: from_stored(&figures)?,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Plan;

    #[test]
    fn a_rollout_and_its_transitions_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::RolloutStore::open(&dir.path().join("d.db")).unwrap();
        let mut r = RolloutRecord {
            id: "r1".into(),
            model: "m".into(),
            champion: "v1".into(),
            candidate: "v2".into(),
            plan: Plan::default(),
            state: State::Active,
            step: 0,
            step_started_at: "2026-11-28T00:00:00Z".into(),
            created_at: "2026-11-28T00:00:00Z".into(),
            backtest: None,
        };
        let t = Transition {
            at: "2026-11-28T00:00:00Z".into(),
            from_state: None,
            to_state: State::Active,
            from_step: None,
            to_step: 0,
            actor: "test".into(),
            reason: "start".into(),
            figures: vec![],
        };
        store.save(&r, &t).unwrap();
        r.state = State::RolledBack;
        store
            .save(
                &r,
                &Transition {
                    from_state: Some(State::Active),
                    to_state: State::RolledBack,
                    ..t.clone()
                },
            )
            .unwrap();
        assert_eq!(store.list(false).unwrap().len(), 1);
        assert_eq!(store.get("r1").unwrap().unwrap(), r);
        assert!(store.open_for("m").unwrap().is_none());
        assert_eq!(store.transitions("r1").unwrap().len(), 2);
        let snap = Snapshot {
            at: "2026-11-28T00:00:01Z".into(),
            step: 0,
            share_bp: 100,
            figures: vec![],
        };
        store.save_snapshot("r1", &snap).unwrap();
        assert_eq!(store.snapshots("r1").unwrap(), vec![snap]);
        assert!(store.snapshots("r2").unwrap().is_empty());
    }
}
