//! Durability with real processes: the server as a child process, killed with SIGKILL under
//! load, starved of disk (a file-size limit set on the live process with prlimit(2), so writes
//! fail with EFBIG exactly as on a full disk), and robbed of its log file. Every decision a
//! client received must be in the log, unchanged, and the chain must verify.

use std::collections::BTreeMap;

use std::path::PathBuf;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::*;
use rand::{Rng, SeedableRng};
use riskserve::grpc::pb;
use riskserve::grpc::pb::scoring_client::ScoringClient;
use riskserve::grpc::pb::trace_client::TraceClient;
use tonic::Code;
use tonic::transport::Channel;

/// Sets the soft RLIMIT_FSIZE of a live process (None: unlimited).
fn limit_file_size(pid: i32, bytes: Option<u64>) {
    let limit = libc::rlimit {
        rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// What a client was told.
type Acked = Arc<Mutex<Vec<pb::ScoreResponse>>>;

/// Clients under way: what they were acknowledged, how they failed, their tasks.
struct Load {
    acked: Acked,
    failed: Arc<Mutex<Vec<Code>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// 8 clients scoring distinct requests until told to stop or the server goes away.
/// Returns the acknowledged responses and the codes of failures.
fn load(channel: Channel, tag: &str, stop: Arc<std::sync::atomic::AtomicBool>) -> Load {
    let acked: Acked = Arc::default();
    let failed: Arc<Mutex<Vec<Code>>> = Arc::default();
    let tasks = (0..8)
        .map(|c| {
            let (mut client, acked, failed, stop) = (
                ScoringClient::new(channel.clone()),
                acked.clone(),
                failed.clone(),
                stop.clone(),
            );
            let tag = tag.to_string();
            tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let customer = &customers()[(c * 997 + i * 13) % customers().len()];
                    let mut req = request(customer, &format!("{tag}-{c}-{i}"));
                    req.customer_id = format!("pii-{tag}-{}", customer.id);
                    match client.score(req).await {
                        Ok(r) => acked.lock().unwrap().push(r.into_inner()),
                        Err(s) => {
                            failed.lock().unwrap().push(s.code());
                            if matches!(
                                s.code(),
                                Code::Unavailable | Code::Unknown | Code::Cancelled
                            ) && s.message().contains("transport")
                            {
                                return; // the server is gone
                            }
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect();
    Load {
        acked,
        failed,
        tasks,
    }
}

/// Every acknowledged decision is in the log with the content the client was given.
async fn assert_recorded(channel: &Channel, acked: &[pb::ScoreResponse]) {
    let mut trace = TraceClient::new(channel.clone());
    for r in acked {
        let rec = trace
            .get_decision(pb::DecisionRef {
                decision_id: r.decision_id.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("acknowledged decision {} lost: {s:?}", r.decision_id))
            .into_inner();
        assert_eq!(rec.request_id, r.request_id);
        assert_eq!(
            (rec.version.as_str(), rec.digest.as_str()),
            (r.version.as_str(), r.digest.as_str())
        );
        assert_eq!(
            rec.probability_of_default.to_bits(),
            r.probability_of_default.to_bits()
        );
        assert_eq!(
            (rec.grade.as_str(), rec.decision),
            (r.grade.as_str(), r.decision)
        );
        assert_eq!(
            (rec.current_limit, rec.granted_limit),
            (r.current_limit, r.granted_limit)
        );
        assert_eq!(rec.reasons, r.reasons);
    }
    let v = trace
        .verify(pb::VerifyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "chain broken: {:?}", v.first_break);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_decision() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("server.log");
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261128);
    let mut all_acked = Vec::new();
    let mut last_round = Vec::new();
    let mut total = 0;
    // bench/crash_loop.sh runs this with CRASH_CYCLES=1000.
    let cycles: usize = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for round in 0..cycles {
        let server = ChildServer::start(data.path(), &log).await;
        // After each restart: what the last round acknowledged is there, unchanged, and the
        // chain verifies (everything is checked again at the end).
        assert_recorded(&server.channel, &last_round).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let Load { acked, tasks, .. } = load(
            server.channel.clone(),
            &format!("crash{round}"),
            stop.clone(),
        );
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
        server.kill();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        last_round = std::mem::take(&mut *acked.lock().unwrap());
        total += last_round.len();
        all_acked.extend(last_round.iter().cloned());
    }
    let server = ChildServer::start(data.path(), &log).await;
    assert_recorded(&server.channel, &all_acked).await;
    assert!(
        total > 5 * cycles,
        "only {total} decisions acknowledged across {cycles} rounds"
    );
    // Reaching here means none was lost (assert_recorded panics on the first).
    eprintln!(
        "{{\"label\":\"crash-loop\",\"cycles\":{cycles},\"acknowledged\":{total},\"lost\":0}}"
    );
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_failures_fail_closed_and_the_server_recovers() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("server.log");
    let server = ChildServer::start(data.path(), &log).await;
    let mut client = ScoringClient::new(server.channel.clone());
    let before = client
        .score(request(&customers()[0], "fc-before"))
        .await
        .unwrap()
        .into_inner();

    // The disk refuses writes (none past a segment's 64-byte header): every Score is
    // UNAVAILABLE, nothing is served, health says so.
    limit_file_size(server.pid(), Some(64));
    let status = client
        .score(request(&customers()[1], "fc-during-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    server.wait_health("", false).await;
    server.wait_health("riskserve.v1.Scoring", false).await;
    assert!(
        server.serving("liveness").await,
        "liveness is not readiness"
    );
    for i in 2..5 {
        let status = client
            .score(request(&customers()[i], &format!("fc-during-{i}")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }

    // Writable again: the writer's probe succeeds, health returns, scoring resumes.
    limit_file_size(server.pid(), None);
    server.wait_health("", true).await;
    let after = client
        .score(request(&customers()[1], "fc-during-1"))
        .await
        .expect("a retry after recovery is a new decision")
        .into_inner();
    assert_recorded(&server.channel, &[before, after]).await;
    let mut trace = TraceClient::new(server.channel.clone());
    let v = trace
        .verify(pb::VerifyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.records, 2, "nothing of the failed batches was recorded");
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_write_still_stops_within_its_grace_period() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("server.log");
    let mut server = ChildServer::start(data.path(), &log).await;
    let mut client = ScoringClient::new(server.channel.clone());
    for i in 0..20 {
        client
            .score(request(&customers()[i], &format!("stop-{i}")))
            .await
            .unwrap();
    }
    // Nothing can be written any more: not the journal, not the query view.
    limit_file_size(server.pid(), Some(64));
    client
        .score(request(&customers()[0], "stop-refused"))
        .await
        .unwrap_err();
    let rc = unsafe { libc::kill(server.pid(), libc::SIGTERM) };
    assert_eq!(rc, 0);
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = server.try_wait() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still running 20 s after SIGTERM (grace period 10 s); see {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_at_random_moments_under_load_never_acknowledge_a_lost_decision() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("server.log");
    let server = ChildServer::start(data.path(), &log).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let Load {
        acked,
        failed,
        tasks,
    } = load(server.channel.clone(), "fault", stop.clone());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..150))).await;
        // Vary the point of failure: mid-WAL, or at any write at all.
        limit_file_size(server.pid(), Some(rng.gen_range(1..64) * 4096));
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..150))).await;
        limit_file_size(server.pid(), None);
    }
    server.wait_health("", true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let failed = failed.lock().unwrap().clone();
    assert!(
        !failed.is_empty(),
        "the injected faults failed some requests"
    );
    assert!(
        failed.iter().all(|c| *c == Code::Unavailable),
        "only UNAVAILABLE: {failed:?}"
    );
    assert!(!acked.is_empty());
    assert_recorded(&server.channel, &acked).await;
    server.kill();
}

#[tokio::test]
async fn a_log_file_removed_under_the_server_stops_scoring() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("server.log");
    let server = ChildServer::start(data.path(), &log).await;
    let mut client = ScoringClient::new(server.channel.clone());
    client
        .score(request(&customers()[0], "rm-0"))
        .await
        .unwrap();
    // The journal's active segment: the newest one.
    let mut segments: Vec<PathBuf> = std::fs::read_dir(data.path().join("journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    std::fs::remove_file(segments.last().unwrap()).unwrap();
    let status = client
        .score(request(&customers()[1], "rm-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    server.wait_health("", false).await;
    let status = client
        .score(request(&customers()[2], "rm-2"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    server.kill();
}

#[tokio::test]
async fn raw_customer_ids_appear_nowhere_in_the_data_or_the_logs() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("server.log");
    let server = ChildServer::start(data.path(), &log).await;
    let mut client = ScoringClient::new(server.channel.clone());
    let ids: Vec<String> = (0..20)
        .map(|i| format!("PII-CUSTOMER-{i:04}-7d1e"))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let mut req = request(&customers()[i], &format!("pii-{i}"));
        req.customer_id = id.clone();
        client.score(req).await.unwrap();
    }
    // Error paths too: a reused request id, and a bad feature.
    let mut reused = request(&customers()[5], "pii-0");
    reused.customer_id = ids[0].clone();
    client.score(reused).await.unwrap_err();
    let mut bad = request(&customers()[6], "pii-bad");
    bad.customer_id = ids[1].clone();
    bad.features.insert("AGE".into(), number(3.0));
    client.score(bad).await.unwrap_err();
    // And a reviewer's lookup.
    let history = TraceClient::new(server.channel.clone())
        .customer_history(pb::CustomerRef {
            customer_id: ids[3].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.records.len(), 1);
    server.kill();

    let mut haystack: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    let mut dirs = vec![data.path().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                // A preallocated segment is mostly zeros: search only up to its data's end.
                let mut bytes = std::fs::read(&path).unwrap();
                let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                bytes.truncate(end);
                haystack.insert(path.clone(), bytes);
            }
        }
    }
    assert!(haystack.keys().any(|p| p.ends_with("decisions.db")));
    assert!(
        haystack
            .keys()
            .any(|p| p.extension().is_some_and(|x| x == "seg"))
    );
    assert!(
        haystack[&log].len() > 100,
        "the server logged at debug level"
    );
    for id in &ids {
        for (path, bytes) in &haystack {
            let found = bytes.windows(id.len()).any(|w| w == id.as_bytes());
            assert!(!found, "{id} found in {}", path.display());
        }
    }
}
