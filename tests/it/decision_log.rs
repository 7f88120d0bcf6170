//! The decision log through the real server: idempotent retries, the trace of a limit change,
//! bit-for-bit replays across versions, and tampering named by verify.

use std::path::Path;

use crate::harness::*;
use riskserve::decision_log::{journal, record};
use riskserve::grpc::pb;
use tonic::Code;

fn dref(id: &str) -> pb::DecisionRef {
    pb::DecisionRef {
        decision_id: id.into(),
    }
}

async fn history(server: &TestServer, customer: &str) -> Vec<pb::DecisionRecord> {
    server
        .trace()
        .customer_history(pb::CustomerRef {
            customer_id: customer.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .records
}

#[tokio::test]
async fn a_retried_request_returns_the_recorded_decision_and_a_reused_id_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    let c = &customers()[10];
    let mut client = server.scoring();
    let first = client
        .score(request(c, "retry-1"))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .score(request(c, "retry-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first, again,
        "the retry gets the recorded decision, field for field"
    );

    let mut changed = request(c, "retry-1");
    changed.current_limit = Some(c.limit + 1000);
    let status = client.score(changed).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{}", status.message());
    assert!(status.message().contains("retry-1"));

    // In a batch too: a duplicate inside one batch is the same request.
    let batch = pb::ScoreBatchRequest {
        requests: vec![request(c, "retry-2"), request(c, "retry-2")],
    };
    let items = client.score_batch(batch).await.unwrap().into_inner().items;
    let ids: Vec<_> = items
        .iter()
        .map(|i| match &i.outcome {
            Some(pb::score_batch_item::Outcome::Response(r)) => r.decision_id.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids[0], ids[1]);

    let records = history(&server, &c.id).await;
    assert_eq!(records.len(), 2, "one record per distinct request");
    assert_eq!(records[0].decision_id, first.decision_id);
    let verify = server
        .trace()
        .verify(pb::VerifyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verify.ok && verify.records == 2, "{verify:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_limit_change_is_traced_to_the_version_that_made_it() {
    let models = models_v1_v2();
    let v2 = Offline::read(&models.join(MODEL).join("v2"));
    // A customer that v2 puts in the withdrawal band.
    let c = customers()
        .iter()
        .find(|c| v2.pd(&c.values) > 0.6 && c.limit > 0)
        .expect("a high-risk customer");
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models, data.path()).await;
    let mut client = server.scoring();

    let mut first_req = request(c, "trace-v1");
    first_req.current_limit = Some(c.limit);
    let first = client.score(first_req).await.unwrap().into_inner();
    assert_eq!(first.version, "v1");

    let mut admin = server.models();
    let v2ref = pb::VersionRef {
        model: MODEL.into(),
        version: "v2".into(),
    };
    admin.load_version(v2ref.clone()).await.unwrap();
    admin.serve_version(v2ref).await.unwrap();
    let mut second_req = request(c, "trace-v2");
    second_req.current_limit = Some(first.granted_limit.max(1000));
    let second = client.score(second_req).await.unwrap().into_inner();
    assert_eq!((second.version.as_str(), second.granted_limit), ("v2", 0));

    let records = history(&server, &c.id).await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].decision_id, second.decision_id);
    assert_eq!(records[1].version, "v2");
    assert_eq!(records[1].digest, v2.digest);
    assert_eq!(records[1].arm, pb::Arm::Champion as i32);
    assert_eq!(
        records[1].current_limit,
        Some(first.granted_limit.max(1000))
    );
    assert_eq!(records[1].granted_limit, 0);

    let e = server
        .trace()
        .explain(dref(&second.decision_id))
        .await
        .unwrap()
        .into_inner();
    let (now, before) = (e.decision.unwrap(), e.previous.expect("previous decision"));
    assert_eq!(
        (before.version.as_str(), now.version.as_str()),
        ("v1", "v2")
    );
    assert_ne!(before.digest, now.digest);
    assert_eq!(
        before.reasons, first.reasons,
        "the earlier reasons, as first answered"
    );
    assert_eq!(now.reasons, second.reasons);
    assert!(!now.reasons.is_empty());
    assert_eq!(e.band.unwrap().grade, second.grade);
    assert!(
        e.moved.is_empty(),
        "same features: the change comes from the version"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_decisions_across_two_versions_replay_bit_for_bit() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let mut client = server.scoring();
    let mut ids = Vec::new();
    for (phase, version) in ["v1", "v2"].iter().enumerate() {
        if *version == "v2" {
            let r = pb::VersionRef {
                model: MODEL.into(),
                version: "v2".into(),
            };
            server.models().load_version(r.clone()).await.unwrap();
            server.models().serve_version(r).await.unwrap();
        }
        let requests = (0..500)
            .map(|i| {
                request(
                    &customers()[phase * 500 + i],
                    &format!("replay-{version}-{i}"),
                )
            })
            .collect();
        let items = client
            .score_batch(pb::ScoreBatchRequest { requests })
            .await
            .unwrap()
            .into_inner()
            .items;
        for item in items {
            let Some(pb::score_batch_item::Outcome::Response(r)) = item.outcome else {
                panic!("batch item failed");
            };
            assert_eq!(&r.version, version);
            ids.push(r.decision_id);
        }
    }
    // Replays read bundles by digest: unloading v1 must not matter.
    server
        .models()
        .unload_version(pb::VersionRef {
            model: MODEL.into(),
            version: "v1".into(),
        })
        .await
        .unwrap();
    let mut trace = server.trace();
    let mut per_version = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let r = trace.replay(dref(id)).await.unwrap().into_inner();
        assert!(r.identical, "{id}: {:?}", r.differences);
        let rec = r.recorded.unwrap();
        assert_eq!(
            r.probability_of_default.to_bits(),
            rec.probability_of_default.to_bits()
        );
        *per_version.entry(rec.version).or_default() += 1;
    }
    assert_eq!(per_version.get("v1"), Some(&500));
    assert_eq!(per_version.get("v2"), Some(&500));

    let summary = trace
        .by_version(pb::ByVersionRequest {
            model: MODEL.into(),
            version: "v2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.decisions, 500);
    assert_eq!(summary.approve + summary.review + summary.decline, 500);
    assert_eq!(
        summary.raised + summary.held + summary.cut + summary.withdrawn,
        500
    );
    server.stop().await.unwrap();
}

/// The journal's entries (prev hash, hash, record) of a stopped server, in seq order.
fn journal_entries(data: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    journal::read_only(&data.join("journal"), |r| {
        out.push(r.payload);
        true
    })
    .unwrap();
    out
}

/// Copies a stopped server's data directory and rewrites its journal as a forger would:
/// `edit` changes the entries, every frame is made anew with a valid CRC, and the query view
/// is removed (the server rebuilds it from the journal). Returns what a server started on
/// the copy says of the chain.
async fn verify_forged(data: &Path, edit: impl FnOnce(&mut Vec<Vec<u8>>)) -> pb::VerifyResult {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(data, copy.path());
    let mut entries = journal_entries(copy.path());
    edit(&mut entries);
    let dir = copy.path().join("journal");
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "seg") {
            std::fs::remove_file(p).unwrap();
        }
    }
    for f in ["decisions.db", "decisions.db-wal", "decisions.db-shm"] {
        let _ = std::fs::remove_file(copy.path().join(f));
    }
    let (mut j, _) =
        journal::Journal::open(&dir, journal::JournalOptions::default(), None).unwrap();
    j.append(&entries).unwrap();
    drop(j);
    let server = TestServer::start(&repo().join("models"), copy.path()).await;
    let result = server
        .trace()
        .verify(pb::VerifyRequest {})
        .await
        .unwrap()
        .into_inner();
    server.stop().await.unwrap();
    result
}

/// An entry with its record's granted limit raised, hashes untouched.
fn raise_limit(data: &Path, entry: &[u8]) -> Vec<u8> {
    let bytes = &entry[64..];
    let digest = record::digest_of(bytes).unwrap();
    let names: Vec<String> = serde_json::from_slice(
        &std::fs::read(
            data.join("journal/names")
                .join(format!("{}.json", digest.trim_start_matches("sha256:"))),
        )
        .unwrap(),
    )
    .unwrap();
    let mut body = record::decode(bytes, &names).unwrap();
    body.granted_limit += 1000;
    let mut out = entry[..64].to_vec();
    out.extend(record::encode(&body, &names).unwrap());
    out
}

#[tokio::test]
async fn verify_names_an_edited_a_deleted_and_a_swapped_record() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    let requests = (0..30)
        .map(|i| request(&customers()[i], &format!("tamper-{i}")))
        .collect();
    server
        .scoring()
        .score_batch(pb::ScoreBatchRequest { requests })
        .await
        .unwrap();
    let intact = server
        .trace()
        .verify(pb::VerifyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(intact.ok && intact.records == 30, "{intact:?}");
    server.stop().await.unwrap();

    // Re-framing alone changes nothing.
    let reframed = verify_forged(data.path(), |_| {}).await;
    assert!(reframed.ok && reframed.records == 30, "{reframed:?}");

    let path = data.path().to_path_buf();
    let edited = verify_forged(data.path(), |e| e[9] = raise_limit(&path, &e[9])).await;
    let b = edited.first_break.expect("edit found");
    assert_eq!((b.seq, b.kind.as_str()), (10, "edited"), "{}", b.detail);

    // The journal numbers its frames, so a forger renumbers: record 13 now sits at seq 12.
    let deleted = verify_forged(data.path(), |e| {
        e.remove(11);
    })
    .await;
    let b = deleted.first_break.expect("deletion found");
    assert_eq!((b.seq, b.kind.as_str()), (12, "deleted"), "{}", b.detail);

    let swapped = verify_forged(data.path(), |e| e.swap(4, 19)).await;
    let b = swapped.first_break.expect("swap found");
    assert_eq!((b.seq, b.kind.as_str()), (5, "reordered"), "{}", b.detail);

    let pruned_without_anchor = verify_forged(data.path(), |e| {
        e.drain(..10);
    })
    .await;
    assert_eq!(pruned_without_anchor.first_break.unwrap().kind, "deleted");
}

#[tokio::test]
async fn the_callers_trace_id_is_recorded_with_the_decision() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut traced = tonic::Request::new(request(&customers()[3], "traced"));
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    let with = server.scoring().score(traced).await.unwrap().into_inner();
    let mut batch = tonic::Request::new(pb::ScoreBatchRequest {
        requests: vec![request(&customers()[4], "traced-batch")],
    });
    batch.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    let batch = server
        .scoring()
        .score_batch(batch)
        .await
        .unwrap()
        .into_inner();
    let Some(pb::score_batch_item::Outcome::Response(in_batch)) = &batch.items[0].outcome else {
        panic!("{batch:?}");
    };
    let without = server
        .scoring()
        .score(request(&customers()[5], "untraced"))
        .await
        .unwrap()
        .into_inner();
    for (id, want) in [
        (&with.decision_id, trace),
        (&in_batch.decision_id, trace),
        (&without.decision_id, ""),
    ] {
        let record = server
            .trace()
            .get_decision(dref(id))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(record.trace_id, want);
    }
    server.stop().await.unwrap();
}
