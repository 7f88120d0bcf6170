//! Health, readiness, graceful shutdown, reflection, and state that survives a restart.

use std::time::Duration;

use crate::harness::*;
use riskserve::grpc::pb;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn health(server: &TestServer, service: &str) -> ServingStatus {
    let r = HealthClient::new(server.channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

#[tokio::test]
async fn ready_only_when_every_model_serves_and_liveness_ignores_failed_loads() {
    // Only a broken bundle: alive, not ready.
    let models = tempfile::tempdir().unwrap();
    let broken = models.path().join(MODEL).join("v1");
    copy_dir(&repo().join("models").join(MODEL).join("v1"), &broken);
    std::fs::write(broken.join("bundle.sha256"), "sha256:00\n").unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models.path(), data.path()).await;
    assert_eq!(health(&server, "liveness").await, ServingStatus::Serving);
    assert_eq!(health(&server, "").await, ServingStatus::NotServing);
    assert_eq!(
        health(&server, "riskserve.v1.Scoring").await,
        ServingStatus::NotServing
    );
    let status = server
        .scoring()
        .score(request(&customers()[0], "not-ready"))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "{}",
        status.message()
    );

    // Repaired in place: the watcher loads it once it changes; an operator serves it.
    riskserve::bundle::seal(&broken).unwrap();
    let mut admin = server.models();
    let r = pb::VersionRef {
        model: MODEL.into(),
        version: "v1".into(),
    };
    let mut loaded = false;
    for _ in 0..40 {
        if admin.serve_version(r.clone()).await.is_ok() {
            loaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(loaded, "the repaired bundle was loaded by the watcher");
    // Readiness follows through a watch channel; give it a moment.
    for _ in 0..40 {
        if health(&server, "").await == ServingStatus::Serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(health(&server, "").await, ServingStatus::Serving);
    assert_eq!(
        health(&server, "riskserve.v1.Scoring").await,
        ServingStatus::Serving
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_turns_health_not_serving_first_and_returns() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    assert_eq!(health(&server, "").await, ServingStatus::Serving);
    let mut watch = HealthClient::new(server.channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    let stopped = tokio::spawn(server.stop());
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("health reports before the server goes away");
    let update = next.expect("an update, not the end of the stream").unwrap();
    assert_eq!(update.status, ServingStatus::NotServing as i32);
    drop(watch);
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("serve() returns within the grace period")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn the_serving_choice_survives_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let models = models_v1_v2();
    let config = riskserve::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        models_dir: models.to_owned(),
        data_dir: data.path().to_owned(),
        ..riskserve::Config::default()
    };
    // No pin and no saved choice: the highest version serves.
    let server = TestServer::start_with(config.clone()).await;
    let r = server
        .scoring()
        .score(request(&customers()[0], "a"))
        .await
        .unwrap();
    assert_eq!(r.into_inner().version, "v2");
    server
        .models()
        .serve_version(pb::VersionRef {
            model: MODEL.into(),
            version: "v1".into(),
        })
        .await
        .unwrap();
    server.stop().await.unwrap();

    let server = TestServer::start_with(config).await;
    let r = server
        .scoring()
        .score(request(&customers()[0], "b"))
        .await
        .unwrap();
    assert_eq!(
        r.into_inner().version,
        "v1",
        "the operator's choice is kept"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&repo().join("models"), data.path()).await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(server.channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in [
        "riskserve.v1.Scoring",
        "riskserve.v1.Models",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} in {names:?}");
    }
    server.stop().await.unwrap();
}
