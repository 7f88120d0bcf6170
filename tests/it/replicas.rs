//! Several replicas on one real PostgreSQL: one trail of decisions that every replica sees,
//! request ids unique across replicas, each replica's chain verified and a break named by
//! its replica; one rollout that routes alike on every replica, whose changes (a promotion,
//! a guardrail rollback judged on every replica's decisions) reach all within a second;
//! PostgreSQL stopped under load (refusals, never an unrecorded decision, and recovery
//! without a restart); a replica killed under load loses no acknowledged decision, and the
//! evaluator's lease moves to a survivor.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::*;
use riskserve::grpc::pb;
use riskserve::grpc::pb::rollouts_client::RolloutsClient;
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
    replica_of(&repo().join("models"), store, id, data).await
}

/// The same, serving `models` and judging guardrails every 20 ms.
async fn replica_of(
    models: &std::path::Path,
    store: &str,
    id: &str,
    data: &std::path::Path,
) -> TestServer {
    TestServer::start_with(riskserve::Config {
        store: Some(store.into()),
        replica_id: Some(id.into()),
        customer_key_files: vec![shared_key()],
        rollout_eval_interval_ms: 20,
        ..config(models, data)
    })
    .await
}

/// A request id never used before (a reused one would get its first decision back).
fn fresh_id(tag: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!("{tag}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn rollouts(channel: &Channel) -> RolloutsClient<Channel> {
    RolloutsClient::new(channel.clone())
}

/// Waits until `check` holds on every replica; how long that took.
async fn until_all(
    replicas: &[TestServer],
    within: Duration,
    what: &str,
    check: impl AsyncFn(&TestServer) -> bool,
) -> Duration {
    let start = Instant::now();
    for r in replicas {
        while !check(r).await {
            assert!(
                start.elapsed() < within,
                "{what}: not on every replica within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    start.elapsed()
}

/// A plan at half the customers, then all, advanced by hand, whose guardrails wait for more
/// decisions than a test scores: they never judge.
const UNJUDGED_HALF: &str = "auto_advance = false\n[[steps]]\nshare_bp = 5000\nmin_bake_secs = 0\n\
                             [[steps]]\nshare_bp = 10000\nmin_bake_secs = 0\n\
                             [guardrails]\nmin_sample = 100000\nwindow = 100000\n";

/// Starts a rollout of `candidate` through `via` and waits until every replica has it (at
/// most a second); the start, and how long it took to reach all.
async fn start_everywhere(
    replicas: &[TestServer],
    via: &TestServer,
    candidate: &str,
    plan: &str,
) -> (pb::RolloutStatus, Duration) {
    let started = start_rollout(via, candidate, plan).await;
    let what = format!("the start of {candidate}");
    let seen = until_all(replicas, Duration::from_secs(1), &what, async |r| {
        rollout_status(&r.channel).await.id == started.id
    })
    .await;
    (started, seen)
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
    // Started at once on an empty database: one of them creates the schema, the others wait
    // for it and find it made.
    let (a, b, c) = tokio::join!(
        replica(&url, "replica-a", dirs[0].path()),
        replica(&url, "replica-b", dirs[1].path()),
        replica(&url, "replica-c", dirs[2].path()),
    );
    let replicas = [a, b, c];
    assert_eq!(
        pg.psql(db_name(&url), "SELECT version FROM riskserve_schema")
            .unwrap(),
        riskserve::postgres::SCHEMA_VERSION.to_string(),
        "migrated once, to this release's version"
    );
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
        let ids = ["replica-a", "replica-b", "replica-c"];
        assert_eq!(
            record.replica_id,
            ids[i % 3],
            "recorded by the replica that decided"
        );
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
async fn one_rollout_routes_alike_on_every_replica_and_its_changes_reach_all_within_a_second() {
    let pg = Postgres::shared();
    let url = pg.database("rollout");
    let models = scratch_models();
    flawed_candidate(models.path());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas = Vec::new();
    for (id, dir) in ["roll-a", "roll-b", "roll-c"].iter().zip(&dirs) {
        replicas.push(replica_of(models.path(), &url, id, dir.path()).await);
    }
    let (a, c) = (&replicas[0], &replicas[2]);

    // Started through A, at half the customers: every replica routes each customer alike.
    // Its guardrails never judge: each replica scores the same 200 customers, so each arm
    // holds ~100 distinct customers counted three times, and the PSI of two such samples of
    // one population can pass 0.25 by chance alone.
    let (_, seen) = start_everywhere(&replicas, a, "v2", UNJUDGED_HALF).await;
    eprintln!("a start through A reached every replica in {seen:?}");
    let mut arms = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        let answers = score_range(r, &format!("route-{i}"), 0..200).await;
        arms.push(answers.iter().map(|a| a.arm).collect::<Vec<_>>());
    }
    assert_eq!(arms[0], arms[1], "A and B route alike");
    assert_eq!(arms[0], arms[2], "A and C route alike");
    let candidates = arms[0]
        .iter()
        .filter(|a| **a == pb::Arm::Candidate as i32)
        .count();
    assert!(
        (60..140).contains(&candidates),
        "{candidates} of 200 at 50%"
    );

    // Promoted through C: A serves v2 to everyone within a second.
    rollouts(&c.channel)
        .promote(rollout_ref(MODEL))
        .await
        .unwrap();
    let seen = until_all(
        &replicas,
        Duration::from_secs(1),
        "the promotion",
        async |r| {
            let answer = r
                .scoring()
                .score(request(&customers()[0], &fresh_id("promoted")))
                .await
                .unwrap()
                .into_inner();
            answer.version == "v2" && answer.arm == pb::Arm::Champion as i32
        },
    )
    .await;
    eprintln!("a promotion through C reached every replica in {seen:?}");

    // A flawed candidate, with traffic spread over the three: one rollback, judged on the
    // decisions of all of them, seen by all within a second.
    let plan = "auto_advance = true\n\
                [[steps]]\nshare_bp = 0\nshadow = true\nmin_bake_secs = 0\nmin_decisions = 200\n\
                [[steps]]\nshare_bp = 100\nmin_bake_secs = 0\nmin_decisions = 200\n\
                [[steps]]\nshare_bp = 10000\nmin_bake_secs = 0\nmin_decisions = 200\n\
                [guardrails]\nmin_sample = 200\n";
    let (flawed, _) = start_everywhere(&replicas, &replicas[1], "v9", plan).await;
    let mut from = 0;
    let rolled_back = loop {
        for (i, r) in replicas.iter().enumerate() {
            score_range(r, &format!("flawed-{i}"), from..from + 100).await;
        }
        from += 100;
        let s = rollout_status(&a.channel).await;
        if s.state != "active" {
            break s;
        }
        assert!(
            from < 10_000,
            "no rollback after {from} customers per replica"
        );
    };
    assert_eq!(rolled_back.state, "rolled_back", "{rolled_back:?}");
    let stopped = Instant::now();
    until_all(
        &replicas,
        Duration::from_secs(1),
        "the rollback",
        async |r| {
            let answer = r
                .scoring()
                .score(request(&customers()[7], &fresh_id("after")))
                .await
                .unwrap()
                .into_inner();
            rollout_status(&r.channel).await.state == "rolled_back"
                && answer.arm == pb::Arm::Champion as i32
        },
    )
    .await;
    eprintln!(
        "the rollback reached every replica within {:?}",
        stopped.elapsed()
    );
    let closes: Vec<_> = rolled_back
        .transitions
        .iter()
        .filter(|t| t.to_state == "rolled_back")
        .collect();
    assert_eq!(closes.len(), 1, "one rollback: {closes:?}");
    assert_eq!(closes[0].actor, "guardrail");
    let db = db_name(&url);
    let judged_on = pg
        .psql(
            db,
            &format!(
                "SELECT COUNT(DISTINCT replica_id) FROM decisions WHERE rollout_id = '{}' \
                 AND arm IN ('shadow', 'candidate')",
                flawed.id
            ),
        )
        .unwrap();
    assert_eq!(judged_on, "3", "the candidate decided on every replica");

    // Its report, read through C, counts every replica's decisions (read between two equal
    // counts: shadow scorings still queued when it closed may land meanwhile).
    let count = |sql: &str| -> u64 { pg.psql(db, sql).unwrap().parse().unwrap() };
    let in_rollout = format!(
        "SELECT COUNT(*) FROM decisions WHERE rollout_id = '{}'",
        flawed.id
    );
    loop {
        let before = count(&in_rollout);
        let history = rollouts(&c.channel)
            .history(pb::RolloutHistoryRequest {
                id: flawed.id.clone(),
                model: MODEL.into(),
            })
            .await
            .unwrap()
            .into_inner();
        if count(&in_rollout) != before {
            continue;
        }
        let reported: u64 = history
            .arms
            .iter()
            .map(|a| a.summary.as_ref().unwrap().decisions)
            .sum();
        assert_eq!(reported, before, "the report counts all three replicas");
        break;
    }

    // A backtest through B re-scores the customers that every replica decided.
    let (report, _) = backtest(&replicas[1], "v1", 0).await;
    let customers_decided = count(
        "SELECT COUNT(DISTINCT customer_ref) FROM decisions WHERE arm IN ('champion', 'candidate')",
    );
    assert_eq!(report.compared, customers_decided);

    // The flawed candidate again, at half the customers and never judged, with traffic on
    // all three, rolled back by hand through B: its harm is remediated through A, and seen
    // as remediated (nothing applied twice) through C.
    let (harmful, _) = start_everywhere(&replicas, a, "v9", UNJUDGED_HALF).await;
    for (i, r) in replicas.iter().enumerate() {
        score_range(r, &format!("harm-{i}"), i * 300..(i + 1) * 300).await;
    }
    rollouts(&replicas[1].channel)
        .rollback(rollout_ref(MODEL))
        .await
        .unwrap();
    let remediate = async |r: &TestServer| {
        let request = pb::RemediateRequest {
            rollout_id: harmful.id.clone(),
            apply: true,
            reason: "test".into(),
            ..Default::default()
        };
        let (applied, summary) = run_remediation(r, request).await.unwrap();
        (applied.len() as u64, summary.totals.unwrap())
    };
    let (applied, first) = remediate(a).await;
    // The summary is as things stand after the call: everyone applied is remediated.
    assert!(applied > 0, "the candidate harmed someone: {first:?}");
    assert_eq!(
        (first.remediated, first.to_restore),
        (applied, 0),
        "{first:?}"
    );
    let harmed_on = count(&format!(
        "SELECT COUNT(DISTINCT replica_id) FROM decisions WHERE rollout_id = '{}' \
         AND arm = 'candidate'",
        harmful.id
    ));
    assert_eq!(harmed_on, 3, "harm decided on every replica");
    let (again, second) = remediate(c).await;
    assert_eq!((again, second.to_restore), (0, 0), "{second:?}");
    assert_eq!(second.remediated, applied);
    assert_eq!(
        count("SELECT COUNT(*) FROM decisions WHERE arm = 'remediation' AND replica_id = 'roll-a'"),
        applied,
        "recorded by A"
    );

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
    // One replica holds the evaluator's lease; killed, a survivor takes it over.
    let leads = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("this replica now evaluates")
    };
    let logs: Vec<_> = dirs.iter().map(|d| d.path().join("server.log")).collect();
    let leaders: Vec<usize> = (0..3).filter(|i| leads(&logs[*i])).collect();
    assert_eq!(leaders.len(), 1, "one replica evaluates: {leaders:?}");
    let leader = leaders[0];
    let victim = children.remove(leader);
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
    let killed = Instant::now();
    while !(0..3).any(|i| i != leader && leads(&logs[i])) {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "no survivor took the evaluator's lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The killed replica comes back on its own chain and carries it on.
    let id = format!("killed-{leader}");
    let env = replica_env(&url, &id, &key);
    let dir = dirs[leader].path();
    let back = ChildServer::start_with_env(&models, &dir.join("data"), &logs[leader], &env).await;
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
