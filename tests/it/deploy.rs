//! The Kubernetes manifests under deploy/kubernetes: every document parses and is named,
//! the kustomization lists every manifest but the Secret example, the probes name health
//! services a real server reports SERVING on the port the container names `grpc`, every flag
//! and RISKSERVE_* variable is one `riskserve serve` knows, the ConfigMap's riskserve.toml
//! passes the server's own config checks, and the grace period covers preStop and drain.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use crate::harness::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use yaml_serde::Value;

fn dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// Every document of every manifest, with its file name.
fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        for doc in yaml_serde::Deserializer::from_str(&text) {
            let value = <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            docs.push((name.clone(), value));
        }
    }
    docs
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut at = v;
    for key in path {
        at = &at[*key];
    }
    at.as_str()
        .unwrap_or_else(|| panic!("no string at {path:?} in {v:?}"))
}

fn the(docs: &[(String, Value)], kind: &str) -> Value {
    let found: Vec<_> = docs
        .iter()
        .filter(|(file, d)| d["kind"].as_str() == Some(kind) && file != "secret.example.yaml")
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0].1.clone()
}

#[tokio::test]
async fn the_kubernetes_manifests_parse_and_agree_with_the_server() {
    let docs = documents();
    for (file, d) in &docs {
        for key in ["apiVersion", "kind"] {
            assert!(d[key].as_str().is_some(), "{file}: no {key}");
        }
        if d["kind"].as_str() != Some("Kustomization") {
            str_at(d, &["metadata", "name"]);
        }
    }

    // The kustomization applies every manifest but the Secret example.
    let kustomization = the(&docs, "Kustomization");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let files: BTreeSet<String> = docs
        .iter()
        .map(|(f, _)| f.clone())
        .filter(|f| f != "kustomization.yaml" && f != "secret.example.yaml")
        .collect();
    assert_eq!(listed, files);

    let deployment = the(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(3));
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let container = &pod["containers"][0];
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    let port = &container["ports"][0];
    assert_eq!(port["name"].as_str(), Some("grpc"));
    let grpc_port = port["containerPort"].as_u64().unwrap();

    // The probes ask a real server's health service for names it reports SERVING.
    let models = repo().join("models");
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&models, data.path()).await;
    let mut health = HealthClient::new(server.channel.clone());
    let mut probed = BTreeSet::new();
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        let grpc = &container[probe]["grpc"];
        assert_eq!(grpc["port"].as_u64(), Some(grpc_port), "{probe}");
        let service = str_at(grpc, &["service"]).to_string();
        let status = health
            .check(HealthCheckRequest {
                service: service.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{probe}: {service:?} unknown to the server: {e}"))
            .into_inner()
            .status;
        assert_eq!(status, 1, "{probe}: {service} is SERVING");
        probed.insert((probe, service));
    }
    assert!(probed.contains(&("readinessProbe", "riskserve.v1.Scoring".into())));
    assert!(probed.contains(&("livenessProbe", riskserve::server::LIVENESS.into())));
    let unknown = health
        .check(HealthCheckRequest {
            service: "riskserve.v1.Nothing".into(),
        })
        .await;
    assert!(
        unknown.is_err(),
        "an unknown name is refused, so the check above means something"
    );
    server.stop().await.unwrap();

    // Every flag and RISKSERVE_* variable is one `riskserve serve` reads.
    let help = Command::new(env!("CARGO_BIN_EXE_riskserve"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "serve");
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(&format!("{flag} ")),
            "{flag} is not a serve flag"
        );
    }
    for env in container["env"].as_sequence().unwrap() {
        let name = str_at(env, &["name"]);
        if name.starts_with("RISKSERVE_") {
            assert!(
                help.contains(&format!("[env: {name}")),
                "{name} is not read"
            );
        }
    }

    // The ConfigMap's file passes the server's checks, and the mounts put it where the args
    // say.
    let config = the(&docs, "ConfigMap");
    let toml = str_at(&config, &["data", "riskserve.toml"]);
    let file = data.path().join("riskserve.toml");
    std::fs::write(&file, toml).unwrap();
    let parsed = riskserve::Config::from_file(&file).unwrap();
    parsed.validate().unwrap();
    assert_eq!(parsed.listen.port() as u64, grpc_port);
    let mounts = container["volumeMounts"].as_sequence().unwrap();
    let mounted = |path: &str| mounts.iter().any(|m| str_at(m, &["mountPath"]) == path);
    let config_at = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    assert!(mounted(config_at), "{config_at} is mounted");
    for path in [&parsed.models_dir, &parsed.data_dir] {
        assert!(mounted(path.to_str().unwrap()), "{path:?} is mounted");
    }

    // Termination waits for the preStop sleep and the server's drain.
    let sleep: u64 = container["lifecycle"]["preStop"]["exec"]["command"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > sleep + parsed.grace_period_secs,
        "{grace}s must cover {sleep}s of preStop and {}s of drain",
        parsed.grace_period_secs
    );
}
