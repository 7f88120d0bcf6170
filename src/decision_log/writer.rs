//! The journal's writer: one thread that turns queued decisions into chained records and
//! makes each group durable with one write and one fdatasync before anyone is answered.
//!
//! Per group: take the first queued job and whatever else is queued (up to `max_batch`
//! decisions); for each served decision check its request id (this group, the tail, then —
//! only if the Bloom filter says it may be there — the view); give each new record its seq,
//! its bytes (format 3) and its chain hash; append them all; then answer. A failed append
//! fails every job of the group, and the writer accepts nothing until a probe proves the
//! disk takes a group of the failed group's size at the place it would go (see
//! [`Journal::probe`]); a journal file removed or replaced underneath is damage no probe
//! heals.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{oneshot, watch};

use super::group::{self, Chainer, Encoder, GroupAnswer, Head, Job};
use super::journal::{Journal, Position};
use super::seen::SeenIds;
use super::tail::{Entry, Tail};
use super::{DecisionRecord, Durability, LogError, NewBody, view};

/// How long an unhealthy writer waits between recovery attempts when no decision arrives.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// With `durability = "async"`, how often written groups are fdatasynced.
const ASYNC_SYNC_EVERY: Duration = Duration::from_millis(200);
/// The smallest probe: a group of one record.
const MIN_PROBE: usize = 4096;

pub(super) enum Msg {
    Append(Box<Job>),
    /// Retention: remove the closed segments whose records are all older than `before_us`
    /// (µs since the epoch) and the view holds.
    Prune {
        before_us: i64,
        reply: std::sync::mpsc::Sender<Result<Option<Pruned>, LogError>>,
    },
    Close,
}

/// What a retention pass removed: whole segments, through this seq (now the anchor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub through_seq: i64,
    pub segments: usize,
}

pub(super) struct Writer {
    pub journal: Journal,
    pub encoder: Encoder,
    pub seen: SeenIds,
    pub tail: Arc<Tail>,
    pub head: Head,
    /// The view, read when the filter says a request id may be recorded already.
    pub view: Connection,
    pub healthy: watch::Sender<bool>,
    pub max_batch: usize,
    pub durability: Durability,
    /// The active segment and its file's (device, inode) as the writer created or opened it.
    pub segment_file: Option<(u64, (u64, u64))>,
    /// Why the writer stopped accepting decisions, while it has.
    pub down: Option<Down>,
    /// The view may trail the journal by fewer records than this; at this many the writer
    /// refuses new decisions (the tail holding what the view lacks is memory) until the
    /// view has caught up to half of it.
    pub max_view_lag: i64,
    /// Refusing because the view trails by `max_view_lag` or more.
    pub view_behind: bool,
    /// Groups written but not yet synced (async durability).
    pub unsynced: bool,
    /// Where retention writes its anchor.
    pub files: super::journaled::LogFiles,
    pub answerer: Answerer,
}

/// How a group's answers reach the requests waiting for them.
///
/// Each answer wakes its request's task. Woken from this thread, outside the runtime, a wake
/// can cost a write to the runtime's eventfd and a switch to the worker it unparks, on the
/// core the requests share: one per request. Handed to a task of the runtime instead, a
/// group costs one such wake, and the task's own wakes stay inside the runtime (5% more
/// Score at c=32 here, BENCHMARKS.md). Only a multi-threaded runtime is used, whose workers
/// run the task whatever the thread that opened the log does next; with none, or once its
/// runtime is gone, the writer answers itself.
pub(super) struct Answerer {
    runtime: Option<tokio::sync::mpsc::UnboundedSender<Answers>>,
}

/// A group's answers, each with the channel its request waits on.
type Answers = Vec<(oneshot::Sender<GroupAnswer>, GroupAnswer)>;

impl Answerer {
    /// A task on the current runtime if it is multi-threaded, else the writer itself.
    pub fn on_current_runtime() -> Answerer {
        let handle = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let runtime = handle.map(|h| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Answers>();
            h.spawn(async move {
                while let Some(group) = rx.recv().await {
                    answer_each(group);
                }
            });
            tx
        });
        Answerer { runtime }
    }

    fn deliver(&self, answers: Answers) {
        match &self.runtime {
            Some(tx) => {
                if let Err(returned) = tx.send(answers) {
                    answer_each(returned.0);
                }
            }
            None => answer_each(answers),
        }
    }
}

fn answer_each(answers: Answers) {
    for (reply, answer) in answers {
        // A request that stopped waiting (its client went away) needs no answer.
        let _ = reply.send(answer);
    }
}

/// An unusable writer: the failed group's size (what a probe must prove), or damage.
#[derive(Debug, Clone)]
pub(super) enum Down {
    Failed { group_bytes: usize },
    Damaged(String),
}

/// (device, inode) of a file: a file removed or replaced under the writer shows.
pub(super) fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Writer {
    pub fn run(&mut self, rx: Receiver<Msg>) {
        let mut last_sync = Instant::now();
        loop {
            let probe = (self.down.is_some() || self.view_behind).then_some(PROBE_EVERY);
            let sync = self
                .unsynced
                .then(|| ASYNC_SYNC_EVERY.saturating_sub(last_sync.elapsed()));
            let wait = match (probe, sync) {
                (Some(p), Some(s)) => Some(p.min(s)),
                (p, s) => p.or(s),
            };
            let first = match wait {
                None => match rx.recv() {
                    Ok(m) => m,
                    Err(_) => return,
                },
                Some(d) => match rx.recv_timeout(d) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        if self.down.is_some() {
                            self.recover();
                        } else {
                            self.sync_written();
                            last_sync = Instant::now();
                        }
                        self.check_view_lag();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                },
            };
            let mut batch = Vec::new();
            let mut closing = false;
            let mut prune = None;
            match first {
                Msg::Append(job) => batch.push(*job),
                Msg::Prune { before_us, reply } => prune = Some((before_us, reply)),
                Msg::Close => closing = true,
            }
            // Gather what is queued; when the queue runs dry, yield once so that requests
            // already on their way (on this core or another) can join this group.
            let mut yielded = false;
            let mut decisions: usize = batch.iter().map(|j| j.bodies.len()).sum();
            while !closing && prune.is_none() && decisions < self.max_batch {
                match rx.try_recv() {
                    Ok(Msg::Append(job)) => {
                        decisions += job.bodies.len();
                        batch.push(*job);
                    }
                    Ok(Msg::Prune { before_us, reply }) => prune = Some((before_us, reply)),
                    Ok(Msg::Close) => closing = true,
                    Err(_) if !yielded => {
                        yielded = true;
                        std::thread::yield_now();
                    }
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit(batch);
            }
            if let Some((before_us, reply)) = prune {
                let _ = reply.send(self.prune(before_us));
            }
            if self.unsynced && last_sync.elapsed() >= ASYNC_SYNC_EVERY {
                self.sync_written();
                last_sync = Instant::now();
            }
            if closing {
                // Whatever was queued before Close is recorded; refuse the rest.
                while let Ok(Msg::Append(job)) = rx.try_recv() {
                    let _ = job.reply.send(Err(LogError::Unavailable(
                        "the server is shutting down".into(),
                    )));
                }
                self.sync_written();
                self.tail.close();
                return;
            }
        }
    }

    /// Retention: removes the closed segments whose every record is older than `before_us`
    /// and in the view, oldest first. The anchor (the last removed record's seq and hash)
    /// is written first: a crash before the files go leaves records the anchor covers,
    /// which verify skips and the next pass removes.
    fn prune(&mut self, before_us: i64) -> Result<Option<Pruned>, LogError> {
        let indexed = view::indexed_seq(&self.view)?;
        let mut cut: Option<(i64, String)> = None;
        for w in self.journal.segment_starts().windows(2) {
            // The last record of the segment starting at w[0].
            let last = w[1] as i64 - 1;
            if last > indexed {
                break;
            }
            match view::time_and_hash(&self.view, last)? {
                Some((at, hash)) if at < before_us => cut = Some((last, hash)),
                _ => break,
            }
        }
        let Some((seq, hash)) = cut else {
            return Ok(None);
        };
        self.files.write_anchor(seq, &hash)?;
        let segments = self
            .journal
            .remove_before(seq as u64 + 1)
            .map_err(|e| LogError::Unavailable(format!("removing old segments: {e}")))?;
        Ok(Some(Pruned {
            through_seq: seq,
            segments,
        }))
    }

    fn sync_written(&mut self) {
        if !self.unsynced {
            return;
        }
        match self.journal.sync_active() {
            Ok(()) => self.unsynced = false,
            Err(e) => {
                tracing::error!(error = %e, "decision log sync failed");
                self.go_down(Down::Failed {
                    group_bytes: MIN_PROBE,
                });
            }
        }
    }

    /// Records a group. The jobs' bodies move into their records: nothing is copied on the
    /// acknowledgement path.
    fn commit(&mut self, mut batch: Vec<Job>) {
        if self.down.is_some() {
            self.recover();
        }
        self.check_view_lag();
        let why = match &self.down {
            Some(Down::Damaged(d)) => Some(format!("the decision log is damaged: {d}")),
            Some(Down::Failed { .. }) => {
                Some("the log cannot be written; waiting for the disk to recover".into())
            }
            None if self.view_behind => Some(format!(
                "the query view trails the decision journal by {} decisions (log_max_view_lag \
                 {}); new decisions are refused until it catches up",
                self.tail.lag(),
                self.max_view_lag
            )),
            None => None,
        };
        if let Some(why) = why {
            for job in batch {
                let _ = job.reply.send(Err(LogError::Unavailable(why.clone())));
            }
            return;
        }
        let started = Instant::now();
        let mut head = self.head.clone();
        let (fresh, answers) = group::plan(self, &mut head, &mut batch);
        let group_bytes: usize = fresh.iter().map(|f| f.payload().len() + 16).sum();
        let written = if fresh.is_empty() {
            Ok(Vec::new())
        } else {
            let payloads: Vec<&[u8]> = fresh.iter().map(|f| f.payload()).collect();
            self.journal.append(&payloads).map_err(|e| e.to_string())
        };
        let written = written.and_then(|positions| {
            // Written, but to the file the journal opened? One removed or replaced
            // underneath took these decisions with it. A rotation made a new file.
            let Some(last) = positions.last() else {
                return Ok(positions);
            };
            let found = file_identity(self.journal.active_path());
            match self.segment_file {
                Some((segment, id)) if segment == last.segment && found != Some(id) => {
                    Err(format!(
                        "{} was removed or replaced while open",
                        self.journal.active_path().display()
                    ))
                }
                Some((segment, _)) if segment == last.segment => Ok(positions),
                _ => {
                    self.segment_file = found.map(|id| (last.segment, id));
                    Ok(positions)
                }
            }
        });
        match written {
            Ok(positions) => {
                if self.durability == Durability::Async && !fresh.is_empty() {
                    self.unsynced = true;
                }
                let decisions = fresh.len();
                let entries: Vec<Arc<Entry>> = fresh
                    .into_iter()
                    .zip(positions)
                    .map(|(mut f, position)| {
                        if let Some(id) = &f.request_id {
                            self.seen.insert(id);
                        }
                        f.position = position;
                        Arc::new(f)
                    })
                    .collect();
                self.head = head;
                let answers = group::answers(answers, |i| entries[i].seq());
                // Readable before anyone is answered: read-your-writes.
                self.tail.push(entries);
                self.answerer
                    .deliver(batch.into_iter().map(|j| j.reply).zip(answers).collect());
                crate::telemetry::metrics().log_commit(decisions, started.elapsed());
            }
            Err(e) => {
                tracing::error!(error = %e, batch = batch.len(), "decision log append failed; failing the group");
                // Unhealthy before anyone hears of the failure.
                let down = if e.contains("removed or replaced") {
                    Down::Damaged(e.clone())
                } else {
                    Down::Failed {
                        group_bytes: group_bytes.max(MIN_PROBE),
                    }
                };
                self.go_down(down);
                for job in batch {
                    let _ = job.reply.send(Err(LogError::Unavailable(e.clone())));
                }
                self.recover();
            }
        }
    }

    fn go_down(&mut self, down: Down) {
        if let (Some(Down::Damaged(_)), Down::Failed { .. }) = (&self.down, &down) {
            return;
        }
        self.down = Some(down);
        self.publish_health();
    }

    /// Healthy while the journal takes writes and the view keeps up.
    fn publish_health(&self) {
        let healthy = self.down.is_none() && !self.view_behind;
        self.healthy
            .send_if_modified(|h| std::mem::replace(h, healthy) != healthy);
    }

    /// Starts refusing new decisions once the view trails the journal by `max_view_lag`, and
    /// stops once it trails by half of that or less: the tail, in memory, holds every record
    /// the view lacks, and a view that cannot be written (a reviewer's tool holding its write
    /// lock, a failing disk) must not let it grow until the process runs out of memory.
    fn check_view_lag(&mut self) {
        let lag = self.tail.lag();
        let behind = if self.view_behind {
            lag > self.max_view_lag / 2
        } else {
            lag >= self.max_view_lag
        };
        if behind == self.view_behind {
            return;
        }
        self.view_behind = behind;
        if behind {
            tracing::warn!(
                lag,
                limit = self.max_view_lag,
                "the query view trails the decision journal too far; refusing new decisions until it catches up"
            );
        } else {
            tracing::info!(lag, "the query view has caught up; taking decisions again");
        }
        self.publish_health();
    }

    /// Proves the journal takes a group like the one that failed; healthy again only then.
    fn recover(&mut self) {
        let Some(Down::Failed { group_bytes }) = self.down.clone() else {
            return;
        };
        let active = self.journal.active_path().to_path_buf();
        if self.segment_file.map(|(_, id)| id) != file_identity(&active) {
            self.down = Some(Down::Damaged(format!(
                "{} was removed or replaced while open",
                active.display()
            )));
            return;
        }
        match self.journal.probe(group_bytes) {
            Ok(()) => {
                tracing::info!(dir = %self.journal.dir().display(), probe_bytes = group_bytes, "decision log writable again");
                self.down = None;
                self.publish_health();
            }
            Err(e) => {
                tracing::debug!(error = %e, "decision log still unavailable");
            }
        }
    }
}

impl Chainer for Writer {
    type Entry = Entry;

    /// Only if the Bloom filter says it may be there (every id in the tail or the view is in
    /// it): the tail, then the view. Most ids are new, and the filter alone answers them.
    fn recorded_before(&self, id: &str) -> Result<Option<DecisionRecord>, LogError> {
        if !self.seen.may_contain(id) {
            return Ok(None);
        }
        if let Some(e) = self.tail.find_request(id) {
            return e.decode(&self.encoder.names).map(Some);
        }
        view::by_request(&self.view, &self.encoder.names, id)
            .map_err(|e| LogError::Unavailable(format!("looking up a request id: {e}")))
    }

    fn decode(&self, entry: &Entry) -> Result<DecisionRecord, LogError> {
        entry.decode(&self.encoder.names)
    }

    /// The journal entry (prev_hash | hash | record); its place in the journal is known once
    /// the group is written.
    fn chain(&mut self, head: &mut Head, body: NewBody) -> Entry {
        // A binary record of 21 features is at most ~440 bytes (~300 with an integer
        // vector): room for it and its hashes, so that the vector never grows.
        let mut payload = Vec::with_capacity(64 + 512);
        let request_id = group::link(&mut self.encoder, head, body, &mut payload);
        Entry::new(
            Position {
                seq: head.seq as u64,
                segment: 0,
                offset: 0,
            },
            payload,
            request_id,
        )
    }

    fn request_id(entry: &Entry) -> Option<&str> {
        entry.request_id.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::decision_log::journaled::{JournalLog, LogOptions};
    use crate::decision_log::record::tests::{body, schema};
    use crate::decision_log::{Appended, DecisionLog, NewBody};

    /// The runtime a log was opened in may be gone while the log lives on: its answers
    /// then come from the writer, not from a task nobody runs.
    #[test]
    fn a_decision_is_answered_after_the_runtime_that_opened_the_log_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let opener = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let log = opener
            .block_on(async { JournalLog::open(dir.path(), LogOptions::default()) })
            .unwrap();
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let record = |request_id: &str| {
            let mut b = body(&schema());
            b.request_id = request_id.into();
            b.decision_id = uuid::Uuid::now_v7().to_string();
            let append = log.append(NewBody::from(b));
            other
                .block_on(async { tokio::time::timeout(Duration::from_secs(30), append).await })
                .expect("answered")
                .expect("recorded")
        };
        // Through a task of the opener's runtime while it runs; by the writer once gone.
        assert!(matches!(record("r-1"), Appended::New { seq: 1 }));
        drop(opener);
        assert!(matches!(record("r-2"), Appended::New { seq: 2 }));
        log.close();
    }
}
