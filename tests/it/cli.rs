//! The `riskserve` program itself: training reproduces the shipped bundle, and the client
//! commands print what a person needs against a running server.

use std::process::Command;

use crate::harness::*;

fn riskserve() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_riskserve"));
    cmd.current_dir(repo());
    cmd
}

fn digest_of(bundle: &std::path::Path) -> String {
    std::fs::read_to_string(bundle.join("bundle.sha256"))
        .unwrap()
        .trim()
        .to_string()
}

/// `riskserve train` on the Taiwan data as the README's command has it (seed 7, the v1
/// schema and exclusions), writing `version` under `models`, with `extra` arguments.
fn train_taiwan(models: &std::path::Path, version: &str, extra: &[&str]) -> std::process::Output {
    riskserve()
        .args([
            "train",
            "--data",
            "data/taiwan_credit_default.csv",
            "--label",
            "DID_DEFAULT_PAYMENT",
            "--model",
            "credit-limit",
            "--version",
            version,
            "--schema",
            "data/taiwan_schema.toml",
            "--exclude",
            "USER_ID",
            "SEX",
            "MARITALSTATUS",
            "--seed",
            "7",
            "--models",
        ])
        .arg(models)
        .args(extra)
        .output()
        .unwrap()
}

/// The README's command retrains models/credit-limit/v1 bit for bit, and a second run
/// (through the library) gives the same digest again.
#[test]
fn training_is_deterministic_and_reproduces_the_shipped_v1() {
    let shipped = digest_of(&repo().join("models/credit-limit/v1"));
    let out = tempfile::tempdir().unwrap();
    let run = train_taiwan(
        out.path(),
        "v1",
        &["--created-at", "2026-11-28T00:00:00Z", "--no-reason-codes"],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("AUC") && stdout.contains(&shipped),
        "{stdout}"
    );
    assert!(
        stdout.contains("reason codes  none (notices use the default wording)"),
        "{stdout}"
    );
    assert_eq!(digest_of(&out.path().join("credit-limit/v1")), shipped);

    let again = tempfile::tempdir().unwrap();
    let report = riskserve::train::train(&v1_spec(again.path()), &mut |_| {}).unwrap();
    assert_eq!(report.digest.to_string(), shipped);
    assert!(report.metrics.auc > 0.7, "AUC {}", report.metrics.auc);

    // Bundles are immutable: training the same version again is refused.
    let err = riskserve::train::train(&v1_spec(again.path()), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("immutable"), "{err}");
}

/// Without `--no-reason-codes` a trained bundle carries the default table, listed in its
/// manifest and covered by its digest; an edited table given with `--reason-codes` replaces
/// it, and one that does not fit the features is refused naming the entry, before anything
/// is written.
#[test]
fn training_writes_a_reason_code_table_and_takes_an_edited_one() {
    let out = tempfile::tempdir().unwrap();
    let train = |version: &str, extra: &[&str]| {
        let mut args = vec!["--created-at", "2026-12-02T00:00:00Z"];
        args.extend_from_slice(extra);
        train_taiwan(out.path(), version, &args)
    };
    let run = train("v2", &[]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("reason codes  reason_codes.toml (21 features)"),
        "{stdout}"
    );
    let dir = out.path().join("credit-limit/v2");
    let manifest = std::fs::read_to_string(dir.join("manifest.toml")).unwrap();
    assert!(
        manifest.contains("reason_codes = \"reason_codes.toml\""),
        "{manifest}"
    );
    let table = std::fs::read_to_string(dir.join("reason_codes.toml")).unwrap();
    assert!(
        table.contains("feature = \"PAYMENTDELAY_1\"\ncode = \"R01\"\ntext = \"Timeliness of your payment last month\""),
        "{table}"
    );
    let bundle = riskserve::bundle::Bundle::load(&dir, None).unwrap();
    assert_eq!(bundle.reason_codes.as_ref().unwrap().reasons.len(), 21);

    // The table edited and given back for the next version.
    let edited = out.path().join("edited.toml");
    std::fs::write(
        &edited,
        table.replace(
            "Timeliness of your payment last month",
            "Your most recent payment was late",
        ),
    )
    .unwrap();
    let run = train("v3", &["--reason-codes", edited.to_str().unwrap()]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let v3 = riskserve::bundle::Bundle::load(&out.path().join("credit-limit/v3"), None).unwrap();
    let codes = v3.reason_codes.unwrap();
    assert_eq!(
        codes.get("PAYMENTDELAY_1").unwrap().text,
        "Your most recent payment was late"
    );

    let bad = out.path().join("bad.toml");
    std::fs::write(&bad, table.replace("\"R12\"", "\"R01\"")).unwrap();
    let run = train("v4", &["--reason-codes", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("code \"R01\" is used for both \"PAYMENTDELAY_1\" and \"BILL_AMT2\""),
        "{stderr}"
    );
    assert!(!out.path().join("credit-limit/v4").exists());
}

#[test]
fn training_refuses_bad_input_with_a_clear_message() {
    let out = tempfile::tempdir().unwrap();
    let run = riskserve()
        .args([
            "train",
            "--data",
            "data/taiwan_credit_default.csv",
            "--label",
            "NO_SUCH",
            "--model",
            "m",
            "--version",
            "v1",
            "--models",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("no column named NO_SUCH"));
}

#[tokio::test]
async fn score_and_models_commands_talk_to_a_running_server() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let addr = server.addr.to_string();
    let run = move |args: &[&str]| {
        let out = riskserve()
            .args(args)
            .args(["--server", &addr])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || {
            run(&[
                "score",
                "--csv",
                "data/taiwan_credit_default.csv",
                "--row",
                "1",
            ])
        }
    })
    .await
    .unwrap();
    assert!(ok, "{stderr}");
    for needle in [
        "decision ",
        "credit-limit v1",
        "sha256:",
        "probability of default",
        "20000 →",
        "PAYMENTDELAY_1",
    ] {
        assert!(stdout.contains(needle), "{needle} in {stdout}");
    }

    let (ok, _, stderr) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || {
            run(&[
                "score",
                "--csv",
                "data/taiwan_credit_default.csv",
                "--row",
                "2",
                "--feature",
                "AGE=abc",
            ])
        }
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("AGE"),
        "{stderr}"
    );

    let (ok, stdout, stderr) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || {
            assert!(run(&["models", "load", "credit-limit", "v2"]).0);
            assert!(run(&["models", "serve", "credit-limit", "v2"]).0);
            run(&["models", "list"])
        }
    })
    .await
    .unwrap();
    assert!(ok, "{stderr}");
    assert!(stdout.contains("credit-limit  (serving: v2)"), "{stdout}");
    assert!(
        stdout.contains("v1") && stdout.contains("ready"),
        "{stdout}"
    );
    server.stop().await.unwrap();
}

/// `riskserve bench` drives the real server through both protocols without an error, and
/// every request it counts was recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_loads_the_server_through_score_and_through_the_inference_protocol() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(models_v1_v2(), data.path()).await;
    let mut counted = 0;
    for protocol in ["score", "v2"] {
        let addr = format!("http://{}", server.addr);
        let mut bench = riskserve();
        bench
            .args(["bench", "--server", &addr, "--protocol", protocol])
            .args(["--duration", "1", "--warmup", "0.2", "--concurrency", "2"]);
        let line: serde_json::Value = serde_json::from_slice(&run_ok(bench).await).unwrap();
        assert_eq!(line["protocol"], protocol);
        assert_eq!(line["errors"], 0, "{line}");
        let requests = line["requests"].as_u64().unwrap();
        assert!(requests > 0, "{line}");
        counted += requests;
    }
    let records = server.records().await;
    // Warm-up requests are recorded but not counted.
    assert!(records >= counted, "{records} records, {counted} counted");
    server.stop().await.unwrap();

    // The stopped server's files alone export every record, as the server would.
    let mut export = riskserve();
    export
        .args(["trace", "--data"])
        .arg(data.path())
        .arg("export");
    let all = String::from_utf8(run_ok(export).await).unwrap();
    assert_eq!(all.lines().count() as u64, records);
    let first: serde_json::Value = serde_json::from_str(all.lines().next().unwrap()).unwrap();
    assert_eq!(first["seq"], 1, "{first}");

    // An export piped into a reader that stops early (`| head -1`) ends quietly with the
    // status a shell gives a command SIGPIPE ended, as Unix tools do: far more than a
    // pipe's buffer of records, and the reader takes a line.
    let mut export = riskserve()
        .args(["trace", "--data"])
        .arg(data.path())
        .args(["export"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(export.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.contains("decision_id"), "{first}");
    let out = export.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
