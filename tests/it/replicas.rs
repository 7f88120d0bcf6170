//! Several replicas on one real PostgreSQL: one trail of decisions that every replica sees,
//! request ids unique across replicas, each replica's chain verified and a break named by
//! its replica; PostgreSQL stopped under load (refusals, never an unrecorded decision, and
//! recovery without a restart); a replica killed under load loses no acknowledged decision.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::*;
use riskserve::grpc::pb;
use riskserve::grpc::pb::scoring_client::ScoringClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// The customer key file every replica shares (replicas must agree on customer refs).
fn shared_key() -> std::path::PathBuf {
    static KEY: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = KEY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("customer.key"), "ab".repeat(32)).unwrap();
        dir
    });
    dir.path().join("customer.key")
}

/// A server on `store` as replica `id`, with its own data directory.
async fn replica(store: &str, id: &str, data: &std::path::Path) -> TestServer {
    TestServer::start_with(riskserve::Config {
        store: Some(store.into()),
        replica_id: Some(id.into()),
        customer_key_files: vec![shared_key()],
        ..config(&repo().join("models"), data)
    })
    .await
}

/// The environment of a child replica on `store`.
fn replica_env<'a>(store: &'a str, id: &'a str, key: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("RISKSERVE_STORE", store),
        ("RISKSERVE_REPLICA_ID", id),
        ("RISKSERVE_CUSTOMER_KEY_FILES", key),
    ]
}

async fn ready(channel: &Channel) -> bool {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "riskserve.v1.Scoring".into(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == 1)
}

async fn wait_ready(channel: &Channel, want: bool, within: Duration) {
    let start = Instant::now();
    while ready(channel).await != want {
        assert!(
            start.elapsed() < within,
            "readiness never became {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a load run saw: the decision ids acknowledged, and the codes of the refusals.
#[derive(Default)]
struct Seen {
    acked: BTreeSet<String>,
    refused: Vec<Code>,
}

/// Scores distinct requests from `clients` tasks, spread over `channels`, until `stop`.
fn load(
    channels: Vec<Channel>,
    tag: &'static str,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let tasks: Vec<_> = (0..clients)
            .map(|t| {
                let channels = channels.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let all = customers();
                    let mut seen = Seen::default();
                    let mut k = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let channel = &channels[(t + k) % channels.len()];
                        let c = &all[(t * 7_919 + k) % all.len()];
                        let req = request(c, &format!("{tag}-{t}-{k}"));
                        k += 1;
                        let answer = tokio::time::timeout(
                            Duration::from_secs(5),
                            ScoringClient::new(channel.clone()).score(req),
                        )
                        .await;
                        match answer {
                            Ok(Ok(r)) => {
                                seen.acked.insert(r.into_inner().decision_id);
                            }
                            Ok(Err(status)) => {
                                seen.refused.push(status.code());
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(_) => seen.refused.push(Code::DeadlineExceeded),
                        }
                    }
                    seen
                })
            })
            .collect();
        let mut all = Seen::default();
        for t in tasks {
            let seen = t.await.unwrap();
            all.acked.extend(seen.acked);
            all.refused.extend(seen.refused);
        }
        all
    })
}

/// The decision ids in the store.
fn stored_ids(pg: &Postgres, db: &str) -> BTreeSet<String> {
    pg.psql(db, "SELECT decision_id FROM decisions")
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn db_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

async fn verify(server: &TestServer) -> pb::VerifyResult {
    server
        .trace()
        .verify(pb::VerifyRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_keep_one_trail_and_verify_names_the_replica_of_a_break() {
    let pg = Postgres::shared();
    let url = pg.database("trail");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas = Vec::new();
    for (id, dir) in ["replica-a", "replica-b", "replica-c"].iter().zip(&dirs) {
        replicas.push(replica(&url, id, dir.path()).await);
    }
    let all = customers();
    // Customer i is scored on replica i % 3.
    let mut answers = Vec::new();
    for i in 0..30 {
        let r = replicas[i % 3]
            .scoring()
            .score(request(&all[i], &format!("trail-{i}")))
            .await
            .unwrap()
            .into_inner();
        answers.push(r);
    }

    // Any replica traces any replica's decision, and a customer's history is whole.
    for (i, answer) in answers.iter().enumerate() {
        let other = &replicas[(i + 1) % 3];
        let record = other
            .trace()
            .get_decision(pb::DecisionRef {
                decision_id: answer.decision_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(record.request_id, format!("trail-{i}"));
        assert_eq!(record.version, answer.version);
    }
    replicas[2]
        .scoring()
        .score(request(&all[0], "trail-0-again"))
        .await
        .unwrap();
    let history = replicas[1]
        .trace()
        .customer_history(pb::CustomerRef {
            customer_id: all[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(
        history
            .iter()
            .map(|r| r.request_id.as_str())
            .collect::<Vec<_>>(),
        ["trail-0", "trail-0-again"],
        "the history holds both replicas' decisions, in order"
    );

    // A retry landing on another replica gets the first decision; a changed one is refused.
    let retried = replicas[1]
        .scoring()
        .score(request(&all[0], "trail-0"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried, answers[0], "the retry gets the recorded decision");
    let mut changed = request(&all[3], "trail-0");
    changed.current_limit = Some(all[3].limit + 1);
    let refused = replicas[2].scoring().score(changed).await.unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists, "{}", refused.message());

    let verified = verify(&replicas[0]).await;
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.records, 31);
    assert_eq!(
        verified.head_hash.split(' ').count(),
        3,
        "one head per replica"
    );

    // Edit a stored record of replica-b (the low byte of its recorded time): verify, from
    // another replica, names the replica and the record.
    let db = db_name(&url);
    pg.psql(
        db,
        "UPDATE decisions SET record = set_byte(record, 17, get_byte(record, 17) # 1) \
         WHERE replica_id = 'replica-b' AND seq = 3",
    )
    .unwrap();
    let broken = verify(&replicas[2]).await;
    assert!(!broken.ok, "{broken:?}");
    let b = broken.first_break.expect("a break");
    assert_eq!(b.kind, "edited", "{b:?}");
    assert_eq!(b.seq, 3, "{b:?}");
    assert!(b.detail.contains("replica-b"), "{b:?}");

    for r in replicas {
        r.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_under_load_refuses_loses_nothing_and_recovers_by_itself() {
    // A server of this test's own: stopping it must not disturb the other tests.
    let pg = Arc::new(Postgres::own());
    let url = pg.database("outage");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = replica(&url, "outage-a", dirs[0].path()).await;
    let b = replica(&url, "outage-b", dirs[1].path()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(
        vec![a.channel.clone(), b.channel.clone()],
        "outage",
        8,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let down = pg.clone();
    tokio::task::spawn_blocking(move || down.stop())
        .await
        .unwrap();
    for r in [&a, &b] {
        wait_ready(&r.channel, false, Duration::from_secs(5)).await;
    }
    let refused = a
        .scoring()
        .score(request(&customers()[1], "outage-while-down"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{}", refused.message());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let up = pg.clone();
    tokio::task::spawn_blocking(move || up.restart())
        .await
        .unwrap();
    for r in [&a, &b] {
        wait_ready(&r.channel, true, Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = running.await.unwrap();

    assert!(
        seen.refused.iter().all(|c| *c == Code::Unavailable),
        "refusals while PostgreSQL was down are UNAVAILABLE: {:?}",
        seen.refused
    );
    assert!(
        !seen.refused.is_empty(),
        "some requests came while it was down"
    );
    let stored = stored_ids(&pg, db_name(&url));
    let lost: Vec<_> = seen.acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged decisions are not stored: {lost:?}",
        lost.len()
    );
    let verified = verify(&a).await;
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.records as usize, stored.len());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_loses_no_acknowledged_decision() {
    let pg = Postgres::shared();
    let url = pg.database("killed");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let models = repo().join("models");
    let key = shared_key().display().to_string();
    let mut children = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let id = format!("killed-{i}");
        let env = replica_env(&url, &id, &key);
        let log = dir.path().join("server.log");
        children
            .push(ChildServer::start_with_env(&models, &dir.path().join("data"), &log, &env).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(
        children.iter().map(|c| c.channel.clone()).collect(),
        "killed",
        12,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let victim = children.remove(0);
    victim.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = running.await.unwrap();
    assert!(seen.acked.len() > 20, "load ran: {}", seen.acked.len());

    let stored = stored_ids(pg, db_name(&url));
    let lost: Vec<_> = seen.acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged decisions lost",
        lost.len()
    );

    // The killed replica comes back on its own chain and carries it on.
    let id = "killed-0";
    let env = replica_env(&url, id, &key);
    let log = dirs[0].path().join("server.log");
    let back = ChildServer::start_with_env(&models, &dirs[0].path().join("data"), &log, &env).await;
    ScoringClient::new(back.channel.clone())
        .score(request(&customers()[5], "killed-after"))
        .await
        .unwrap();
    let verified = riskserve::grpc::pb::trace_client::TraceClient::new(back.channel.clone())
        .verify(pb::VerifyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.records as usize, stored.len() + 1);
}
