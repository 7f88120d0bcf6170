//! The journal under the decision log, through real files: a torn last group cut at every
//! byte, a flipped byte refused by name, a full disk (a real size-limited tmpfs), and the
//! migration of a log written in the previous release's format.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::*;
use riskserve::decision_log::{DecisionLog, JournalLog, LogError, LogOptions, chain, journal};
use riskserve::grpc::pb;
use riskserve::grpc::v2::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::Code;

/// A server whose journal rotates every 64 KiB, so that its files are small to copy.
async fn small_segments(data: &Path) -> TestServer {
    let mut c = config(&repo().join("models"), data);
    c.log_segment_bytes = 64 << 10;
    TestServer::start_with(c).await
}

/// Scores `n` requests one after another (each its own group), customers taken in turn
/// from the first `customers`, request ids `tag-0` …
async fn score_each(server: &TestServer, n: usize, customers_used: usize, tag: &str) {
    for i in 0..n {
        server
            .scoring()
            .score(request(
                &customers()[i % customers_used],
                &format!("{tag}-{i}"),
            ))
            .await
            .unwrap();
    }
}

/// The columns of the `decisions` table of layouts 0 and 2, which the `decisions` view of
/// later layouts begins with.
const LEGACY: &str = "seq, decision_id, recorded_at, request_id, request_hash, customer_ref, \
    key_id, model, version, digest, rollout_id, arm, features, pd, grade, decision, \
    current_limit, granted_limit, reasons, caller, trace_id, prev_hash, hash";

/// The recorded history of the `i`-th test customer.
async fn history(server: &TestServer, i: usize) -> Vec<pb::DecisionRecord> {
    server
        .trace()
        .customer_history(pb::CustomerRef {
            customer_id: customers()[i].id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .records
}

fn options() -> LogOptions {
    LogOptions {
        segment_bytes: 64 << 10,
        ..LogOptions::default()
    }
}

/// (seq, segment path, offset, frame length) of every record.
fn frames(data: &Path) -> Vec<(u64, PathBuf, u64, u64)> {
    let dir = data.join("journal");
    let mut out = Vec::new();
    journal::read_only(&dir, |r| {
        let p = r.position;
        out.push((
            p.seq,
            dir.join(format!("{:020}.seg", p.segment)),
            p.offset,
            16 + r.payload.len() as u64,
        ));
        true
    })
    .unwrap();
    out
}

fn remove_view(data: &Path) {
    for f in ["decisions.db", "decisions.db-wal", "decisions.db-shm"] {
        let _ = std::fs::remove_file(data.join(f));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_group_is_cut_at_every_byte_and_nothing_before_it_is_lost() {
    let data = tempfile::tempdir().unwrap();
    let server = small_segments(data.path()).await;
    score_each(&server, 6, 6, "torn").await;
    server.stop().await.unwrap();
    let all = frames(data.path());
    assert_eq!(all.len(), 6);
    // The last acknowledged decision is the group a crash could tear: cut its segment at
    // every byte of it. The view is removed too, as after a crash before it was indexed.
    let (_, segment, start, len) = all.last().unwrap().clone();
    let name = segment.file_name().unwrap().to_owned();
    for cut in start..start + len {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(data.path(), copy.path());
        remove_view(copy.path());
        let seg = copy.path().join("journal").join(&name);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let log = JournalLog::open(copy.path(), options()).unwrap();
        let torn = log.torn().map(|t| (t.offset, t.bytes_dropped));
        if cut == start {
            assert_eq!(torn, None, "a cut at a frame boundary is a clean end");
        } else {
            // The frame's length comes first and is never zero in its low byte here.
            let (at, dropped) = torn.unwrap_or_else(|| panic!("cut at {cut} not reported"));
            assert_eq!(at, start, "cut at {cut}");
            assert!(
                (1..=cut - start).contains(&dropped),
                "cut at {cut}: {dropped}"
            );
        }
        let report = log.verify().unwrap();
        assert!(report.first_break.is_none(), "cut at {cut}: {report:?}");
        assert_eq!(report.records, 5, "cut at {cut}: every earlier record kept");
        log.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_refuses_the_start_and_verify_names_segment_and_offset() {
    let data = tempfile::tempdir().unwrap();
    let server = small_segments(data.path()).await;
    score_each(&server, 5, 5, "flip").await;
    server.stop().await.unwrap();
    let (_, segment, offset, len) = frames(data.path())[2].clone();
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[(offset + len / 2) as usize] ^= 0x10;
    std::fs::write(&segment, bytes).unwrap();
    let name = segment.file_name().unwrap().to_string_lossy().into_owned();

    // The journal is scanned from the view's checkpoint; without a view, from the start.
    remove_view(data.path());
    match JournalLog::open(data.path(), options()) {
        Err(LogError::Damaged(why)) => {
            assert!(why.contains(&name), "{why}");
            assert!(why.contains(&format!("offset {offset}")), "{why}");
        }
        other => panic!("a corrupt journal opened: {other:?}"),
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_riskserve"))
        .args(["trace", "verify", "--json", "--data"])
        .arg(data.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "verify fails on a broken chain");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = &v["first_break"];
    assert_eq!(
        (b["seq"].as_i64(), b["kind"].as_str()),
        (Some(3), Some("corrupt"))
    );
    let detail = b["detail"].as_str().unwrap();
    assert!(
        detail.contains(&name) && detail.contains(&format!("offset {offset}")),
        "{detail}"
    );
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

async fn ready(server: &TestServer) -> bool {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    HealthClient::new(server.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == 1)
}

const DOWN: &str = "readiness never went down";

/// Every one of `ids` is found by the server's trace service.
async fn assert_traceable(server: &TestServer, ids: &[String]) {
    for id in ids {
        server
            .trace()
            .get_decision(pb::DecisionRef {
                decision_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged {id} lost: {e}"));
    }
}

/// Waits up to `within` for readiness to be `want`; panics naming `what` if it never is.
async fn until_ready(server: &TestServer, want: bool, within: Duration, what: &str) {
    let start = Instant::now();
    while ready(server).await != want {
        assert!(start.elapsed() < within, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_readiness_down_until_space_is_freed_and_loses_nothing() {
    let base = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&base.path().join("mnt"), "3m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    // Room the test gives back once the disk is full.
    let filler = fs.0.join("filler");
    std::fs::write(&filler, vec![1u8; 1 << 20]).unwrap();
    let data = fs.0.join("data");
    let server = small_segments(&data).await;
    let mut client = server.scoring();
    let mut acked = Vec::new();
    let mut i = 0;
    let status = loop {
        let req = request(&customers()[i % customers().len()], &format!("full-{i}"));
        i += 1;
        match client.score(req).await {
            Ok(r) => acked.push(r.into_inner().decision_id),
            Err(s) => break s,
        }
        assert!(i < 100_000, "the disk never filled");
    };
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(!acked.is_empty());
    until_ready(&server, false, Duration::from_secs(2), DOWN).await;
    // While the disk stays full: every Score refused, readiness down the whole time.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert!(
            !ready(&server).await,
            "readiness flapped back on a full disk"
        );
        let s = client
            .score(request(&customers()[1], &format!("full-{i}")))
            .await
            .unwrap_err();
        i += 1;
        assert_eq!(s.code(), Code::Unavailable);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_file(&filler).unwrap();
    until_ready(&server, true, Duration::from_secs(10), "never ready again").await;
    let after = client
        .score(request(&customers()[2], "full-after"))
        .await
        .unwrap()
        .into_inner();
    acked.push(after.decision_id);
    assert_traceable(&server, &acked).await;
    assert_eq!(server.records().await, acked.len() as u64);
    server.stop().await.unwrap();
}

/// A view that cannot be written (here a reviewer's tool holding its write lock) may not let
/// the records in memory grow without bound: at `log_max_view_lag` the server refuses new
/// decisions and reports itself not ready, still answers for every acknowledged one, and
/// takes decisions again by itself once the view has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_that_falls_too_far_behind_refuses_new_decisions_until_it_catches_up() {
    let data = tempfile::tempdir().unwrap();
    let mut c = config(&repo().join("models"), data.path());
    c.log_max_view_lag = 30;
    let server = TestServer::start_with(c).await;
    let reviewer = rusqlite::Connection::open(data.path().join("decisions.db")).unwrap();
    reviewer.busy_timeout(Duration::from_secs(10)).unwrap();
    reviewer.execute_batch("BEGIN IMMEDIATE").unwrap();

    let mut client = server.scoring();
    let mut acked = Vec::new();
    for i in 0..30 {
        let r = client
            .score(request(&customers()[i % 4], &format!("lag-{i}")))
            .await
            .unwrap();
        acked.push(r.into_inner().decision_id);
    }
    let refused = client
        .score(request(&customers()[0], "lag-30"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{}", refused.message());
    assert!(
        refused.message().contains("log_max_view_lag"),
        "{}",
        refused.message()
    );
    // Not ready, and staying so while the view is held: no flapping.
    until_ready(&server, false, Duration::from_secs(2), DOWN).await;
    let until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < until {
        assert!(
            !ready(&server).await,
            "readiness came back while the view was held"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every acknowledged decision is still read, from memory.
    assert_traceable(&server, &acked).await;

    reviewer.execute_batch("ROLLBACK").unwrap();
    let released = "never ready again after the view was released";
    until_ready(&server, true, Duration::from_secs(15), released).await;
    let after = client
        .score(request(&customers()[0], "lag-30"))
        .await
        .unwrap()
        .into_inner();
    acked.push(after.decision_id);
    assert_eq!(server.records().await, acked.len() as u64);
    server.stop().await.unwrap();
}

/// The previous release's `decisions.db`: the table was the log, hashed over JSON.
const OLD_SCHEMA: &str = "
CREATE TABLE decisions (
    seq INTEGER PRIMARY KEY, decision_id TEXT NOT NULL UNIQUE, recorded_at TEXT NOT NULL,
    request_id TEXT NOT NULL, request_hash TEXT NOT NULL, customer_ref TEXT NOT NULL,
    key_id TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL,
    rollout_id TEXT, arm TEXT NOT NULL, features TEXT NOT NULL, pd REAL NOT NULL,
    grade TEXT NOT NULL, decision TEXT NOT NULL, current_limit INTEGER,
    granted_limit INTEGER NOT NULL, reasons TEXT NOT NULL, caller TEXT, trace_id TEXT,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE UNIQUE INDEX decisions_request ON decisions(request_id) WHERE arm != 'shadow';
CREATE INDEX decisions_customer ON decisions(customer_ref, seq);
CREATE INDEX decisions_version ON decisions(model, version, recorded_at);
CREATE INDEX decisions_time ON decisions(recorded_at);
CREATE TABLE chain_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL);
CREATE TABLE chain_anchor (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL, pruned_at TEXT NOT NULL);
CREATE TABLE writer_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at TEXT NOT NULL);
";

/// The previous release's request hash of the migration test's request `request_id` (`old-i`,
/// the i-th customer of 4; `batch/i`, the (4 + i)-th): SHA-256 of its canonical JSON, keys
/// sorted, each feature `{"number": x}` (what Score's numbers and an FP64 tensor's entries
/// both are).
fn json_request_hash(request_id: &str, customer_ref: &str) -> String {
    use sha2::Digest as _;
    let customer = match request_id.strip_prefix("batch/") {
        Some(row) => 4 + row.parse::<usize>().unwrap(),
        None => {
            request_id
                .rsplit('-')
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
                % 4
        }
    };
    let sent = request(&customers()[customer], request_id);
    let features: serde_json::Map<String, serde_json::Value> = sent
        .features
        .iter()
        .map(|(name, v)| {
            let Some(pb::feature_value::Kind::Number(x)) = v.kind else {
                panic!("the test customers send numbers")
            };
            (name.clone(), serde_json::json!({ "number": x }))
        })
        .collect();
    let canonical = serde_json::json!({
        "current_limit": sent.current_limit,
        "customer_ref": customer_ref,
        "features": features,
        "model": sent.model,
    });
    hex::encode(sha2::Sha256::digest(canonical.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_of_the_previous_format_is_migrated_and_verifies_across_the_boundary() {
    // Real decisions first, then rewritten as the previous release stored them: rows in
    // the old schema, chained over their JSON, no journal.
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    score_each(&server, 12, 4, "old").await;
    let batch = &customers()[4..6];
    let infer = |server: &TestServer| {
        let mut v2c = GrpcInferenceServiceClient::new(server.channel.clone());
        async move {
            let answer = v2c.model_infer(infer_request(batch, "batch")).await;
            infer_outputs(&answer.unwrap().into_inner()).strings["decision_id"].clone()
        }
    };
    let batch_ids = infer(&server).await;
    server.stop().await.unwrap();
    let old = tempfile::tempdir().unwrap();
    std::fs::copy(
        data.path().join("customer-dev.key"),
        old.path().join("customer-dev.key"),
    )
    .unwrap();
    {
        let src = rusqlite::Connection::open(data.path().join("decisions.db")).unwrap();
        let dst = rusqlite::Connection::open(old.path().join("decisions.db")).unwrap();
        dst.execute_batch(OLD_SCHEMA).unwrap();
        dst.execute_batch(&format!(
            "ATTACH '{}' AS src",
            data.path().join("decisions.db").display()
        ))
        .unwrap();
        dst.execute_batch(&format!(
            "INSERT INTO decisions SELECT {LEGACY} FROM src.decisions ORDER BY seq; DETACH src;"
        ))
        .unwrap();
        drop(src);
        let log = JournalLog::open(data.path(), LogOptions::default()).unwrap();
        let mut prev = chain::GENESIS.to_string();
        let mut seq = 0;
        log.scan(&Default::default(), &mut |r| {
            // As the previous release hashed a request: over its canonical JSON.
            let mut body = r.body.clone();
            body.request_hash = json_request_hash(&body.request_id, &body.customer_ref);
            let hash = chain::link_hash(&prev, &body);
            dst.execute(
                "UPDATE decisions SET request_hash = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
                rusqlite::params![body.request_hash, prev, hash, r.seq],
            )
            .unwrap();
            prev = hash;
            seq = r.seq;
            true
        })
        .unwrap();
        log.close();
        dst.execute(
            "INSERT INTO chain_head (id, seq, hash) VALUES (1, ?1, ?2)",
            rusqlite::params![seq, prev],
        )
        .unwrap();
    }
    assert!(!old.path().join("journal").exists());

    let server = TestServer::start(&repo().join("models"), old.path()).await;
    assert_eq!(
        server.records().await,
        14,
        "every old record migrated and verified"
    );
    let history = history(&server, 1).await;
    assert_eq!(history.len(), 3);
    for r in &history {
        let replay = server
            .trace()
            .replay(pb::DecisionRef {
                decision_id: r.decision_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(replay.identical, "{replay:?}");
    }
    // A retry of an old request is answered from the migrated log, not decided again,
    // though its record's request hash is the previous release's; the same id with other
    // inputs is still refused.
    let again = server
        .scoring()
        .score(request(&customers()[1], "old-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(history.iter().any(|r| r.decision_id == again.decision_id));
    let mut changed = request(&customers()[1], "old-1");
    changed.current_limit = Some(changed.current_limit.unwrap() + 1);
    let refused = server.scoring().score(changed).await.unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    // So is a retried batch of the inference protocol.
    assert_eq!(infer(&server).await, batch_ids);
    // New decisions chain on from the old head, in the new format.
    score_each(&server, 5, 5, "new").await;
    assert_eq!(
        server.records().await,
        19,
        "verify passes across the boundary"
    );
    server.stop().await.unwrap();
    // The stopped server's files verify offline too.
    let report = riskserve::decision_log::verify_offline(old.path()).unwrap();
    assert!(
        report.first_break.is_none() && report.records == 19,
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_view_of_the_first_journal_release_is_rebuilt_from_the_journal() {
    // The first journal release kept one wide `decisions` table (layout 2) beside the same
    // journal. Make one from real decisions: the rows as that table held them, its
    // checkpoint, user_version 2.
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    score_each(&server, 9, 3, "wide").await;
    let before = history(&server, 2).await;
    server.stop().await.unwrap();
    {
        let db = rusqlite::Connection::open(data.path().join("decisions.db")).unwrap();
        db.execute_batch(&format!(
            "BEGIN;
             CREATE TABLE wide AS SELECT {LEGACY} FROM decisions;
             CREATE TABLE checkpoint_v2 AS SELECT * FROM journal_checkpoint;
             DROP VIEW decisions; DROP TABLE decision_rows; DROP TABLE arms;
             DROP TABLE feature_names; DROP TABLE journal_checkpoint;
             DROP TABLE blocks; DROP TABLE block_arms; DROP TABLE other_ids;
             {}
             INSERT INTO decisions SELECT * FROM wide; DROP TABLE wide;
             CREATE TABLE journal_checkpoint (id INTEGER PRIMARY KEY CHECK (id = 1),
                 seq INTEGER NOT NULL, segment INTEGER NOT NULL, offset INTEGER NOT NULL);
             INSERT INTO journal_checkpoint SELECT * FROM checkpoint_v2; DROP TABLE checkpoint_v2;
             PRAGMA user_version = 2;
             COMMIT;",
            OLD_SCHEMA
                .split(';')
                .filter(|s| s.contains("TABLE decisions") || s.contains("INDEX decisions_"))
                .map(|s| format!("{s};"))
                .collect::<String>()
        ))
        .unwrap();
        let n: i64 = db
            .query_row("SELECT COUNT(*) FROM decisions", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 9);
    }

    let server = TestServer::start(&repo().join("models"), data.path()).await;
    assert_eq!(server.records().await, 9);
    let after = history(&server, 2).await;
    assert_eq!(after, before, "the rebuilt view answers as the old one did");
    server.stop().await.unwrap();
    let db = rusqlite::Connection::open(data.path().join("decisions.db")).unwrap();
    let (version, rows): (i64, i64) = db
        .query_row(
            "SELECT (SELECT user_version FROM pragma_user_version), COUNT(*) FROM decision_rows",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((version, rows), (6, 9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_3_view_gets_its_customer_index_per_span_and_block_summaries() {
    older_layout_is_brought_up_to_date(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_4_view_gets_block_summaries_for_its_time_arm_and_id_indexes() {
    older_layout_is_brought_up_to_date(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_5_view_gets_its_blocks_listed_by_decision_id_time() {
    older_layout_is_brought_up_to_date(5).await;
}

/// A view of layout 3, 4 or 5, made from one of this release (the rows are the same), opens:
/// the same history, retries and lookups by decision id as before, in the current layout.
async fn older_layout_is_brought_up_to_date(layout: i64) {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    let tag = format!("layout{layout}");
    score_each(&server, 9, 3, &tag).await;
    let before = history(&server, 2).await;
    let first = history(&server, 0)
        .await
        .into_iter()
        .find(|r| r.request_id == format!("{tag}-0"))
        .expect("customer 0's first request")
        .decision_id;
    server.stop().await.unwrap();
    let indexes = |db: &rusqlite::Connection| -> Vec<String> {
        let mut s = db
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' \
                 AND tbl_name = 'decision_rows' AND sql IS NOT NULL ORDER BY name",
            )
            .unwrap();
        s.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    if layout == 5 {
        // Layout 5 had the block summaries, without the blocks listed by id time.
        let db = rusqlite::Connection::open(data.path().join("decisions.db")).unwrap();
        db.execute_batch("BEGIN; DROP TABLE block_ids; PRAGMA user_version = 5; COMMIT;")
            .unwrap();
    } else {
        // Layouts 3 and 4 indexed time, arm and decision id per row, without block summaries.
        let db = rusqlite::Connection::open(data.path().join("decisions.db")).unwrap();
        db.execute_batch(&format!(
            "BEGIN;
             DROP TABLE blocks; DROP TABLE block_arms; DROP TABLE other_ids;
             CREATE INDEX decision_rows_id ON decision_rows(decision_id);
             CREATE INDEX decision_rows_arm ON decision_rows(arm_id, at);
             CREATE INDEX decision_rows_time ON decision_rows(at);
             PRAGMA user_version = {layout};
             COMMIT;"
        ))
        .unwrap();
        if layout == 3 {
            // Layout 3 had the customer index over the whole log.
            db.execute_batch(
                "BEGIN;
                 DROP INDEX decision_rows_customer_span;
                 CREATE INDEX decision_rows_customer ON decision_rows(customer_key, seq);
                 DROP VIEW decisions;
                 CREATE VIEW decisions AS SELECT seq, hash FROM decision_rows;
                 COMMIT;",
            )
            .unwrap();
        }
    }

    let server = TestServer::start(&repo().join("models"), data.path()).await;
    assert_eq!(server.records().await, 9);
    assert_eq!(history(&server, 2).await, before, "the same history");
    // A decision is found by its id (through the block summaries now).
    let found = server
        .trace()
        .get_decision(pb::DecisionRef {
            decision_id: first.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.request_id, format!("{tag}-0"));
    // A retry of a recorded request is still found (through the request index).
    let again = server
        .scoring()
        .score(request(&customers()[0], &format!("{tag}-0")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.decision_id, first);
    assert_eq!(server.records().await, 9, "the retry recorded nothing");
    server.stop().await.unwrap();
    let db = rusqlite::Connection::open(data.path().join("decisions.db")).unwrap();
    let version: i64 = db
        .query_row("SELECT user_version FROM pragma_user_version", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(version, 6);
    // The view shows the current columns (none of these records is a remediation).
    let plain: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM decisions WHERE remediates IS NULL AND reason IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(plain, 9);
    assert_eq!(
        indexes(&db),
        ["decision_rows_customer_span", "decision_rows_request"]
    );
    let summarised: (i64, i64, i64) = db
        .query_row(
            "SELECT (SELECT COUNT(*) FROM blocks), (SELECT COUNT(*) FROM block_arms), \
             (SELECT COUNT(DISTINCT block) FROM block_ids)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        summarised,
        (1, 1, 1),
        "the nine rows' block, its arm, its id listing"
    );
}

/// The decision ids of `n` requests scored one after another.
async fn scored_ids(server: &TestServer, n: usize, tag: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let r = server
            .scoring()
            .score(request(&customers()[i % 7], &format!("{tag}-{i}")))
            .await
            .unwrap()
            .into_inner();
        ids.push(r.decision_id);
    }
    ids
}

fn segment_starts(data: &Path) -> Vec<u64> {
    let mut starts: Vec<u64> = std::fs::read_dir(data.join("journal"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    starts.sort_unstable();
    starts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_whole_old_segments_and_the_rest_still_verifies() {
    let data = tempfile::tempdir().unwrap();
    let mut c = config(&repo().join("models"), data.path());
    c.log_segment_bytes = 64 << 10;
    c.log_retention = Some("2s".into());
    let server = TestServer::start_with(c.clone()).await;
    let old = scored_ids(&server, 400, "old").await;
    assert!(segment_starts(data.path()).len() >= 3, "several segments");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let new = scored_ids(&server, 50, "new").await;

    // A pass runs every second: wait for it to cut the old segments and their rows.
    let deadline = Instant::now() + Duration::from_secs(15);
    let anchor = loop {
        let text = std::fs::read_to_string(data.path().join("journal/anchor")).ok();
        let rows: i64 = rusqlite::Connection::open(data.path().join("decisions.db"))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM decision_rows", [], |r| r.get(0))
            .unwrap();
        if let Some(t) = text
            && rows < 450
        {
            let seq: u64 = t.split_whitespace().next().unwrap().parse().unwrap();
            if rows as u64 == 450 - seq {
                break seq;
            }
        }
        assert!(Instant::now() < deadline, "retention removed nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let starts = segment_starts(data.path());
    assert_eq!(
        starts[0],
        anchor + 1,
        "whole segments went, up to the anchor"
    );
    assert!(anchor < 400, "only old decisions went");
    assert_eq!(
        server.records().await,
        450 - anchor,
        "the rest verifies from the anchor"
    );
    let trace = |id: &String| {
        let mut t = server.trace();
        let id = id.clone();
        async move { t.get_decision(pb::DecisionRef { decision_id: id }).await }
    };
    // A pass every second keeps cutting: once the new decisions are 2 s old too, the
    // segment they share with the last old ones may go. So a decision may be gone only if
    // the anchor has passed it by then (seqs: old 1..=400, new 401..=450).
    let anchor_now = || -> u64 {
        let t = std::fs::read_to_string(data.path().join("journal/anchor")).unwrap();
        t.split_whitespace().next().unwrap().parse().unwrap()
    };
    assert_eq!(trace(&old[0]).await.unwrap_err().code(), Code::NotFound);
    for (seq, id) in (anchor + 1..).zip(old[anchor as usize..].iter().chain(&new)) {
        if let Err(status) = trace(id).await {
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
            assert!(seq <= anchor_now(), "seq {seq} is gone, past the anchor");
        }
    }
    server.stop().await.unwrap();

    // The files verify as they are, and a restart serves on from the anchor.
    let anchor = anchor_now();
    let report = riskserve::decision_log::verify_offline(data.path()).unwrap();
    assert!(report.first_break.is_none(), "{report:?}");
    assert_eq!(report.records, 450 - anchor);
    c.log_retention = None;
    let server = TestServer::start_with(c).await;
    scored_ids(&server, 3, "after").await;
    assert_eq!(server.records().await, 453 - anchor);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_rebuilt_from_a_long_journal_is_indexed_while_opening_not_held_in_memory() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    record_traffic(&server, "long", 10_000).await;
    server.stop().await.unwrap();
    remove_view(data.path());
    let log = JournalLog::open(data.path(), LogOptions::default()).unwrap();
    // Everything but the last partial batch is in the view once open returns.
    assert!(
        log.index_lag() < 8_192,
        "{} held in memory",
        log.index_lag()
    );
    let report = log.verify().unwrap();
    assert!(
        report.first_break.is_none() && report.records == 10_000,
        "{report:?}"
    );
    log.close();
}

/// The boot id the server marks the view with (Linux).
fn this_boot() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_left_unsynced_when_the_machine_went_down_is_rebuilt_from_the_journal() {
    let data = tempfile::tempdir().unwrap();
    let mark = data.path().join("decisions.db.unsynced");
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    assert_eq!(
        std::fs::read_to_string(&mark).unwrap(),
        this_boot(),
        "a running server's view is marked as unsynced under this boot"
    );
    score_each(&server, 9, 3, "reboot").await;
    let before = history(&server, 2).await;
    server.stop().await.unwrap();
    assert!(
        !mark.exists(),
        "a clean stop syncs the view and removes the mark"
    );

    // The machine went down with the view unsynced: the mark names another boot, and the
    // files are damaged as a lost write-back can leave them: garbage after the database's
    // first page (the schema) and after the WAL's header, where the rows are.
    std::fs::write(&mark, "00000000-0000-0000-0000-000000000000").unwrap();
    // Every page in the database file first, so that the garbage is in the b-trees.
    rusqlite::Connection::open(data.path().join("decisions.db"))
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let mut garbled = 0;
    for (file, from) in [("decisions.db", 4096), ("decisions.db-wal", 32)] {
        use std::os::unix::fs::FileExt;
        let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .open(data.path().join(file))
        else {
            continue;
        };
        let len = f.metadata().unwrap().len();
        if len > from {
            f.write_all_at(&vec![0xa5; (len - from) as usize], from)
                .unwrap();
            garbled += len - from;
        }
    }
    assert!(garbled > 0, "the view's rows were garbled");
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    assert_eq!(
        server.records().await,
        9,
        "every decision is in the rebuilt view"
    );
    assert_eq!(history(&server, 2).await, before);
    assert_eq!(std::fs::read_to_string(&mark).unwrap(), this_boot());
    server.stop().await.unwrap();

    // Marked under this boot, only the process died: the page cache had every write, and
    // the view is kept as it is (a table added by hand survives the start).
    std::fs::write(&mark, this_boot()).unwrap();
    rusqlite::Connection::open(data.path().join("decisions.db"))
        .unwrap()
        .execute_batch("CREATE TABLE kept (x)")
        .unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    assert_eq!(server.records().await, 9);
    server.stop().await.unwrap();
    let kept: i64 = rusqlite::Connection::open(data.path().join("decisions.db"))
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'kept'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kept, 1, "a view marked under this boot is trusted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_an_earlier_release_kept_in_the_views_file_move_to_their_own() {
    let data = tempfile::tempdir().unwrap();
    let plan = "auto_advance = false\n[[steps]]\nshare_bp = 0\nshadow = true\n\
                [[steps]]\nshare_bp = 500\n[[steps]]\nshare_bp = 10000\n";
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let started = start_rollout(&server, "v2", plan).await;
    server.stop().await.unwrap();

    // As an earlier release left them: the rollout tables in decisions.db, no rollouts.db.
    let rollouts = data.path().join("rollouts.db");
    {
        let db = rusqlite::Connection::open(data.path().join("decisions.db")).unwrap();
        db.execute("ATTACH DATABASE ?1 AS r", [rollouts.to_string_lossy()])
            .unwrap();
        for t in ["rollouts", "rollout_transitions", "rollout_readings"] {
            let sql: String = db
                .query_row(
                    "SELECT sql FROM r.sqlite_master WHERE type = 'table' AND name = ?1",
                    [t],
                    |r| r.get(0),
                )
                .unwrap();
            db.execute_batch(&format!("{sql}; INSERT INTO main.{t} SELECT * FROM r.{t};"))
                .unwrap();
        }
        db.execute_batch("DETACH DATABASE r").unwrap();
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", rollouts.display()));
    }

    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let s = rollout_status(&server.channel).await;
    assert_eq!(
        (s.id.as_str(), s.state.as_str(), s.step),
        (started.id.as_str(), started.state.as_str(), started.step),
        "the rollout survives the move"
    );
    server.stop().await.unwrap();
    assert!(rollouts.exists());
    let left: i64 = rusqlite::Connection::open(data.path().join("decisions.db"))
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'rollout%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0, "the view's file keeps no rollout table");
    let moved: i64 = rusqlite::Connection::open(&rollouts)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM rollout_transitions", [], |r| r.get(0))
        .unwrap();
    assert!(moved >= 1, "the transitions moved with the rollout");
}
