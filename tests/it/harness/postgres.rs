//! A real PostgreSQL server for the tests that share state through one: Debian's
//! PostgreSQL 15 binaries, a cluster made with `initdb` in a scratch directory, `postgres`
//! on a loopback port: one shared by the test process, removed when it ends, or one of a
//! test's own, which it may stop and restart.
//!
//! PostgreSQL refuses to run as root, so under root the cluster belongs to `nobody`. The
//! server runs under a small shell supervisor that holds a pipe from this process: when the
//! test process ends, however it ends, the pipe closes, and the supervisor stops the server
//! (immediate shutdown) and removes the directory.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where Debian puts PostgreSQL 15's server binaries; `RISKSERVE_PG_BIN` overrides it.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The superuser the cluster is made with (trust authentication on loopback only).
pub const PG_USER: &str = "riskserve";

/// A PostgreSQL server.
pub struct Postgres {
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
    /// The supervisor's stdin: dropped only when the process exits.
    supervisor: Mutex<Child>,
    databases: AtomicUsize,
}

impl Postgres {
    /// The process's server, started on first use.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(Postgres::own)
    }

    /// A server of the caller's own, removed when it is dropped.
    pub fn own() -> Postgres {
        Postgres::start().expect("starting PostgreSQL for the tests")
    }

    fn start() -> Result<Postgres, String> {
        let bin = PathBuf::from(std::env::var("RISKSERVE_PG_BIN").unwrap_or(PG_BIN.into()));
        if !bin.join("postgres").exists() {
            return Err(format!(
                "no PostgreSQL server binaries at {} (set RISKSERVE_PG_BIN)",
                bin.display()
            ));
        }
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "riskserve-pg-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = if root {
            // `nobody` owns the cluster: initdb and postgres refuse root.
            let c = std::ffi::CString::new(dir.to_str().expect("utf-8 temp dir")).unwrap();
            // SAFETY: a valid C string; chown has no memory effects.
            if unsafe { libc::chown(c.as_ptr(), 65534, 65534) } != 0 {
                return Err(format!(
                    "chown {}: {}",
                    dir.display(),
                    std::io::Error::last_os_error()
                ));
            }
            "setpriv --reuid=65534 --regid=65534 --clear-groups"
        } else {
            ""
        };
        let port = free_port()?;
        // The supervisor: initdb, postgres in the background, then wait for stdin to close.
        let script = format!(
            r#"set -e
dir="$1"; bin="$2"; port="$3"
{run_as} "$bin/initdb" -D "$dir/data" -U {PG_USER} --auth=trust -E UTF8 --no-locale -N >"$dir/initdb.log" 2>&1
{run_as} "$bin/postgres" -D "$dir/data" -p "$port" -k "$dir" \
  -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=64MB \
  -c log_min_messages=warning >"$dir/server.log" 2>&1 &
pid=$!
echo "started $pid"
set +e
cat >/dev/null
# pg_ctl finds whichever postmaster runs now (a test may have restarted it).
{run_as} "$bin/pg_ctl" -D "$dir/data" stop -m immediate -w >/dev/null 2>&1
kill -QUIT "$pid" 2>/dev/null
rm -rf "$dir"
"#
        );
        let mut supervisor = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("supervisor")
            .arg(&dir)
            .arg(&bin)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting the PostgreSQL supervisor: {e}"))?;
        let mut line = String::new();
        BufReader::new(supervisor.stdout.take().expect("piped"))
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if !line.starts_with("started") {
            let log = std::fs::read_to_string(dir.join("initdb.log")).unwrap_or_default();
            return Err(format!("initdb failed:\n{log}"));
        }
        let pg = Postgres {
            bin,
            port,
            dir,
            supervisor: Mutex::new(supervisor),
            databases: AtomicUsize::new(0),
        };
        pg.wait_ready(Duration::from_secs(30))?;
        Ok(pg)
    }

    /// Runs a psql command against `db` and returns its output (tuples only, unaligned).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                PG_USER,
            ])
            .args(["-d", db, "-c", sql])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    fn wait_ready(&self, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            match self.psql("postgres", "SELECT 1") {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() > limit => {
                    let log =
                        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                    return Err(format!("PostgreSQL did not come up: {e}\n{log}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// A new, empty database of its own, as a `postgres://` URL for `--store`.
    pub fn database(&self, tag: &str) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("{tag}_{n}").replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .expect("creating a test database");
        self.url(&name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Stops the server as a crash would (immediate shutdown), keeping its files.
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    }

    /// Starts it again after [`Postgres::stop`].
    pub fn restart(&self) {
        self.pg_ctl(&[
            "start",
            "-w",
            "-o",
            &format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
                self.port,
                self.dir.display()
            ),
            "-l",
            // A file of the cluster's owner (server.log is the supervisor's).
            &self
                .dir
                .join("data")
                .join("restarted.log")
                .display()
                .to_string(),
        ]);
        self.wait_ready(Duration::from_secs(30))
            .expect("PostgreSQL back up");
    }

    fn pg_ctl(&self, args: &[&str]) {
        let _held = self.supervisor.lock().expect("supervisor");
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.dir.join("data");
        // SAFETY: geteuid has no preconditions.
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&pg_ctl);
            c
        } else {
            Command::new(&pg_ctl)
        };
        let status = cmd
            .arg("-D")
            .arg(&data)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl");
        assert!(status.success(), "pg_ctl {args:?} failed");
    }
}

/// Closing the supervisor's stdin makes it stop the server and remove its files.
impl Drop for Postgres {
    fn drop(&mut self) {
        // A test that panicked under the lock still gets its server removed.
        let supervisor = self
            .supervisor
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        drop(supervisor.stdin.take());
        let _ = supervisor.wait();
    }
}

/// A port nothing listens on now (the kernel's choice for an ephemeral bind).
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}
