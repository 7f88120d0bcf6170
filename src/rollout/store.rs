//! Rollouts and their transitions, kept in the decision log's SQLite file so that a restarted
//! server resumes the same step with the same assignment, and reviewers find rollouts next to
//! the decisions they produced.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, params};

use super::guardrails::GuardrailReading;
use super::{Plan, State};
use crate::backtest::BacktestReport;

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

/// The version of the JSON the store writes into its text columns (plan, backtest,
/// figures): `{"v": 1, "data": …}`. A row written before the envelope holds the bare value
/// and reads as version 1. Every field added to a stored type takes a serde default, so that
/// rows written before it still read (`stored_rows_of_version_1_still_read` pins literal
/// rows); a change that cannot be expressed so gets version 2 and a conversion here.
const STORED_VERSION: u64 = 1;

fn to_stored<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(&serde_json::json!({ "v": STORED_VERSION, "data": value })).map_err(err)
}

fn from_stored<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    let mut value: serde_json::Value = serde_json::from_str(text).map_err(err)?;
    let data = match value.as_object_mut() {
        Some(o) if o.len() == 2 && o.contains_key("v") && o.contains_key("data") => {
            match o["v"].as_u64() {
                Some(STORED_VERSION) => o.remove("data").expect("checked"),
                v => {
                    return Err(err(format!(
                        "a stored row has format {v:?}; this release reads {STORED_VERSION} \
                         (was it written by a newer release?)"
                    )));
                }
            }
        }
        _ => value,
    };
    serde_json::from_value(data).map_err(err)
}

/// Why the store failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("rollout store: {0}")]
pub struct StoreError(pub String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRecord {
    pub id: String,
    pub model: String,
    pub champion: String,
    pub candidate: String,
    pub plan: Plan,
    pub state: State,
    pub step: usize,
    /// RFC 3339.
    pub step_started_at: String,
    pub created_at: String,
    /// The preview run before the start, unless it was skipped.
    pub backtest: Option<BacktestReport>,
}

/// One change of a rollout: who, when, why, with the guardrail figures of that moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub at: String,
    pub from_state: Option<State>,
    pub to_state: State,
    pub from_step: Option<usize>,
    pub to_step: usize,
    pub actor: String,
    pub reason: String,
    pub figures: Vec<GuardrailReading>,
}

/// The guardrails of a rollout at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub at: String,
    pub step: usize,
    pub share_bp: u32,
    pub figures: Vec<GuardrailReading>,
}

/// The rollout tables, on their own connection to the log's file.
#[derive(Debug)]
pub struct RolloutStore {
    conn: Mutex<Connection>,
}

impl RolloutStore {
    pub fn open(path: &Path) -> Result<RolloutStore, StoreError> {
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
        Ok(RolloutStore {
            conn: Mutex::new(conn),
        })
    }

    /// Writes the rollout's current row and one transition, atomically.
    pub fn save(&self, r: &RolloutRecord, t: &Transition) -> Result<(), StoreError> {
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
    pub fn list(&self, open_only: bool) -> Result<Vec<RolloutRecord>, StoreError> {
        let conn = self.conn.lock().expect("store lock poisoned");
        let mut stmt = conn
            .prepare(
                "SELECT id, model, champion, candidate, plan, state, step, step_started_at, \
                 created_at, backtest FROM rollouts ORDER BY created_at DESC",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, String>(8)?,
                    r.get::<_, Option<String>>(9)?,
                ))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, model, champion, candidate, plan, state, step, started, created, backtest) =
                row.map_err(err)?;
            let state = State::parse(&state).ok_or_else(|| err(format!("bad state {state}")))?;
            if open_only && !state.is_open() {
                continue;
            }
            out.push(RolloutRecord {
                id,
                model,
                champion,
                candidate,
                plan: from_stored(&plan)?,
                state,
                step: step as usize,
                step_started_at: started,
                created_at: created,
                backtest: backtest.as_deref().map(from_stored).transpose()?,
            });
        }
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError> {
        Ok(self.list(false)?.into_iter().find(|r| r.id == id))
    }

    /// A rollout's transitions, oldest first.
    pub fn transitions(&self, rollout_id: &str) -> Result<Vec<Transition>, StoreError> {
        let conn = self.conn.lock().expect("store lock poisoned");
        let mut stmt = conn
            .prepare(
                "SELECT at, from_state, to_state, from_step, to_step, actor, reason, figures \
                 FROM rollout_transitions WHERE rollout_id = ?1 ORDER BY id",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([rollout_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, String>(7)?,
                ))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (at, from, to, from_step, to_step, actor, reason, figures) = row.map_err(err)?;
            out.push(Transition {
                at,
                from_state: from.as_deref().and_then(State::parse),
                to_state: State::parse(&to).ok_or_else(|| err(format!("bad state {to}")))?,
                from_step: from_step.map(|s| s as usize),
                to_step: to_step as usize,
                actor,
                reason,
                figures: from_stored(&figures)?,
            });
        }
        Ok(out)
    }

    /// Keeps one guardrail snapshot.
    pub fn save_snapshot(&self, rollout_id: &str, s: &Snapshot) -> Result<(), StoreError> {
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
    pub fn snapshots(&self, rollout_id: &str) -> Result<Vec<Snapshot>, StoreError> {
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

    /// The open rollout of a model, if any.
    pub fn open_for(&self, model: &str) -> Result<Option<RolloutRecord>, StoreError> {
        Ok(self.list(true)?.into_iter().find(|r| r.model == model))
    }

    /// How many rollouts are stored (tests).
    #[cfg(test)]
    fn count(&self) -> i64 {
        let conn = self.conn.lock().unwrap();
        conn.query_row("SELECT COUNT(*) FROM rollouts", [], |r| r.get(0))
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rollout::guardrails::Thresholds;

    /// Rows as this release writes them (version 1) and as releases before the envelope did,
    /// literally: a field added to a stored type without a default fails here.
    #[test]
    fn stored_rows_of_version_1_still_read() {
        let plan = r#"{"v":1,"data":{"steps":[{"share_bp":0,"shadow":true,"min_bake_secs":300,"min_decisions":500},{"share_bp":100,"shadow":false,"min_bake_secs":60,"min_decisions":200}],"auto_advance":false}}"#;
        let plan: Plan = from_stored(plan).unwrap();
        assert_eq!(plan.steps.len(), 2);
        assert!(!plan.auto_advance);
        assert_eq!(plan.guardrails, Thresholds::default());
        let bare = r#"{"steps":[{"share_bp":100}]}"#;
        let plan: Plan = from_stored(bare).unwrap();
        assert_eq!(plan.steps[0].min_decisions, 500);
        let figures = r#"{"v":1,"data":[{"name":"decline_rate","value":0.02,"threshold":0.05,"p_value":0.3,"candidate_n":250,"champion_n":2400,"breached":false,"note":""}]}"#;
        let figures: Vec<GuardrailReading> = from_stored(figures).unwrap();
        assert_eq!(figures[0].candidate_n, 250);
        let newer = r#"{"v":2,"data":{}}"#;
        let e = from_stored::<Plan>(newer).unwrap_err();
        assert!(e.0.contains("newer release"), "{e}");
        assert_eq!(
            from_stored::<Plan>(&to_stored(&plan).unwrap()).unwrap(),
            plan
        );
    }

    #[test]
    fn a_rollout_and_its_transitions_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = RolloutStore::open(&dir.path().join("d.db")).unwrap();
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
        assert_eq!(store.count(), 1);
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
