//! The decision log as it serves: acknowledged from the journal, queried from the view.
//!
//! Three threads share it. The writer (see [`super::writer`]) makes each group durable in the
//! journal and only then answers, and hands the group to the tail. The indexer, at nice 19,
//! takes the tail in large batches into the SQLite view (one transaction each, with the
//! journal checkpoint). Readers query the view and add what the tail holds after the view's
//! checkpoint, so an acknowledged decision is visible at once. Aggregates and scans wait for
//! the view to catch up with the durable head instead (they are reports, not lookups).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{oneshot, watch};

use super::chain::{Verifier, link_hash_bytes};
use super::customer_filter::{self, CustomerFilters};
use super::group::{Encoder, Head, Job};
use super::journal::{self, Journal, JournalError, JournalOptions};
use super::names::FeatureNames;
use super::record::{decode_body, decode_entry};
use super::seen::SeenIds;
use super::tail::{Entry, Select, Tail};
use super::writer::{Answerer, Msg, Writer, file_identity};
use super::{
    AppendAllFuture, AppendFuture, DecisionLog, DecisionRecord, Durability, LogError, NewBody,
    RolloutDecisions, VerifyReport, VersionStats, Window, chain, migrate, set_nice, view,
};

/// Rows the indexer writes in one transaction at most.
const INDEX_BATCH: usize = 8_192;
/// How long the indexer waits for a batch to fill when nobody needs it sooner.
const INDEX_LINGER: Duration = Duration::from_millis(200);
/// Records the view may trail the journal by before the indexer gives up its low priority:
/// at nice 19 on a saturated core it would otherwise fall behind without bound.
const BOOST_LAG: i64 = 50_000;
/// How long an aggregate or a scan waits for the view to catch up.
const CATCH_UP: Duration = Duration::from_secs(30);

/// How the log is set up.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub durability: Durability,
    /// Most decisions in one group.
    pub max_batch: usize,
    /// Jobs waiting for the writer before new ones are refused.
    pub queue_capacity: usize,
    /// Preallocated size of a journal segment.
    pub segment_bytes: u64,
    /// Free space the file system must keep for the writer to call itself healthy after a
    /// failure (0: only the probe of a real group's size decides).
    pub min_free_bytes: u64,
    /// Retention: whole segments whose records are all older than this are removed (and
    /// their rows from the view), the chain kept verifiable from the anchor. None keeps
    /// everything.
    pub retention: Option<Duration>,
    /// Durable decisions the query view may trail the journal by, held in memory meanwhile;
    /// at this many new decisions are refused (and the log reports itself unhealthy) until
    /// the view has caught up to half of it.
    pub max_view_lag: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            durability: Durability::Sync,
            max_batch: 512,
            queue_capacity: 16_384,
            segment_bytes: 64 << 20,
            min_free_bytes: 0,
            retention: None,
            max_view_lag: 1_000_000,
        }
    }
}

/// The files of a data directory the log owns.
#[derive(Debug, Clone)]
pub struct LogFiles {
    /// The query view.
    pub view: PathBuf,
    /// Says the view has writes no fsync covered, and under which boot (see
    /// [`view::distrust_after_reboot`]).
    pub view_unsynced: PathBuf,
    /// The embedded rollout store: its own file, as it cannot be rebuilt from the journal.
    pub rollouts: PathBuf,
    /// The journal's segments.
    pub journal: PathBuf,
    /// Feature names by bundle digest.
    pub names: PathBuf,
    /// The retention anchor: the seq and hash of the last record removed.
    pub anchor: PathBuf,
}

impl LogFiles {
    pub fn of(data_dir: &Path) -> LogFiles {
        let journal = data_dir.join("journal");
        LogFiles {
            view: data_dir.join("decisions.db"),
            view_unsynced: data_dir.join("decisions.db.unsynced"),
            rollouts: data_dir.join("rollouts.db"),
            names: journal.join("names"),
            anchor: journal.join("anchor"),
            journal,
        }
    }

    /// The (seq, hash) verification starts after, if records were removed by retention.
    pub fn read_anchor(&self) -> Result<Option<(i64, String)>, LogError> {
        match std::fs::read_to_string(&self.anchor) {
            Ok(text) => {
                let mut parts = text.split_whitespace();
                let seq = parts.next().and_then(|s| s.parse::<i64>().ok());
                let hash = parts.next().map(str::to_string);
                match (seq, hash) {
                    (Some(seq), Some(hash)) => Ok(Some((seq, hash))),
                    _ => Err(LogError::Damaged(format!(
                        "{} is not `seq hash`",
                        self.anchor.display()
                    ))),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LogError::Damaged(format!("{}: {e}", self.anchor.display()))),
        }
    }

    /// Writes the anchor (temp file, fsync, rename, fsync of the directory).
    pub fn write_anchor(&self, seq: i64, hash: &str) -> Result<(), LogError> {
        let io = |e: std::io::Error| LogError::Unavailable(format!("writing the anchor: {e}"));
        std::fs::create_dir_all(&self.journal).map_err(io)?;
        let tmp = self.anchor.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        std::io::Write::write_all(&mut f, format!("{seq} {hash}\n").as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.anchor).map_err(io)?;
        std::fs::File::open(&self.journal)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

fn journal_err(e: JournalError) -> LogError {
    match e {
        JournalError::Corrupt { .. } | JournalError::BadPosition { .. } => {
            LogError::Damaged(e.to_string())
        }
        other => LogError::Unavailable(other.to_string()),
    }
}

/// The decision log of a data directory.
pub struct JournalLog {
    files: LogFiles,
    names: Arc<FeatureNames>,
    queue: SyncSender<Msg>,
    healthy: watch::Receiver<bool>,
    tail: Arc<Tail>,
    torn: Option<journal::TornTail>,
    writer: Mutex<Option<JoinHandle<()>>>,
    indexer: Mutex<Option<JoinHandle<()>>>,
    /// The retention thread and the sender whose drop stops it.
    retainer: Mutex<Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>>,
    readers: Mutex<Vec<Connection>>,
    /// Which spans of the view may hold a customer, for history lookups.
    filters: Arc<CustomerFilters>,
}

impl std::fmt::Debug for JournalLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalLog")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl JournalLog {
    /// Opens the log of `data_dir` (creating it, or migrating a log of the previous format),
    /// recovers the journal from the view's checkpoint, and starts the writer and indexer.
    /// A corrupt journal refuses to open, naming the segment and offset.
    pub fn open(data_dir: &Path, options: LogOptions) -> Result<Arc<JournalLog>, LogError> {
        let files = LogFiles::of(data_dir);
        std::fs::create_dir_all(data_dir)
            .map_err(|e| LogError::Unavailable(format!("{}: {e}", data_dir.display())))?;
        // Before anything opens the view: one a crash of the machine may have damaged goes,
        // and is rebuilt from the journal below.
        view::distrust_after_reboot(&files)?;
        let mut conn = view::open_rw(&files.view)?;
        migrate::move_rollouts(&conn, &files)?;
        migrate::prepare(&mut conn, &files)?;
        view::mark_unsynced(&files)?;
        let names = Arc::new(
            FeatureNames::open(&files.names)
                .map_err(|e| LogError::Damaged(format!("{}: {e}", files.names.display())))?,
        );
        let checkpoint = view::checkpoint(&conn)?;
        let anchor = files.read_anchor()?;
        let opts = JournalOptions {
            segment_size: options.segment_bytes,
            min_free_bytes: options.min_free_bytes,
            first_seq: anchor.as_ref().map_or(1, |(seq, _)| *seq as u64 + 1),
            sync_each_group: options.durability == Durability::Sync,
        };
        let filters = Arc::new(CustomerFilters::default());
        let mut view_writer = view::ViewWriter::new(conn, names.clone(), filters.clone())?;
        let mut recovered = Vec::new();
        let mut bad = None;
        // Far behind (a view rebuilt after an upgrade or a loss), the records are indexed as
        // they are read, so that memory holds one batch rather than the whole journal. If
        // the view cannot be written now, the rest waits in the tail for the indexer.
        let mut index_now = true;
        let (mut journal, torn) = Journal::open_with(&files.journal, opts, checkpoint, |r| {
            if bad.is_some() {
                return;
            }
            match Entry::read(r.position, r.payload, &names) {
                Ok(e) => recovered.push(Arc::new(e)),
                Err(e) => {
                    bad = Some(e);
                    return;
                }
            }
            if index_now && recovered.len() >= INDEX_BATCH {
                match view_writer.insert(&recovered) {
                    Ok(()) => recovered.clear(),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot index the journal into the view while opening; the indexer will");
                        index_now = false;
                    }
                }
            }
        })
        .map_err(journal_err)?;
        if let Some(e) = bad {
            return Err(e);
        }
        journal.make_segments_ahead();
        if let Some(t) = &torn {
            tracing::warn!(
                segment = %t.segment.display(),
                offset = t.offset,
                bytes_dropped = t.bytes_dropped,
                "cut a torn tail off the journal: an incomplete group no client was told of"
            );
        }
        let head = match journal.last() {
            None => match &anchor {
                Some((seq, hash)) => Head::new(*seq, hash.clone()),
                None => Head::new(0, chain::GENESIS.to_string()),
            },
            Some(last) => {
                let r = journal.read_at(last).map_err(journal_err)?;
                let e = decode_entry(&r.payload)
                    .map_err(|e| LogError::Damaged(format!("the journal's last record: {e}")))?;
                Head::new(last.seq as i64, e.hash)
            }
        };
        let indexed = view::indexed_seq(view_writer.conn())?;
        if indexed > head.seq {
            return Err(LogError::Damaged(format!(
                "the view holds records up to seq {indexed} but the journal ends at seq {}: \
                 journal segments were removed or cut short",
                head.seq
            )));
        }
        let tail = Arc::new(Tail::new(indexed, indexed));
        let mut seen = SeenIds::new(1 << 20);
        view::each_request_id(view_writer.conn(), |id| seen.insert(id))?;
        for e in &recovered {
            if let Some(id) = &e.request_id {
                seen.insert(id);
            }
        }
        if !recovered.is_empty() {
            tracing::info!(
                records = recovered.len(),
                "journal records after the view's checkpoint, indexing"
            );
        }
        tail.push(recovered);

        let (queue, rx) = std::sync::mpsc::sync_channel(options.queue_capacity.max(1));
        let (healthy_tx, healthy) = watch::channel(true);
        let segment_file =
            file_identity(journal.active_path()).map(|id| (active_segment(&journal), id));
        let mut writer = Writer {
            journal,
            encoder: Encoder::new(names.clone()),
            seen,
            tail: tail.clone(),
            head,
            view: view::open_ro(&files.view)?,
            healthy: healthy_tx,
            max_batch: options.max_batch.max(1),
            durability: options.durability,
            segment_file,
            down: None,
            max_view_lag: options.max_view_lag.clamp(1, i64::MAX as u64) as i64,
            view_behind: false,
            unsynced: false,
            files: files.clone(),
            answerer: Answerer::on_current_runtime(),
        };
        let writer = std::thread::Builder::new()
            .name("decision-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| LogError::Unavailable(format!("starting the writer: {e}")))?;
        let indexer_tail = tail.clone();
        let indexer = std::thread::Builder::new()
            .name("decision-log-indexer".into())
            .spawn(move || index(view_writer, &indexer_tail))
            .map_err(|e| LogError::Unavailable(format!("starting the indexer: {e}")))?;
        let retainer = match options.retention {
            None => None,
            Some(keep) => {
                let (stop, stopped) = std::sync::mpsc::channel();
                let (queue, files, filters) = (queue.clone(), files.clone(), filters.clone());
                let handle = std::thread::Builder::new()
                    .name("decision-log-retention".into())
                    .spawn(move || retain(&queue, &files, &filters, keep, &stopped))
                    .map_err(|e| LogError::Unavailable(format!("starting retention: {e}")))?;
                Some((stop, handle))
            }
        };
        Ok(Arc::new(JournalLog {
            files,
            names,
            queue,
            healthy,
            tail,
            torn,
            writer: Mutex::new(Some(writer)),
            indexer: Mutex::new(Some(indexer)),
            retainer: Mutex::new(retainer),
            readers: Mutex::new(Vec::new()),
            filters,
        }))
    }

    pub fn files(&self) -> &LogFiles {
        &self.files
    }

    /// The torn tail cut off the journal when it was opened, if there was one.
    pub fn torn(&self) -> Option<&journal::TornTail> {
        self.torn.as_ref()
    }

    /// How many durable records the view does not hold yet.
    pub fn index_lag(&self) -> i64 {
        self.tail.lag()
    }

    /// Runs `f` on a pooled read-only connection to the view.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, LogError>) -> Result<T, LogError> {
        let pooled = self.readers.lock().expect("reader pool poisoned").pop();
        let conn = match pooled {
            Some(c) => c,
            None => view::open_ro(&self.files.view)?,
        };
        let result = f(&conn);
        self.readers
            .lock()
            .expect("reader pool poisoned")
            .push(conn);
        result
    }

    /// What the view says (`query`, in one read transaction) together with the tail's
    /// records after the view's checkpoint that `select` selects.
    fn with_tail<T>(
        &self,
        query: impl Fn(&Connection) -> Result<T, LogError>,
        select: &Select<'_>,
    ) -> Result<(T, Vec<Arc<Entry>>), LogError> {
        loop {
            let (found, c) = self.read(|conn| {
                // Prepared once per connection: parsing them was ~2% of a history lookup.
                let run = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([]));
                run("BEGIN").map_err(view::query_err)?;
                let result = view::indexed_seq(conn).and_then(|c| Ok((query(conn)?, c)));
                let _ = run("COMMIT");
                result
            })?;
            if let Some(extra) = self.tail.after(c, &select.matcher(), &self.names) {
                return Ok((found, extra));
            }
        }
    }

    /// Waits until the view holds every record durable now.
    fn catch_up(&self) -> Result<(), LogError> {
        let head = self.tail.head();
        if self.tail.wait_indexed(head, CATCH_UP) {
            Ok(())
        } else {
            Err(LogError::Unavailable(format!(
                "the query view is {} records behind the journal; try again",
                self.tail.lag()
            )))
        }
    }
}

/// The segment the journal appends to now (its name is its first seq).
fn active_segment(journal: &Journal) -> u64 {
    journal
        .active_path()
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The retention thread: every `keep / 10` (1 s to 1 h), asks the writer to remove the
/// segments older than `keep`, then deletes their rows from the view (also rows a crash
/// left behind an anchor). Stops when `stop`'s sender is dropped or the writer is gone.
fn retain(
    queue: &SyncSender<Msg>,
    files: &LogFiles,
    filters: &CustomerFilters,
    keep: Duration,
    stop: &std::sync::mpsc::Receiver<()>,
) {
    let every = (keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(3_600));
    let mut conn = None;
    loop {
        match stop.recv_timeout(every) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let Some(before) = std::time::SystemTime::now()
            .checked_sub(keep)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        else {
            continue;
        };
        let (reply, answer) = std::sync::mpsc::channel();
        let before_us = i64::try_from(before.as_micros()).unwrap_or(i64::MAX);
        if queue.send(Msg::Prune { before_us, reply }).is_err() {
            return;
        }
        match answer.recv() {
            Ok(Ok(Some(p))) => tracing::info!(
                through_seq = p.through_seq,
                segments = p.segments,
                "retention removed journal segments; the chain verifies from the anchor"
            ),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "retention pass failed; trying again later"),
            Err(_) => return,
        }
        let anchor = match files.read_anchor() {
            Ok(Some((seq, _))) => seq,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "retention cannot read the anchor");
                continue;
            }
        };
        if conn.is_none() {
            conn = view::open_rw(&files.view)
                .map_err(|e| tracing::warn!(error = %e, "retention cannot open the view"))
                .ok();
        }
        if let Some(c) = &conn {
            match view::delete_through(c, anchor) {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    rows = n,
                    through_seq = anchor,
                    "retention removed view rows"
                ),
                Err(e) => tracing::warn!(error = %e, "retention could not delete view rows"),
            }
            match customer_filter::delete_through(c, anchor) {
                Ok(below) => filters.forget_below(below),
                Err(e) => tracing::warn!(error = %e, "retention could not delete customer filters"),
            }
        }
    }
}

/// The indexer: the tail into the view, batch by batch, until the tail is closed and drained.
/// It runs at nice 19 (the acknowledgement path comes first) unless the view trails by more
/// than [`BOOST_LAG`] records or a reader waits for it.
fn index(mut view: view::ViewWriter, tail: &Tail) {
    let mut nice = 19;
    set_nice(nice);
    let mut failing = false;
    let mut warned = false;
    loop {
        let want = if tail.lag() > BOOST_LAG || tail.readers_waiting() {
            0
        } else {
            19
        };
        if want != nice {
            if set_nice(want) {
                nice = want;
            } else if !warned {
                tracing::warn!(
                    lag = tail.lag(),
                    "the indexer cannot raise its priority; the view may trail the journal under sustained load"
                );
                warned = true;
            }
        }
        // Idle: build the customer filters a view written before them lacks (not once the
        // log closes: a shutdown does not wait for them).
        while tail.lag() == 0 && !tail.is_closed() && view.build_filter() {}
        let batch = tail.next_batch(INDEX_BATCH, INDEX_LINGER);
        let Some(last) = batch.last() else {
            return;
        };
        match view.insert(&batch) {
            Ok(()) => {
                if failing {
                    tracing::info!("the query view takes writes again");
                    failing = false;
                }
                tail.indexed_to(last.seq());
            }
            Err(e) => {
                // The journal has these records; the view catches up once it can, or on the
                // next start: a shutdown does not wait for a view that cannot be written.
                if tail.is_closed() {
                    tracing::warn!(error = %e, lag = tail.lag(), "stopping with the query view behind the journal; it catches up on the next start");
                    return;
                }
                if !failing {
                    tracing::error!(error = %e, "indexing into the query view failed; retrying");
                    failing = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

impl DecisionLog for JournalLog {
    fn append(&self, body: NewBody) -> AppendFuture {
        let group = self.append_all(vec![body]);
        Box::pin(async move {
            let mut appended = group.await?;
            Ok(appended.pop().expect("one answer for one decision"))
        })
    }

    fn append_all(&self, bodies: Vec<NewBody>) -> AppendAllFuture {
        let (reply, rx) = oneshot::channel();
        let queued = self
            .queue
            .try_send(Msg::Append(Box::new(Job { bodies, reply })));
        Box::pin(async move {
            match queued {
                Ok(()) => rx
                    .await
                    .unwrap_or_else(|_| Err(LogError::Unavailable("the writer stopped".into()))),
                Err(TrySendError::Full(_)) => {
                    Err(LogError::Unavailable("the write queue is full".into()))
                }
                Err(TrySendError::Disconnected(_)) => {
                    Err(LogError::Unavailable("the writer stopped".into()))
                }
            }
        })
    }

    fn healthy(&self) -> watch::Receiver<bool> {
        self.healthy.clone()
    }

    fn close(&self) {
        // Retention first: it talks to the writer.
        if let Some((stop, handle)) = self.retainer.lock().expect("retainer poisoned").take() {
            drop(stop);
            let _ = handle.join();
        }
        // A full queue still drains: this send waits for room.
        let _ = self.queue.send(Msg::Close);
        if let Some(handle) = self.writer.lock().expect("writer handle poisoned").take() {
            let _ = handle.join();
        }
        // The writer closed the tail; the indexer stops once the view holds all of it.
        if let Some(handle) = self.indexer.lock().expect("indexer handle poisoned").take() {
            let _ = handle.join();
            // Nothing writes the view now: make it durable, so that the next start trusts
            // it whatever happens to the machine meanwhile.
            if let Err(e) = view::sync_and_unmark(&self.files) {
                tracing::warn!(error = %e, "could not sync the query view; after a crash of the machine it is rebuilt from the journal");
            }
        }
    }

    fn get(&self, decision_id: &str) -> Result<Option<DecisionRecord>, LogError> {
        let (found, extra) = self.with_tail(
            |c| view::get(c, &self.names, decision_id),
            &Select::Decision(decision_id),
        )?;
        match found {
            Some(r) => Ok(Some(r)),
            None => extra.first().map(|e| e.decode(&self.names)).transpose(),
        }
    }

    fn by_customer(&self, refs: &[String]) -> Result<Vec<DecisionRecord>, LogError> {
        let (mut found, extra) = self.with_tail(
            |c| view::by_customer(c, &self.names, &self.filters, refs),
            &Select::Customer { refs, before: None },
        )?;
        for e in &extra {
            found.push(e.decode(&self.names)?);
        }
        found.sort_by_key(|r| r.seq);
        found.dedup_by_key(|r| r.seq);
        Ok(found)
    }

    fn previous(&self, refs: &[String], seq: i64) -> Result<Option<DecisionRecord>, LogError> {
        let (found, extra) = self.with_tail(
            |c| view::previous(c, &self.names, &self.filters, refs, seq),
            &Select::Customer {
                refs,
                before: Some(seq),
            },
        )?;
        let later = extra.last().map(|e| e.decode(&self.names)).transpose()?;
        Ok(match (found, later) {
            (Some(a), Some(b)) => Some(if b.seq > a.seq { b } else { a }),
            (a, b) => a.or(b),
        })
    }

    fn version_stats(
        &self,
        model: &str,
        version: &str,
        window: &Window,
    ) -> Result<VersionStats, LogError> {
        self.catch_up()?;
        self.read(|c| view::version_stats(c, model, version, window))
    }

    fn rollout_decisions(
        &self,
        rollout_id: &str,
        since: &str,
    ) -> Result<RolloutDecisions, LogError> {
        self.catch_up()?;
        self.read(|c| view::rollout_decisions(c, rollout_id, since))
    }

    fn scan(
        &self,
        window: &Window,
        visit: &mut dyn FnMut(DecisionRecord) -> bool,
    ) -> Result<(), LogError> {
        self.catch_up()?;
        self.read(|c| view::scan(c, &self.names, window, visit))
    }

    fn verify(&self) -> Result<VerifyReport, LogError> {
        // The view finds records by hash when a broken link needs classifying.
        self.catch_up()?;
        let head = self.tail.head();
        self.read(|c| verify_journal(&self.files, &self.names, Some(head), Some(c)))
    }

    fn view_lag(&self) -> Option<u64> {
        Some(self.index_lag().max(0) as u64)
    }
}

/// Walks the journal (up to `upto`, or all of it) and checks every record: its frame, its
/// bytes against its hash, its link to the one before. `view`, if given, finds a record by
/// hash when a broken link needs classifying.
pub fn verify_journal(
    files: &LogFiles,
    names: &FeatureNames,
    upto: Option<i64>,
    view: Option<&Connection>,
) -> Result<VerifyReport, LogError> {
    let mut find = |hash: &str| view.and_then(|c| view::seq_of_hash(c, hash));
    let anchor = files.read_anchor()?;
    // Records the anchor covers may still be on disk (retention removes the files after
    // writing the anchor): verification starts after it.
    let covered = anchor.as_ref().map_or(0, |(seq, _)| *seq);
    let mut verifier = Verifier::new(&mut find, anchor);
    let mut unreadable: Option<(i64, String)> = None;
    let mut last_seq = 0;
    let walked = journal::read_only(&files.journal, |r| {
        let seq = r.position.seq as i64;
        if upto.is_some_and(|u| seq > u) {
            return false;
        }
        if seq <= covered {
            return true;
        }
        last_seq = seq;
        let at = format!(
            "segment {}, offset {}",
            r.position.segment, r.position.offset
        );
        let entry = match decode_entry(&r.payload) {
            Ok(e) => e,
            Err(e) => {
                unreadable = Some((seq, format!("record seq {seq} ({at}) is unreadable: {e}")));
                return false;
            }
        };
        let actual = hex::encode(link_hash_bytes(&entry.prev_hash, entry.record));
        let body = match decode_body(entry.record, |d| names.get(d)) {
            Ok(b) => b,
            Err(e) => {
                unreadable = Some((seq, format!("record seq {seq} ({at}) is unreadable: {e}")));
                return false;
            }
        };
        verifier.push_hashed(
            DecisionRecord {
                seq,
                body,
                prev_hash: entry.prev_hash,
                hash: entry.hash,
                replica: None,
            },
            &actual,
        )
    });
    match walked {
        Err(JournalError::Corrupt {
            segment,
            offset,
            what,
        }) => Ok(verifier.corrupt(
            last_seq + 1,
            format!(
                "the journal is corrupt after seq {last_seq}: {} at offset {offset}: {what}",
                segment.display()
            ),
        )),
        Err(e) => Err(LogError::Query(e.to_string())),
        Ok(_) => Ok(match unreadable {
            Some((seq, detail)) => verifier.corrupt(seq, detail),
            None => verifier.finish(None),
        }),
    }
}

/// The files and feature names of a stopped server's journal.
fn offline(data_dir: &Path) -> Result<(LogFiles, FeatureNames), LogError> {
    let files = LogFiles::of(data_dir);
    if !files.journal.is_dir() {
        return Err(LogError::Query(format!(
            "{} holds no journal (a log of the previous format is migrated when a server \
             first starts on it)",
            data_dir.display()
        )));
    }
    let names = FeatureNames::open(&files.names)
        .map_err(|e| LogError::Damaged(format!("{}: {e}", files.names.display())))?;
    Ok((files, names))
}

/// Visits the records of a stopped server's journal in the window, in chain order, until
/// `visit` returns false. The window is compared in µs, as the view's `at` column is by
/// [`DecisionLog::scan`] (a format-1 record's time is its text's, read as the indexer
/// reads it), so both exports select the same records. Frames are checked as they are
/// read; a damaged one ends the walk with its error.
pub fn scan_offline(
    data_dir: &Path,
    window: &Window,
    visit: &mut dyn FnMut(DecisionRecord) -> bool,
) -> Result<(), LogError> {
    let (since, until) = view::bounds(window)?;
    let (files, names) = offline(data_dir)?;
    let mut bad = None;
    // The record if it is inside the window; decoded only then.
    let read = |r: journal::Record| -> Result<Option<DecisionRecord>, LogError> {
        let entry = Entry::read(r.position, r.payload, &names)?;
        let at = match entry.fields() {
            Some(f) => f.recorded_at,
            None => {
                let record = entry.decode(&names)?;
                let at = view::micros_of(&record.body.recorded_at).unwrap_or(0);
                return Ok((since..until).contains(&at).then_some(record));
            }
        };
        if !(since..until).contains(&at) {
            return Ok(None);
        }
        entry.decode(&names).map(Some)
    };
    journal::read_only(&files.journal, |r| match read(r) {
        Ok(Some(record)) => visit(record),
        Ok(None) => true,
        Err(e) => {
            bad = Some(e);
            false
        }
    })
    .map_err(journal_err)?;
    bad.map_or(Ok(()), Err)
}

/// Verifies the log of a stopped server's data directory from its files alone.
pub fn verify_offline(data_dir: &Path) -> Result<VerifyReport, LogError> {
    let (files, names) = offline(data_dir)?;
    let view = files
        .view
        .exists()
        .then(|| view::open_ro(&files.view))
        .transpose()?;
    verify_journal(&files, &names, None, view.as_ref())
}
