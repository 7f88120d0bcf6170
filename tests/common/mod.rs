//! Shared helpers for the integration tests: a real server on an ephemeral port, model
//! directories with trained versions, Taiwan customers, and an independent PD computation.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use riskserve::Config;
use riskserve::grpc::pb::models_client::ModelsClient;
use riskserve::grpc::pb::scoring_client::ScoringClient;
use riskserve::grpc::pb::trace_client::TraceClient;
use riskserve::grpc::{pb, v2};
use riskserve::server::ServeError;
use riskserve::train::{self, TrainSpec};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

pub const MODEL: &str = "credit-limit";

/// The field a refusal names in its BadRequest details (panics if it names none).
pub fn violation_field(status: &tonic::Status) -> String {
    use tonic_types::StatusExt as _;
    let details = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no field violation in {status:?}"));
    details.field_violations[0].field.clone()
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn taiwan_csv() -> PathBuf {
    repo().join("data/taiwan_credit_default.csv")
}

/// The tests' server configuration: 127.0.0.1:0, these models with v1 pinned to serve
/// (otherwise the highest version would), state in `data`.
pub fn config(models_dir: &Path, data: &Path) -> Config {
    Config {
        serving: [(MODEL.to_string(), "v1".to_string())].into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        models_dir: models_dir.to_owned(),
        data_dir: data.to_owned(),
        watch_interval_ms: 100,
        grace_period_secs: 5,
        ..Config::default()
    }
}

/// A running server and what it was started with.
pub struct TestServer {
    pub addr: SocketAddr,
    pub channel: Channel,
    pub config: Config,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), ServeError>>,
}

impl TestServer {
    /// Starts riskserve on 127.0.0.1:0 with these models, state in `data`, and v1 pinned to
    /// serve (otherwise the highest version would).
    pub async fn start(models_dir: &Path, data: &Path) -> TestServer {
        TestServer::start_with(config(models_dir, data)).await
    }

    pub async fn start_with(config: Config) -> TestServer {
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(riskserve::serve(listener, config.clone(), async {
            let _ = rx.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        // serve() loads bundles before it accepts; wait until it answers.
        let mut models = ModelsClient::new(channel.clone());
        for _ in 0..200 {
            if models.list_models(pb::ListModelsRequest {}).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        TestServer {
            addr,
            channel,
            config,
            shutdown: Some(tx),
            handle,
        }
    }

    pub fn scoring(&self) -> ScoringClient<Channel> {
        ScoringClient::new(self.channel.clone())
    }

    pub fn models(&self) -> ModelsClient<Channel> {
        ModelsClient::new(self.channel.clone())
    }

    /// How many decisions the log holds, once its chain has verified.
    pub async fn records(&self) -> u64 {
        let verified = self
            .trace()
            .verify(pb::VerifyRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(verified.ok, "the decision log verifies");
        verified.records
    }

    pub fn trace(&self) -> TraceClient<Channel> {
        TraceClient::new(self.channel.clone())
    }

    /// Signals shutdown and waits for serve() to return.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.handle).await.unwrap()
    }
}

/// Copies a flat directory tree (bundles are flat: model/version/files).
/// Copies a bundle directory with one text of its manifest replaced (its name or version),
/// not yet sealed.
pub fn copy_bundle(from: &Path, to: &Path, (old, new): (&str, &str)) {
    copy_dir(from, to);
    let manifest = std::fs::read_to_string(to.join("manifest.toml")).unwrap();
    std::fs::write(to.join("manifest.toml"), manifest.replace(old, new)).unwrap();
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// The training run that reproduces the shipped v1 (the command in the README).
pub fn v1_spec(models_dir: &Path) -> TrainSpec {
    TrainSpec {
        data: taiwan_csv(),
        label: "DID_DEFAULT_PAYMENT".into(),
        model: MODEL.into(),
        version: "v1".into(),
        exclude: vec!["USER_ID".into(), "SEX".into(), "MARITALSTATUS".into()],
        holdout: 0.2,
        seed: 7,
        schema: Some(repo().join("data/taiwan_schema.toml")),
        policy: None,
        models_dir: models_dir.to_owned(),
        created_at: "2026-11-28T00:00:00Z".into(),
    }
}

/// A bundle directory holding the shipped v1 and a v2 trained here on another seed and
/// holdout (so its coefficients and digest differ). Trained once per test binary.
pub fn models_v1_v2() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&repo().join("models"), dir.path());
        let spec = TrainSpec {
            version: "v2".into(),
            seed: 11,
            holdout: 0.3,
            ..v1_spec(dir.path())
        };
        train::train(&spec, &mut |_| {}).expect("training v2");
        dir
    })
    .path()
}

/// A fresh copy of `models_v1_v2()` that a test may change.
pub fn scratch_models() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(models_v1_v2(), dir.path());
    dir
}

/// One Taiwan customer, as the CSV has it.
#[derive(Debug, Clone)]
pub struct Customer {
    pub id: String,
    pub limit: i64,
    pub values: BTreeMap<String, f64>,
}

pub fn customers() -> &'static [Customer] {
    static ROWS: OnceLock<Vec<Customer>> = OnceLock::new();
    ROWS.get_or_init(|| {
        let mut reader = csv::Reader::from_path(taiwan_csv()).unwrap();
        let headers = reader.headers().unwrap().clone();
        reader
            .records()
            .map(|r| {
                let r = r.unwrap();
                let values: BTreeMap<String, f64> = headers
                    .iter()
                    .zip(r.iter())
                    .map(|(h, v)| (h.to_string(), v.parse().unwrap()))
                    .collect();
                Customer {
                    id: format!("{}", values["USER_ID"] as i64),
                    limit: values["CREDIT_LIMIT"] as i64,
                    values,
                }
            })
            .collect()
    })
}

/// The features the v1 schema scores (read from the shipped manifest).
pub fn schema_features() -> Vec<String> {
    let text =
        std::fs::read_to_string(repo().join("models/credit-limit/v1/parameters.toml")).unwrap();
    let params: toml::Value = toml::from_str(&text).unwrap();
    params["feature"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

pub fn number(x: f64) -> pb::FeatureValue {
    pb::FeatureValue {
        kind: Some(pb::feature_value::Kind::Number(x)),
    }
}

/// A valid Score request for a customer.
pub fn request(c: &Customer, request_id: &str) -> pb::ScoreRequest {
    let features = schema_features()
        .into_iter()
        .map(|name| {
            let v = c.values[&name];
            (name, number(v))
        })
        .collect();
    pb::ScoreRequest {
        request_id: request_id.into(),
        customer_id: c.id.clone(),
        model: MODEL.into(),
        features,
        current_limit: Some(c.limit),
    }
}

/// Runs `cmd` on a blocking thread (the server under test keeps the runtime) and returns its
/// stdout, failing the test with its stderr if it fails.
pub async fn run_ok(mut cmd: Command) -> Vec<u8> {
    let shown = format!("{cmd:?}");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{shown} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Score's answers for these customers, one call each (request ids `score-<i>`).
pub async fn score_each(server: &TestServer, customers: &[Customer]) -> Vec<pb::ScoreResponse> {
    let mut scoring = server.scoring();
    let mut answers = Vec::with_capacity(customers.len());
    for (i, c) in customers.iter().enumerate() {
        let r = scoring.score(request(c, &format!("score-{i}"))).await;
        answers.push(r.unwrap().into_inner());
    }
    answers
}

/// A ModelInfer request (inference protocol) for these customers: their features as one FP64
/// tensor in schema order (raw little-endian contents), ids and current limits as parameters.
pub fn infer_request(customers: &[Customer], id: &str) -> v2::ModelInferRequest {
    use v2::infer_parameter::ParameterChoice;
    let columns = schema_features();
    let raw: Vec<u8> = customers
        .iter()
        .flat_map(|c| columns.iter().map(|name| c.values[name]))
        .flat_map(f64::to_le_bytes)
        .collect();
    let ids: Vec<&str> = customers.iter().map(|c| c.id.as_str()).collect();
    let limits: Vec<i64> = customers.iter().map(|c| c.limit).collect();
    let param = |json: String| v2::InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(json)),
    };
    v2::ModelInferRequest {
        model_name: MODEL.into(),
        id: id.into(),
        parameters: [
            (
                "customer_ids".to_string(),
                param(serde_json::to_string(&ids).unwrap()),
            ),
            (
                "current_limits".to_string(),
                param(serde_json::to_string(&limits).unwrap()),
            ),
        ]
        .into(),
        inputs: vec![v2::model_infer_request::InferInputTensor {
            name: "features".into(),
            datatype: "FP64".into(),
            shape: vec![customers.len() as i64, columns.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

/// The outputs of a ModelInfer response by name: FP64 and INT64 as numbers, BYTES as strings.
#[derive(Debug, Default)]
pub struct InferOutputs {
    pub numbers: BTreeMap<String, Vec<f64>>,
    pub integers: BTreeMap<String, Vec<i64>>,
    pub strings: BTreeMap<String, Vec<String>>,
}

/// Decodes a ModelInfer response's raw output contents, independently of the server's code.
pub fn infer_outputs(r: &v2::ModelInferResponse) -> InferOutputs {
    let mut out = InferOutputs::default();
    assert_eq!(r.outputs.len(), r.raw_output_contents.len());
    for (tensor, raw) in r.outputs.iter().zip(&r.raw_output_contents) {
        let eight = |b: &[u8]| -> [u8; 8] { b.try_into().unwrap() };
        match tensor.datatype.as_str() {
            "FP64" => {
                let v = raw
                    .chunks(8)
                    .map(|b| f64::from_le_bytes(eight(b)))
                    .collect();
                out.numbers.insert(tensor.name.clone(), v);
            }
            "INT64" => {
                let v = raw
                    .chunks(8)
                    .map(|b| i64::from_le_bytes(eight(b)))
                    .collect();
                out.integers.insert(tensor.name.clone(), v);
            }
            "BYTES" => {
                let (mut v, mut rest) = (Vec::new(), raw.as_slice());
                while !rest.is_empty() {
                    let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
                    v.push(String::from_utf8(rest[4..4 + len].to_vec()).unwrap());
                    rest = &rest[4 + len..];
                }
                out.strings.insert(tensor.name.clone(), v);
            }
            other => panic!("unexpected datatype {other}"),
        }
        let n = tensor.shape[0] as usize;
        let len = out
            .numbers
            .get(&tensor.name)
            .map(Vec::len)
            .or(out.integers.get(&tensor.name).map(Vec::len))
            .or(out.strings.get(&tensor.name).map(Vec::len));
        assert_eq!(len, Some(n), "{} has its shape's length", tensor.name);
    }
    out
}

/// What a bundle's parameters.toml says, parsed here independently of riskserve's types.
pub struct Offline {
    pub digest: String,
    intercept: f64,
    terms: Vec<(String, f64, f64, f64)>,
}

impl Offline {
    pub fn read(bundle_dir: &Path) -> Offline {
        let text = std::fs::read_to_string(bundle_dir.join("parameters.toml")).unwrap();
        let p: toml::Value = toml::from_str(&text).unwrap();
        let terms = p["feature"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["name"].as_str().unwrap().to_string(),
                    f["mean"].as_float().unwrap(),
                    f["scale"].as_float().unwrap(),
                    f["coefficient"].as_float().unwrap(),
                )
            })
            .collect();
        let digest = std::fs::read_to_string(bundle_dir.join("bundle.sha256"))
            .unwrap()
            .trim()
            .to_string();
        Offline {
            digest,
            intercept: p["intercept"].as_float().unwrap(),
            terms,
        }
    }

    /// Each feature's term in the log-odds, in the bundle's order.
    pub fn contributions(&self, values: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
        self.terms
            .iter()
            .map(|(name, mean, scale, coef)| (name.clone(), coef * ((values[name] - mean) / scale)))
            .collect()
    }

    pub fn pd(&self, values: &BTreeMap<String, f64>) -> f64 {
        let logit = self.intercept
            + self
                .contributions(values)
                .iter()
                .map(|(_, c)| c)
                .sum::<f64>();
        1.0 / (1.0 + (-logit).exp())
    }
}

/// A riskserve process.
pub struct ChildServer {
    child: Child,
    pub channel: Channel,
    log: PathBuf,
}

impl ChildServer {
    /// Starts `riskserve serve` on port 0 and waits until it is ready. Its stderr goes through
    /// a pipe (as to a log collector) and is appended to `log` by this process, so that a
    /// file-size limit set on the server does not apply to its logs.
    pub async fn start(data: &Path, log: &Path) -> ChildServer {
        ChildServer::start_with(&repo().join("models"), data, log).await
    }

    /// The same, with another models directory.
    pub async fn start_with(models: &Path, data: &Path, log: &Path) -> ChildServer {
        ChildServer::start_with_env(models, data, log, &[]).await
    }

    /// The same, with these environment variables set for the server.
    pub async fn start_with_env(
        models: &Path,
        data: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> ChildServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_riskserve"))
            .args(["serve", "--listen", "127.0.0.1:0", "--models"])
            .arg(models)
            .arg("--data")
            .arg(data)
            .env("RISKSERVE_LOG", "debug")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let mut sink = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut sink));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .expect(&line)
            .to_string();
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let server = ChildServer {
            child,
            channel,
            log: log.to_owned(),
        };
        server.wait_health("", true).await;
        server
    }

    pub async fn serving(&self, service: &str) -> bool {
        HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .is_ok_and(|r| r.into_inner().status == 1)
    }

    pub async fn wait_health(&self, service: &str, want: bool) {
        let start = Instant::now();
        while self.serving(service).await != want {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "health {service:?} never became {want}; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

/// A copy of v1 whose AGE coefficient makes young customers look like defaulters: a
/// candidate that would withdraw the limits of a large segment.
pub fn flawed_candidate(models: &Path) {
    let dir = models.join(MODEL).join("v9");
    copy_bundle(
        &models.join(MODEL).join("v1"),
        &dir,
        ("version = \"v1\"", "version = \"v9\""),
    );
    let params = std::fs::read_to_string(dir.join("parameters.toml")).unwrap();
    let at = params.find("name = \"AGE\"").unwrap();
    let coef = at + params[at..].find("coefficient = ").unwrap() + "coefficient = ".len();
    let end = coef + params[coef..].find('\n').unwrap();
    std::fs::write(
        dir.join("parameters.toml"),
        format!("{}-4.0{}", &params[..coef], &params[end..]),
    )
    .unwrap();
    riskserve::bundle::seal(&dir).unwrap();
}
