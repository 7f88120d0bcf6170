//! `riskserve demo`: the incident riskserve exists for, end to end, on a private server.
//!
//! Part of the command line (it uses `anyhow` and prints for people). In a fresh directory it
//! trains v1 on the Taiwan data and serves it in-process on a loopback port, sends a day of
//! traffic, trains a flawed v2 (every customer under 30 relabelled as defaulted, so v2
//! withdraws their limits), shows the backtest flagging it, rolls it out anyway with
//! `skip_backtest` and watches the live guardrail roll it back, traces one customer whose
//! limit v2 withdrew (history, explain, the complaint with its notice, replay, verify),
//! previews and applies the remediation of v2's harm (every customer whose limit it lowered,
//! restored by v1's decision on the limit they had; the traffic's limits follow, as the
//! service that owns limits would) and shows the traced customer's notice and complaint,
//! then trains a sound v3 that passes the backtest gate, rolls out to 100% and is promoted.
//! Reports of both rollouts and of the customer are written to the directory. Everything
//! goes through the public gRPC API, as any client would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio_util::sync::CancellationToken;

use super::connect::{Conn, connect, status_error};
use super::remediate::{fetch as fetch_remediation, print_summary as print_remediation};
use super::rollout::{fetch_backtest, print_backtest, print_rollout};
use super::trace::{self, TraceQuery};
use super::{bench, report};
use crate::config::Config;
use crate::grpc::pb;
use crate::grpc::pb::rollouts_client::RolloutsClient;
use crate::grpc::pb::scoring_client::ScoringClient;
use crate::grpc::pb::trace_client::TraceClient;
use crate::train::{self, TrainSpec};

const MODEL: &str = "credit-limit";
const LABEL: &str = "DID_DEFAULT_PAYMENT";
/// Ids and prohibited bases of discrimination are never features.
const EXCLUDED: [&str; 3] = ["USER_ID", "SEX", "MARITALSTATUS"];
/// The segment v2's flaw hits.
const FLAWED_BELOW_AGE: f64 = 30.0;
const TASKS: usize = 4;
const BATCH: usize = 50;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Where the demo keeps its models, decision log and reports [default: a new directory
    /// under the system's temporary directory]. Kept afterwards.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The Taiwan credit-default CSV.
    #[arg(long, default_value = "data/taiwan_credit_default.csv")]
    pub data: PathBuf,
    /// Its feature schema.
    #[arg(long, default_value = "data/taiwan_schema.toml")]
    pub schema: PathBuf,
    /// How many of its customers send traffic.
    #[arg(long, default_value_t = 30_000)]
    pub customers: usize,
    /// The candidate's share at the first step of each rollout, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub first_step_percent: f64,
    /// Candidate decisions each step needs before it advances; guardrails need a third of it
    /// on each arm before they may breach.
    #[arg(long, default_value_t = 300)]
    pub min_decisions: u64,
    /// Give up on a rollout whose guardrails have not decided after this long.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

/// What the demo showed, for its test.
#[derive(Debug)]
pub struct DemoOutcome {
    pub dir: PathBuf,
    /// The backtest preview of the flawed v2.
    pub preview: pb::BacktestReport,
    /// v2's rollout after the guardrail stopped it.
    pub flawed: pb::RolloutStatus,
    /// The customer whose limit v2 withdrew, and that decision.
    pub customer_id: String,
    pub decision_id: String,
    pub history: Vec<pb::DecisionRecord>,
    pub replay: pb::ReplayResult,
    pub verify: pb::VerifyResult,
    /// Decisions answered to the demo when it verified the chain.
    pub sent_at_verify: u64,
    /// v2's harm after the remediation was applied, and the remediations recorded.
    pub remediation: pb::RemediationSummary,
    pub remediated: Vec<pb::HarmedCustomer>,
    /// The traced customer's complaint once remediated.
    pub complaint: pb::ComplaintAnswer,
    /// v3's rollout after promotion.
    pub sound: pb::RolloutStatus,
    pub serving_after: String,
    pub reports: Vec<PathBuf>,
    pub decisions_sent: u64,
    pub elapsed: Duration,
}

/// Runs the demo; any step that does not go as the story says is an error.
pub async fn run(args: DemoArgs) -> anyhow::Result<DemoOutcome> {
    let started = Instant::now();
    ensure!(
        args.first_step_percent > 0.0 && args.first_step_percent < 100.0,
        "--first-step-percent must be between 0 and 100"
    );
    ensure!(
        args.min_decisions >= 3,
        "--min-decisions must be at least 3"
    );
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("riskserve-demo-{}", uuid::Uuid::now_v7())),
    };
    let models = dir.join("models");
    std::fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
    println!("riskserve demo in {}", dir.display());

    heading("1. v1 serves: trained on the Taiwan data, one day of traffic");
    train_version(&args, &args.data, "v1", 7, &models)?;
    let config = Config {
        listen: ([127, 0, 0, 1], 0).into(),
        models_dir: models.clone(),
        data_dir: dir.join("data"),
        serving: [(MODEL.to_string(), "v1".to_string())].into(),
        rollout_eval_interval_ms: 100,
        rollout_snapshot_interval_ms: 250,
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let server = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let serving = tokio::spawn(crate::serve(
        listener,
        config,
        stop.clone().cancelled_owned(),
    ));
    let result = story(&args, &dir, &server, started).await;
    stop.cancel();
    serving
        .await
        .context("the demo server panicked")?
        .context("the demo server failed")?;
    let outcome = result?;
    println!(
        "\ndone in {:.1} s: {} decisions, all recorded in {}",
        outcome.elapsed.as_secs_f64(),
        outcome.decisions_sent,
        dir.join("data").display()
    );
    Ok(outcome)
}

async fn story(
    args: &DemoArgs,
    dir: &Path,
    server: &str,
    started: Instant,
) -> anyhow::Result<DemoOutcome> {
    let channel = connect(server).await?;
    let v1_dir = dir.join("models").join(MODEL).join("v1");
    let mut customers = bench::requests(&v1_dir, &args.data, MODEL)?;
    customers.truncate(args.customers);
    ensure!(!customers.is_empty(), "--customers must be at least 1");
    let mut traffic = Traffic::new(channel.clone(), customers);
    traffic
        .once(&format!("day 1, {} customers", traffic.customers()))
        .await?;
    println!(
        "  {} decisions by v1, each recorded before it was answered",
        traffic.sent()
    );

    heading("2. v2 is trained with a flaw: every customer under 30 labelled as defaulted");
    let flawed_csv = dir.join("flawed-labels.csv");
    relabel_young(&args.data, &flawed_csv)?;
    train_version(args, &flawed_csv, "v2", 7, &dir.join("models"))?;

    heading("3. The backtest re-scores recorded customers with v2 before any sees it");
    let preview = fetch_backtest(
        server,
        pb::BacktestRequest {
            model: MODEL.into(),
            candidate: "v2".into(),
            ..Default::default()
        },
    )
    .await?;
    print_backtest(&preview);
    ensure!(!preview.passed, "the backtest did not flag the flawed v2");

    heading("4. v2 is rolled out anyway (--skip-backtest); the live guardrails watch");
    let mut rollouts = RolloutsClient::new(channel.clone());
    let plan = plan_toml(args);
    let start = |candidate: &str, skip_backtest| pb::StartRolloutRequest {
        model: MODEL.into(),
        candidate: candidate.into(),
        plan_toml: plan.clone(),
        actor: "demo".into(),
        skip_backtest,
    };
    let flawed = rollouts
        .start(start("v2", true))
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "  rollout {} started: v2 serves {} of customers",
        flawed.id,
        percent(flawed.share_bp)
    );
    let timeout = Duration::from_secs(args.timeout_secs);
    let flawed = traffic
        .until_rollout("v2 at its first step", timeout, |s| s.state != "active")
        .await?;
    println!();
    print_rollout(&flawed);
    ensure!(
        flawed.state == "rolled_back",
        "v2's rollout ended {} instead of being rolled back",
        flawed.state
    );

    heading("5. One customer whose limit v2 withdrew, traced");
    let affected = traffic
        .affected()
        .context("no customer had a limit withdrawn by v2 before the rollback")?;
    println!(
        "  customer {}: limit {} withdrawn by v2 (candidate arm), decision {}\n",
        affected.customer_id, affected.current_limit, affected.decision_id
    );
    for query in [
        TraceQuery::Customer {
            customer_id: affected.customer_id.clone(),
        },
        TraceQuery::Explain {
            decision_id: affected.decision_id.clone(),
        },
        // What support answers the customer: the notice, the version, the rollback.
        TraceQuery::Complaint {
            customer_id: affected.customer_id.clone(),
        },
        TraceQuery::Replay {
            decision_id: affected.decision_id.clone(),
        },
        TraceQuery::Verify,
    ] {
        trace::ask(server, false, query).await?;
        println!();
    }
    let mut trace = TraceClient::new(channel.clone());
    let decision = pb::DecisionRef {
        decision_id: affected.decision_id.clone(),
    };
    let replay = trace
        .replay(decision)
        .await
        .map_err(status_error)?
        .into_inner();
    let verify = trace
        .verify(pb::VerifyRequest::default())
        .await
        .map_err(status_error)?
        .into_inner();
    let sent_at_verify = traffic.sent();
    ensure!(
        replay.identical,
        "the replay differs: {:?}",
        replay.differences
    );

    heading("6. v2's harm undone: every customer whose limit it lowered, restored by v1");
    let request = |apply: bool| pb::RemediateRequest {
        rollout_id: flawed.id.clone(),
        apply,
        reason: if apply {
            "v2 withdrew limits on a flawed label; restored by the serving version".into()
        } else {
            String::new()
        },
        actor: "demo".into(),
        ..Default::default()
    };
    let (_, preview_harm) = fetch_remediation(server, request(false), false).await?;
    print_remediation(&preview_harm, false);
    println!(
        "
  applying:"
    );
    let (remediated, remediation) = fetch_remediation(server, request(true), true).await?;
    let totals = remediation.totals.unwrap_or_default();
    println!(
        "  {} customers remediated ({} restored), {} restored since by a later decision, {} that v1 would lower too",
        totals.remediated, totals.amount_remediated, totals.restored, totals.champion_agrees
    );
    ensure!(
        totals.to_restore == 0,
        "{} customers are still to restore after the remediation",
        totals.to_restore
    );
    ensure!(
        remediation
            .customers
            .iter()
            .any(|h| h.harmful_decision_id == affected.decision_id),
        "the traced customer's withdrawal is not in the remediation"
    );
    // The service that owns limits acts on the applied set; so does the demo's traffic.
    traffic.restore(&remediated);
    println!();
    for query in [
        TraceQuery::Notice {
            decision_id: affected.decision_id.clone(),
        },
        TraceQuery::Complaint {
            customer_id: affected.customer_id.clone(),
        },
    ] {
        trace::ask(server, false, query).await?;
        println!();
    }
    let complaint = trace
        .complaint(pb::CustomerRef {
            customer_id: affected.customer_id.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();

    heading("7. A sound v3 (trained on the true labels) passes the backtest gate and rolls out");
    train_version(args, &args.data, "v3", 11, &dir.join("models"))?;
    let sound = rollouts
        .start(start("v3", false))
        .await
        .map_err(status_error)?
        .into_inner();
    if let Some(b) = &sound.backtest {
        println!(
            "  backtest gate passed on {} customers (PSI {:.3})",
            b.compared, b.psi
        );
    }
    let last = sound.steps.saturating_sub(1);
    let at_full = traffic
        .until_rollout("v3", timeout, |s| s.state != "active" || s.step >= last)
        .await?;
    ensure!(
        at_full.state == "active",
        "v3's rollout ended {} before reaching 100%: {}",
        at_full.state,
        at_full.transitions.last().map_or("", |t| t.reason.as_str())
    );
    let sound = rollouts
        .promote(pb::RolloutRef {
            model: MODEL.into(),
            actor: "demo".into(),
            reason: "guardrails held at every step".into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!();
    print_rollout(&sound);
    let serving_after = crate::grpc::pb::models_client::ModelsClient::new(channel.clone())
        .list_models(pb::ListModelsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .models
        .into_iter()
        .find(|m| m.name == MODEL)
        .map(|m| m.serving_version)
        .unwrap_or_default();
    println!("  {MODEL} now serves {serving_after}");

    heading("8. Reports");
    let reports = vec![
        dir.join("rollout-v2.html"),
        dir.join("rollout-v3.html"),
        dir.join(format!("customer-{}.html", affected.customer_id)),
    ];
    report::rollout(server, &flawed.id, "", &reports[0]).await?;
    report::rollout(server, &sound.id, "", &reports[1]).await?;
    let history = report::customer(server, &affected.customer_id, &reports[2]).await?;
    for r in &reports {
        println!("  {}", r.display());
    }
    println!("  (open them in any browser; they fetch nothing)");
    Ok(DemoOutcome {
        dir: dir.to_owned(),
        preview,
        flawed,
        customer_id: affected.customer_id,
        decision_id: affected.decision_id,
        history,
        replay,
        verify,
        sent_at_verify,
        remediation,
        remediated,
        complaint,
        sound,
        serving_after,
        reports,
        decisions_sent: traffic.sent(),
        elapsed: started.elapsed(),
    })
}

fn heading(text: &str) {
    println!("\n== {text}");
}

fn percent(share_bp: u32) -> String {
    format!("{}%", f64::from(share_bp) / 100.0)
}

/// Steps at the first share, 5%, 25% and 100%, each baking a second; guardrails judge on a
/// third of a step's decisions so that the first step can catch harm.
fn plan_toml(args: &DemoArgs) -> String {
    let first = (args.first_step_percent * 100.0).round().max(1.0) as u32;
    let mut shares: Vec<u32> = vec![first];
    shares.extend([500, 2_500, 10_000].into_iter().filter(|s| *s > first));
    let mut plan = String::from("auto_advance = true\n");
    for share in shares {
        plan.push_str(&format!(
            "[[steps]]\nshare_bp = {share}\nmin_bake_secs = 1\nmin_decisions = {}\n",
            args.min_decisions
        ));
    }
    // Any retrain moves a few customers across the decline boundary, and on the candidate arm
    // those whose current limit v1 granted show as withdrawals: a sound v3 withdraws about 2%
    // more, right at the default threshold. The flaw withdraws over 40%; 5% tells them apart.
    plan.push_str(&format!(
        "[guardrails]\nmin_sample = {}\nmax_withdrawal_rate_diff = 0.05\n",
        (args.min_decisions / 3).max(1)
    ));
    plan
}

fn train_version(
    args: &DemoArgs,
    data: &Path,
    version: &str,
    seed: u64,
    models: &Path,
) -> anyhow::Result<()> {
    let spec = TrainSpec {
        data: data.to_owned(),
        label: LABEL.into(),
        model: MODEL.into(),
        version: version.into(),
        exclude: EXCLUDED.iter().map(|s| s.to_string()).collect(),
        holdout: 0.2,
        seed,
        schema: Some(args.schema.clone()),
        policy: None,
        models_dir: models.to_owned(),
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        reason_codes: train::ReasonCodesFrom::Default,
    };
    let report = train::train(&spec, &mut |_| {}).with_context(|| format!("training {version}"))?;
    println!(
        "  trained {MODEL} {version}: AUC {:.3} on {} holdout rows, {}",
        report.metrics.auc, report.metrics.holdout_rows, report.digest
    );
    Ok(())
}

/// Copies the CSV with every customer under 30 labelled as defaulted: the flaw.
fn relabel_young(data: &Path, out: &Path) -> anyhow::Result<()> {
    let mut reader =
        csv::Reader::from_path(data).with_context(|| format!("opening {}", data.display()))?;
    let headers = reader.headers()?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("{} has no {name} column", data.display()))
    };
    let (age, label) = (col("AGE")?, col(LABEL)?);
    let mut writer =
        csv::Writer::from_path(out).with_context(|| format!("writing {}", out.display()))?;
    writer.write_record(&headers)?;
    for record in reader.records() {
        let record = record?;
        let young = record[age]
            .parse::<f64>()
            .is_ok_and(|a| a < FLAWED_BELOW_AGE);
        let row: Vec<&str> = (0..record.len())
            .map(|i| if i == label && young { "1" } else { &record[i] })
            .collect();
        writer.write_record(&row)?;
    }
    writer.flush()?;
    Ok(())
}

/// A decision by the candidate that withdrew a customer's limit.
#[derive(Debug, Clone)]
struct Affected {
    customer_id: String,
    decision_id: String,
    current_limit: i64,
}

/// Customers sending requests from a few concurrent tasks, each with the limit it was last
/// granted as its current limit.
struct Traffic {
    channel: Conn,
    /// One share of the customers per task, handed to the task while it runs.
    shares: Vec<Vec<pb::ScoreRequest>>,
    sent: Arc<AtomicU64>,
    affected: Arc<Mutex<Option<Affected>>>,
    /// Each candidate decision that lowered a limit, to its customer id: what the service
    /// that owns limits knows when a remediation names the decision it undoes.
    lowered: Arc<Mutex<HashMap<String, String>>>,
}

impl Traffic {
    fn new(channel: Conn, customers: Vec<pb::ScoreRequest>) -> Traffic {
        let mut shares = vec![Vec::new(); TASKS];
        for (i, c) in customers.into_iter().enumerate() {
            shares[i % TASKS].push(c);
        }
        Traffic {
            channel,
            shares,
            sent: Arc::default(),
            affected: Arc::default(),
            lowered: Arc::default(),
        }
    }

    /// Takes the remediated limits as the customers' current limits, as the service that
    /// owns limits does with the applied set.
    fn restore(&mut self, remediated: &[pb::HarmedCustomer]) {
        let lowered = self.lowered.lock().expect("not poisoned");
        let limits: HashMap<&str, i64> = remediated
            .iter()
            .filter_map(|h| {
                let customer = lowered.get(&h.harmful_decision_id)?;
                Some((customer.as_str(), h.champion_limit))
            })
            .collect();
        for request in self.shares.iter_mut().flatten() {
            if let Some(limit) = limits.get(request.customer_id.as_str()) {
                request.current_limit = Some(*limit);
            }
        }
    }

    fn customers(&self) -> usize {
        self.shares.iter().map(Vec::len).sum()
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn affected(&self) -> Option<Affected> {
        self.affected.lock().expect("not poisoned").clone()
    }

    /// Sends one request for every customer.
    async fn once(&mut self, label: &str) -> anyhow::Result<()> {
        let bar = bar(label, Some(self.customers() as u64));
        self.drive(&bar, Some(1), || async { None }, || false)
            .await?;
        bar.finish();
        Ok(())
    }

    /// Sends traffic until the model's rollout status satisfies `done`, or `timeout` passes.
    async fn until_rollout(
        &mut self,
        label: &str,
        timeout: Duration,
        done: impl Fn(&pb::RolloutStatus) -> bool,
    ) -> anyhow::Result<pb::RolloutStatus> {
        let bar = bar(label, None);
        let deadline = Instant::now() + timeout;
        let latest: Arc<Mutex<Option<pb::RolloutStatus>>> = Arc::default();
        let client = RolloutsClient::new(self.channel.clone());
        let seen = latest.clone();
        let watch = move || {
            let (mut client, seen) = (client.clone(), seen.clone());
            async move {
                let s = client
                    .status(pb::RolloutRef {
                        model: MODEL.into(),
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner();
                let line = format!(
                    "{} at {} ({}), step {}/{}, {} candidate decisions",
                    s.state,
                    percent(s.share_bp),
                    s.candidate,
                    s.step + 1,
                    s.steps,
                    s.candidate_decisions
                );
                *seen.lock().expect("not poisoned") = Some(s);
                Some(line)
            }
        };
        let finished = || {
            latest
                .lock()
                .expect("not poisoned")
                .as_ref()
                .is_some_and(&done)
                || Instant::now() > deadline
        };
        self.drive(&bar, None, watch, finished).await?;
        bar.finish();
        let last = latest.lock().expect("not poisoned").take();
        match last {
            Some(s) if done(&s) => Ok(s),
            _ => bail!("{label}: the rollout did not get there within {timeout:?}"),
        }
    }

    /// Runs the tasks for `passes` over the customers (or without end); every 100 ms `watch`
    /// gives the bar's message and `stop` may end the run early.
    async fn drive<W, F>(
        &mut self,
        bar: &indicatif::ProgressBar,
        passes: Option<u64>,
        watch: W,
        stop: impl Fn() -> bool,
    ) -> anyhow::Result<()>
    where
        W: Fn() -> F,
        F: std::future::Future<Output = Option<String>>,
    {
        let halt = Arc::new(AtomicBool::new(false));
        let from = self.sent();
        let mut tasks = Vec::new();
        for share in std::mem::take(&mut self.shares) {
            let sender = Sender {
                client: ScoringClient::new(self.channel.clone()),
                halt: halt.clone(),
                sent: self.sent.clone(),
                affected: self.affected.clone(),
                lowered: self.lowered.clone(),
            };
            tasks.push(tokio::spawn(sender.run(share, passes)));
        }
        while !tasks.iter().all(|t| t.is_finished()) && !stop() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            bar.set_position(self.sent() - from);
            if let Some(message) = watch().await {
                bar.set_message(message);
            }
        }
        bar.set_position(self.sent() - from);
        halt.store(true, Ordering::Relaxed);
        for task in tasks {
            self.shares
                .push(task.await.context("a traffic task panicked")??);
        }
        Ok(())
    }
}

fn bar(label: &str, len: Option<u64>) -> indicatif::ProgressBar {
    let (bar, template) = match len {
        Some(n) => (
            indicatif::ProgressBar::new(n),
            "  {prefix:<28} [{bar:30}] {pos}/{len} decisions {msg}",
        ),
        None => (
            indicatif::ProgressBar::new_spinner(),
            "  {prefix:<28} {spinner} {pos} decisions: {msg}",
        ),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// One traffic task.
struct Sender {
    client: ScoringClient<Conn>,
    /// Set to stop every task; a task that fails sets it too.
    halt: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    affected: Arc<Mutex<Option<Affected>>>,
    lowered: Arc<Mutex<HashMap<String, String>>>,
}

impl Sender {
    /// Sends `share` in batches, `passes` times or until halted; returns the customers with
    /// the limits they were last granted.
    async fn run(
        mut self,
        mut share: Vec<pb::ScoreRequest>,
        passes: Option<u64>,
    ) -> anyhow::Result<Vec<pb::ScoreRequest>> {
        let mut done = 0;
        while passes.is_none_or(|p| done < p) && !self.halt.load(Ordering::Relaxed) {
            for chunk in share.chunks_mut(BATCH) {
                if self.halt.load(Ordering::Relaxed) {
                    break;
                }
                if let Err(e) = self.batch(chunk).await {
                    self.halt.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
            done += 1;
        }
        Ok(share)
    }

    async fn batch(&mut self, chunk: &mut [pb::ScoreRequest]) -> anyhow::Result<()> {
        let items = self
            .client
            .score_batch(pb::ScoreBatchRequest {
                requests: chunk
                    .iter()
                    .map(|r| pb::ScoreRequest {
                        request_id: uuid::Uuid::now_v7().to_string(),
                        ..r.clone()
                    })
                    .collect(),
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .items;
        ensure!(
            items.len() == chunk.len(),
            "a batch answer of the wrong length"
        );
        for (request, item) in chunk.iter_mut().zip(items) {
            let response = match item.outcome {
                Some(pb::score_batch_item::Outcome::Response(r)) => r,
                Some(pb::score_batch_item::Outcome::Error(e)) => {
                    bail!("customer {} refused: {}", request.customer_id, e.message)
                }
                None => bail!("an empty batch item"),
            };
            let candidate = response.arm == pb::Arm::Candidate as i32;
            if candidate
                && response
                    .current_limit
                    .is_some_and(|c| response.granted_limit < c)
            {
                self.lowered
                    .lock()
                    .expect("not poisoned")
                    .insert(response.decision_id.clone(), request.customer_id.clone());
            }
            let withdrawn = candidate
                && response.granted_limit == 0
                && response.current_limit.is_some_and(|c| c > 0);
            if withdrawn {
                self.affected
                    .lock()
                    .expect("not poisoned")
                    .get_or_insert_with(|| Affected {
                        customer_id: request.customer_id.clone(),
                        decision_id: response.decision_id.clone(),
                        current_limit: response.current_limit.unwrap_or_default(),
                    });
            }
            request.current_limit = Some(response.granted_limit);
        }
        self.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_starts_at_the_first_share_and_ends_at_everyone() {
        let args = DemoArgs {
            dir: None,
            data: PathBuf::new(),
            schema: PathBuf::new(),
            customers: 1,
            first_step_percent: 10.0,
            min_decisions: 90,
            timeout_secs: 1,
        };
        let plan: crate::rollout::Plan = toml::from_str(&plan_toml(&args)).unwrap();
        plan.check().unwrap();
        let shares: Vec<u32> = plan.steps.iter().map(|s| s.share_bp).collect();
        assert_eq!(shares, [1_000, 2_500, 10_000]);
        assert_eq!(plan.guardrails.min_sample, 30);
    }
}
