//! Limits on the real server: the excess over the concurrency limit is shed with
//! RESOURCE_EXHAUSTED, asking the client to wait, while every accepted decision is recorded; a
//! request whose deadline has passed decides nothing; an oversized message is refused.
//! (Latency under overload is measured in bench/overload.sh, not here.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::harness::{TestServer, config, customers, models_v1_v2, request};
use riskserve::grpc::pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_excess_is_shed_with_resource_exhausted_and_every_accepted_decision_is_recorded() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(riskserve::Config {
        max_concurrent_requests: 2,
        ..config(models_v1_v2(), data.path())
    })
    .await;
    let accepted = Arc::new(AtomicU64::new(0));
    let shed = Arc::new(AtomicU64::new(0));
    // 8 clients against a limit of 2, each sending batches of 200 customers.
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let (mut scoring, accepted, shed) = (server.scoring(), accepted.clone(), shed.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..15usize {
                let requests = (0..200)
                    .map(|i| {
                        let n = (t * 15 + round) * 200 + i;
                        request(&customers()[n % customers().len()], &format!("load-{n}"))
                    })
                    .collect();
                match scoring
                    .score_batch(pb::ScoreBatchRequest { requests })
                    .await
                {
                    Ok(r) => {
                        let items = r.into_inner().items;
                        assert!(items.iter().all(|i| matches!(
                            i.outcome,
                            Some(pb::score_batch_item::Outcome::Response(_))
                        )));
                        accepted.fetch_add(items.len() as u64, Ordering::Relaxed);
                    }
                    Err(s) => {
                        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                        assert!(
                            s.message().contains("2 requests already in flight"),
                            "{s:?}"
                        );
                        // The wait gRPC retry policies obey: 10 ms by default, jittered.
                        let pushback: u64 = s
                            .metadata()
                            .get("grpc-retry-pushback-ms")
                            .expect("a refusal without grpc-retry-pushback-ms")
                            .to_str()
                            .unwrap()
                            .parse()
                            .unwrap();
                        assert!((5..=15).contains(&pushback), "{s:?}");
                        assert!(
                            s.message().ends_with(&format!("retry after {pushback} ms")),
                            "{s:?}"
                        );
                        shed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Health answers throughout.
    let mut health = HealthClient::new(server.channel.clone());
    for _ in 0..10 {
        let r = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        assert!(r.is_ok(), "health refused under overload: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (accepted, shed) = (
        accepted.load(Ordering::Relaxed),
        shed.load(Ordering::Relaxed),
    );
    assert!(shed > 0, "8 clients never exceeded a limit of 2");
    assert!(accepted > 0);
    let verified = server
        .trace()
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok);
    assert_eq!(
        verified.records, accepted,
        "accepted decisions and records differ"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_deadline_has_passed_decides_and_records_nothing() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let customer = &customers()[7];
    let mut late = tonic::Request::new(request(customer, "too-late"));
    late.set_timeout(Duration::from_nanos(1));
    let err = server.scoring().score(late).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    // Same for a batch.
    let mut late = tonic::Request::new(pb::ScoreBatchRequest {
        requests: vec![request(customer, "too-late-batch")],
    });
    late.set_timeout(Duration::from_nanos(1));
    match server.scoring().score_batch(late).await {
        Err(e) => assert!(matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled)),
        Ok(r) => match &r.into_inner().items[0].outcome {
            Some(pb::score_batch_item::Outcome::Error(e)) => {
                assert_eq!(e.code, Code::DeadlineExceeded as i32, "{e:?}")
            }
            other => panic!("a late batch item was decided: {other:?}"),
        },
    }
    let history = server
        .trace()
        .customer_history(pb::CustomerRef {
            customer_id: customer.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(
        history.is_empty(),
        "a late request was recorded: {history:?}"
    );
    // With time to spare the same customer is decided and recorded.
    let mut timely = tonic::Request::new(request(customer, "in-time"));
    timely.set_timeout(Duration::from_secs(10));
    server.scoring().score(timely).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_refused_and_a_small_one_served() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(riskserve::Config {
        max_message_bytes: 16 * 1024,
        ..config(models_v1_v2(), data.path())
    })
    .await;
    let big = pb::ScoreBatchRequest {
        requests: (0..200)
            .map(|i| request(&customers()[i], &format!("big-{i}")))
            .collect(),
    };
    let err = server.scoring().score_batch(big).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    server
        .scoring()
        .score(request(&customers()[0], "small"))
        .await
        .unwrap();
    let records = server
        .trace()
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(records, 1, "only the small request was decided");
    server.stop().await.unwrap();
}
