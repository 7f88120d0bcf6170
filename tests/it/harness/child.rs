//! The `riskserve` program as a child process: `ChildServer` serving on port 0 with its
//! stderr collected to a log, and `run_ok` for the client commands.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::fixtures::repo;

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
        let channel = match Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            Ok(channel) => channel,
            Err(e) => {
                // Most likely it stopped as it started: its log says why.
                let _ = child.wait();
                panic!(
                    "connecting to {addr}: {e}; the server's log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            }
        };
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
            if start.elapsed() > Duration::from_secs(10) {
                // The log's end, since a failed test removes its directory.
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let lines: Vec<_> = log.lines().rev().take(20).collect();
                panic!(
                    "health {service:?} never became {want}; the end of {}:\n{}",
                    self.log.display(),
                    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

/// A test that fails midway must not leave its server running.
impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
