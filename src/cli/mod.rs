//! The `riskserve` command line: `serve`, `train`, `score`, `models`, `rollout`, `backtest`,
//! `remediate`, `trace`, `report`, `demo` and `bench`.
//!
//! Arguments are parsed by clap into typed structs before any work starts; every command
//! returns `anyhow::Result`, and `main` prints errors with their whole cause chain. Client
//! commands talk to a running server (`--server`, default the local one) through
//! [`connect`]. Each subcommand family has its own file with its arguments beside it; this
//! one only names the commands and dispatches.

pub mod bench;
mod connect;
pub mod demo;
mod models;
mod output;
mod remediate;
mod report;
mod rollout;
mod score;
mod serve;
mod trace;
mod train;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "riskserve",
    version,
    about = "Serve, roll out and audit credit-risk models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve(serve::ServeArgs),
    /// Train a new model version from a CSV file and write its bundle.
    Train(train::TrainArgs),
    /// Import an XGBoost (JSON) or LightGBM (text) model file as a new version's bundle.
    Import(train::ImportArgs),
    /// Score one customer on a running server.
    Score(score::ScoreArgs),
    /// List, show, load, serve or unload model versions on a running server.
    Models(models::ModelsArgs),
    /// Roll a candidate version out in steps, watch its guardrails, promote or roll back.
    Rollout(rollout::RolloutArgs),
    /// Preview what a candidate would do to recently decided customers, before any sees it.
    Backtest(rollout::BacktestArgs),
    /// After a rollback: the customers whose limits the candidate lowered, what the serving
    /// version grants them, and with --apply the recorded decisions that restore them.
    Remediate(remediate::RemediateArgs),
    /// Ask the decision log: a decision, a customer's history, explain, replay, verify.
    Trace(trace::TraceArgs),
    /// Write a rollout's or a customer's history as one self-contained HTML page.
    Report(report::ReportArgs),
    /// The incident end to end on a private server: a flawed version caught and rolled back,
    /// the affected customer traced, a sound version rolled out to everyone.
    Demo(demo::DemoArgs),
    /// Make a bearer token for a caller: prints the token once, and the config entry that
    /// holds only its hash.
    Token(train::TokenArgs),
    /// Closed-loop load generator against a running server; prints one JSON line.
    Bench(bench::BenchArgs),
    /// Fill a data directory's decision log with scored decisions, for lookup benchmarks.
    #[command(hide = true)]
    BenchFillLog(bench::FillLogArgs),
    /// A server whose Score does no work: the ceiling for `bench` on the same machine.
    #[command(hide = true)]
    BenchEmptyServer(bench::EmptyServerArgs),
}

/// Runs the command line and turns errors into a message and exit code 2.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        // Output piped into a reader that stopped early (`trace export | head`): end
        // quietly with the status a shell gives a command SIGPIPE ended (128 + 13), as Unix
        // tools do. SIGPIPE itself stays ignored: a client's gRPC socket writes would raise
        // it too, and a server gone mid-call must be an error message, not a silent death.
        Err(err) if closed_pipe(&err) => ExitCode::from(141),
        Err(err) => {
            eprintln!("riskserve: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Whether writing the output failed because its reader closed the pipe.
fn closed_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        let io = e.downcast_ref::<std::io::Error>().or_else(|| {
            match e.downcast_ref::<csv::Error>().map(csv::Error::kind) {
                Some(csv::ErrorKind::Io(io)) => Some(io),
                _ => None,
            }
        });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve::run(args)),
        Command::Train(args) => train::run(args),
        Command::Import(args) => train::import(args),
        Command::Score(args) => runtime.block_on(score::run(args)),
        Command::Models(args) => runtime.block_on(models::run(args)),
        Command::Rollout(args) => runtime.block_on(rollout::run(args)),
        Command::Backtest(args) => runtime.block_on(rollout::backtest(args)),
        Command::Remediate(args) => runtime.block_on(remediate::run(args)),
        Command::Trace(args) => runtime.block_on(trace::run(args)),
        Command::Report(args) => runtime.block_on(report::run(args)),
        Command::Demo(args) => runtime.block_on(demo::run(args)).map(|_| ExitCode::SUCCESS),
        Command::Token(args) => train::token(args),
        Command::Bench(args) => runtime.block_on(bench::run(args)),
        Command::BenchEmptyServer(args) => runtime.block_on(bench::empty_server(args.listen)),
        Command::BenchFillLog(args) => runtime.block_on(bench::fill_log(
            &args.data,
            args.decisions,
            args.customers,
            &args.bundle,
            &args.csv,
        )),
    }
}
