//! Authentication and roles on the real server: every role against every service, with
//! bearer tokens and with client certificates under mutual TLS (made here with rcgen), and
//! the caller recorded with each decision and rollout transition.

use crate::harness::{
    MODEL, TestServer, config, customers, infer_outputs, infer_request, models_v1_v2, request,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use riskserve::config::TlsConfig;
use riskserve::grpc::gate::auth::{AuthConfig, ClientEntry, Role, TokenEntry, token_sha256};
use riskserve::grpc::pb;
use riskserve::grpc::pb::models_client::ModelsClient;
use riskserve::grpc::pb::rollouts_client::RolloutsClient;
use riskserve::grpc::pb::scoring_client::ScoringClient;
use riskserve::grpc::pb::trace_client::TraceClient;
use riskserve::grpc::v2::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// The guarded services and the role each needs.
const SERVICES: [(&str, Role); 5] = [
    ("Scoring", Role::Scorer),
    ("Inference", Role::Scorer),
    ("Models", Role::Operator),
    ("Rollouts", Role::Operator),
    ("Trace", Role::Reviewer),
];

/// One cheap call to `service` with `token` (if any) as a bearer token; the status code.
async fn call(channel: &Channel, service: &str, token: Option<&str>, n: usize) -> Code {
    fn with<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = token {
            let v: MetadataValue<_> = format!("Bearer {t}").parse().unwrap();
            r.metadata_mut().insert("authorization", v);
        }
        r
    }
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    match service {
        "Scoring" => {
            let req = request(
                &customers()[n],
                &format!("auth-{n}-{}", token.unwrap_or("")),
            );
            code(
                ScoringClient::new(channel.clone())
                    .score(with(req, token))
                    .await
                    .map(|_| ()),
            )
        }
        "Inference" => {
            let req = infer_request(
                &customers()[n..n + 1],
                &format!("auth-v2-{n}-{}", token.unwrap_or("")),
            );
            code(
                GrpcInferenceServiceClient::new(channel.clone())
                    .model_infer(with(req, token))
                    .await
                    .map(|_| ()),
            )
        }
        "Models" => code(
            ModelsClient::new(channel.clone())
                .list_models(with(pb::ListModelsRequest {}, token))
                .await
                .map(|_| ()),
        ),
        "Rollouts" => code(
            RolloutsClient::new(channel.clone())
                .list(with(pb::ListRolloutsRequest {}, token))
                .await
                .map(|_| ()),
        ),
        "Trace" => code(
            TraceClient::new(channel.clone())
                .verify(with(pb::VerifyRequest::default(), token))
                .await
                .map(|_| ()),
        ),
        "Health" => code(
            HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|_| ()),
        ),
        other => panic!("no service {other}"),
    }
}

fn tokens() -> Vec<(&'static str, Role, String)> {
    vec![
        ("scoring-app", Role::Scorer, "tok-scorer-3c1f".into()),
        ("ops", Role::Operator, "tok-operator-9a2e".into()),
        ("audit", Role::Reviewer, "tok-reviewer-77d0".into()),
    ]
}

fn token_config() -> AuthConfig {
    AuthConfig {
        required: None,
        tokens: tokens()
            .into_iter()
            .map(|(name, role, token)| TokenEntry {
                name: name.into(),
                roles: vec![role],
                sha256: token_sha256(&token),
            })
            .collect(),
        clients: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_role_reaches_its_services_only_and_is_recorded_as_the_caller() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(riskserve::Config {
        auth: token_config(),
        ..config(models_v1_v2(), data.path())
    })
    .await;
    let ch = &server.channel;

    let mut n = 0;
    for (name, role, token) in tokens() {
        for (service, needs) in SERVICES {
            n += 1;
            let got = call(ch, service, Some(&token), n).await;
            let want = if role == needs {
                Code::Ok
            } else {
                Code::PermissionDenied
            };
            assert_eq!(got, want, "{name} ({role}) calling {service}");
        }
        assert_eq!(call(ch, "Health", Some(&token), 0).await, Code::Ok);
    }
    for (service, _) in SERVICES {
        n += 1;
        assert_eq!(
            call(ch, service, None, n).await,
            Code::Unauthenticated,
            "{service}"
        );
        assert_eq!(
            call(ch, service, Some("not-a-token"), n).await,
            Code::Unauthenticated,
            "{service}"
        );
    }
    assert_eq!(
        call(ch, "Health", None, 0).await,
        Code::Ok,
        "health stays open"
    );

    // The scorer's decision names it; the operator's transition names it, whatever the
    // request's own actor field claims.
    let [scorer, operator, reviewer] = [0, 1, 2].map(|i| tokens()[i].2.clone());
    let bearer = |t: &str| -> MetadataValue<_> { format!("Bearer {t}").parse().unwrap() };
    fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        req.metadata_mut().insert("authorization", value);
        req
    }
    // Who the decision's record names, read by the reviewer.
    let recorded_caller = |decision_id: String| {
        let req = with_token(pb::DecisionRef { decision_id }, &reviewer);
        let mut trace = TraceClient::new(ch.clone());
        async move { trace.get_decision(req).await.unwrap().into_inner().caller }
    };
    let decided = ScoringClient::new(ch.clone())
        .score(with_token(
            request(&customers()[500], "auth-recorded"),
            &scorer,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        recorded_caller(decided.decision_id).await,
        "token:scoring-app"
    );
    // So does a decision asked for through the inference protocol.
    let v2_req = infer_request(&customers()[501..502], "auth-v2-recorded");
    let inferred = GrpcInferenceServiceClient::new(ch.clone())
        .model_infer(with_token(v2_req, &scorer))
        .await
        .unwrap()
        .into_inner();
    let decision_id = infer_outputs(&inferred).strings["decision_id"][0].clone();
    assert_eq!(recorded_caller(decision_id).await, "token:scoring-app");

    let mut req = tonic::Request::new(pb::StartRolloutRequest {
        model: MODEL.into(),
        candidate: "v2".into(),
        plan_toml: String::new(),
        actor: "someone-else".into(),
        skip_backtest: true,
    });
    req.metadata_mut()
        .insert("authorization", bearer(&operator));
    let started = RolloutsClient::new(ch.clone())
        .start(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.transitions[0].actor, "token:ops");

    // The command line sends RISKSERVE_TOKEN.
    let addr = format!("http://{}", server.addr);
    let (ok, out) = cli(
        &["models", "list", "--server", &addr],
        &[("RISKSERVE_TOKEN", &operator)],
    );
    assert!(ok && out.contains("credit-limit"), "{out}");
    let (ok, out) = cli(&["models", "list", "--server", &addr], &[]);
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    let (ok, out) = cli(
        &["trace", "verify", "--server", &addr],
        &[("RISKSERVE_TOKEN", &scorer)],
    );
    assert!(!ok && out.contains("PermissionDenied"), "{out}");
    server.stop().await.unwrap();
}

/// Runs the `riskserve` binary with extra environment; (success, stdout and stderr).
fn cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_riskserve"))
        .args(args)
        .env_remove("RISKSERVE_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A CA, and certificates it signs: the server's for localhost, clients' by common name.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Pki {
            ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// (certificate PEM, key PEM)
    fn issue(&self, common_name: &str, server: bool) -> (String, String) {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_certificate_role_reaches_its_services_only_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("riskserve test CA");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (server_cert, server_key) = pki.issue("riskserve", true);
    let ca_pem = pki.ca.pem();
    let clients = [
        ("scoring-svc", Role::Scorer),
        ("ops-svc", Role::Operator),
        ("audit-svc", Role::Reviewer),
    ];
    let server = TestServer::start_with(riskserve::Config {
        tls: TlsConfig {
            cert: Some(write("server.pem", &server_cert)),
            key: Some(write("server.key", &server_key)),
            client_ca: Some(write("ca.pem", &ca_pem)),
            client_cert_required: false,
        },
        auth: AuthConfig {
            required: None,
            tokens: Vec::new(),
            clients: clients
                .iter()
                .map(|(cn, role)| ClientEntry {
                    common_name: cn.to_string(),
                    roles: vec![*role],
                })
                .collect(),
        },
        ..config(models_v1_v2(), &dir.path().join("data"))
    })
    .await;
    let addr = server.addr;

    let mut n = 1_000;
    for (cn, role) in clients {
        let identity = pki.issue(cn, false);
        let ch = tls_channel(addr, &ca_pem, Some(&identity)).await.unwrap();
        for (service, needs) in SERVICES {
            n += 1;
            let want = if role == needs {
                Code::Ok
            } else {
                Code::PermissionDenied
            };
            assert_eq!(
                call(&ch, service, None, n).await,
                want,
                "{cn} ({role}) calling {service}"
            );
        }
        assert_eq!(call(&ch, "Health", None, 0).await, Code::Ok);
        if role == Role::Reviewer {
            // The scorer's decisions name its certificate.
            let last = TraceClient::new(ch.clone())
                .customer_history(pb::CustomerRef {
                    customer_id: customers()[1_001].id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .records;
            assert_eq!(last.last().unwrap().caller, "cert:scoring-svc");
        }
    }

    // The command line over mutual TLS, with the reviewer's certificate and then the
    // operator's.
    let https = format!("https://127.0.0.1:{}", addr.port());
    let ca_file = dir.path().join("ca.pem");
    for (cn, want) in [("audit-svc", true), ("ops-svc", false)] {
        let (cert, key) = pki.issue(cn, false);
        let (cert_file, key_file) = (
            write(&format!("{cn}.pem"), &cert),
            write(&format!("{cn}.key"), &key),
        );
        let (ok, out) = cli(
            &["trace", "verify", "--server", &https],
            &[
                ("RISKSERVE_CA_CERT", ca_file.to_str().unwrap()),
                ("RISKSERVE_CLIENT_CERT", cert_file.to_str().unwrap()),
                ("RISKSERVE_CLIENT_KEY", key_file.to_str().unwrap()),
            ],
        );
        assert_eq!(ok, want, "{cn}: {out}");
        assert!(want || out.contains("PermissionDenied"), "{out}");
    }

    // A certificate the CA signed for a name nobody configured, and TLS without one.
    let stranger = tls_channel(addr, &ca_pem, Some(&pki.issue("stranger", false)))
        .await
        .unwrap();
    let anonymous = tls_channel(addr, &ca_pem, None).await.unwrap();
    for (service, _) in SERVICES {
        n += 1;
        assert_eq!(
            call(&stranger, service, None, n).await,
            Code::Unauthenticated
        );
        assert_eq!(
            call(&anonymous, service, None, n).await,
            Code::Unauthenticated
        );
    }
    assert_eq!(call(&anonymous, "Health", None, 0).await, Code::Ok);

    // A certificate from another CA never gets through the handshake, nor does plaintext.
    let other = Pki::new("someone else's CA").issue("scoring-svc", false);
    // (Under TLS 1.3 the server refuses the certificate after the client's handshake is done,
    // so the refusal shows on the first call, as a transport failure.)
    if let Ok(ch) = tls_channel(addr, &ca_pem, Some(&other)).await {
        let code = call(&ch, "Scoring", None, n + 1).await;
        assert!(
            matches!(code, Code::Unavailable | Code::Cancelled | Code::Unknown),
            "a foreign certificate got as far as {code:?}"
        );
    }
    let plain = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert_ne!(
            call(&ch, "Health", None, 0).await,
            Code::Ok,
            "plaintext was served"
        );
    }
    server.stop().await.unwrap();
}

#[test]
fn beyond_loopback_plaintext_and_open_access_are_refused_at_start() {
    let public = riskserve::Config {
        listen: "0.0.0.0:0".parse().unwrap(),
        ..riskserve::Config::default()
    };
    let err = public.validate().unwrap_err().to_string();
    assert!(err.contains("beyond loopback needs [tls]"), "{err}");
    let plaintext_allowed = riskserve::Config {
        allow_plaintext: true,
        ..public.clone()
    };
    let err = plaintext_allowed.validate().unwrap_err().to_string();
    assert!(err.contains("auth is required"), "{err}");
    let with_tokens = riskserve::Config {
        auth: token_config(),
        ..plaintext_allowed
    };
    with_tokens.validate().unwrap();
}
