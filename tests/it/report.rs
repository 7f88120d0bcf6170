//! Reports: a real rollout on a real server, rolled back by its guardrail, rendered by the
//! `riskserve report` command into pages that fetch nothing and that a browser draws.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{MODEL, TestServer, customers, flawed_candidate, request, scratch_models};
use riskserve::grpc::pb;
use riskserve::grpc::pb::rollouts_client::RolloutsClient;

const PLAN: &str = r#"
auto_advance = true
[[steps]]
share_bp = 1000
min_bake_secs = 0
min_decisions = 100000
[[steps]]
share_bp = 10000
min_bake_secs = 0
min_decisions = 100
[guardrails]
min_sample = 60
"#;

/// Runs `riskserve` with these arguments; panics with its output unless it succeeds.
fn riskserve(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_riskserve"))
        .args(args)
        .output()
        .expect("running riskserve");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "riskserve {args:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A page must carry everything it shows: no address of anything to fetch.
fn assert_self_contained(page: &str) {
    for external in [
        "http://", "https://", "//", "src=", "href=", "url(", "@import",
    ] {
        // "//" appears in nothing but addresses; the pages' CSS has no comments.
        let hit = page.match_indices(external).next();
        assert!(
            hit.is_none(),
            "the page refers to something outside it ({external:?}) near: {}",
            &page[hit.unwrap().0.saturating_sub(60)..(hit.unwrap().0 + 60).min(page.len())]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_and_customer_reports_are_self_contained_charts_a_browser_draws() {
    let models = scratch_models();
    flawed_candidate(models.path());
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(riskserve::Config {
        serving: [(MODEL.to_string(), "v1".to_string())].into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        models_dir: models.path().to_owned(),
        data_dir: data.path().to_owned(),
        rollout_eval_interval_ms: 20,
        rollout_snapshot_interval_ms: 100,
        ..riskserve::Config::default()
    })
    .await;
    let addr = format!("http://{}", server.addr);

    // Day one on v1, then the flawed v9 at 10% until its guardrail rolls it back.
    let all = customers();
    let mut scoring = server.scoring();
    let batch = |tag: String, from: usize| {
        let requests: Vec<_> = (from..from + 500)
            .map(|i| request(&all[i % all.len()], &format!("{tag}-{i}")))
            .collect();
        pb::ScoreBatchRequest { requests }
    };
    scoring.score_batch(batch("day1".into(), 0)).await.unwrap();
    let mut rollouts = RolloutsClient::new(server.channel.clone());
    let started = rollouts
        .start(pb::StartRolloutRequest {
            model: MODEL.into(),
            candidate: "v9".into(),
            plan_toml: PLAN.into(),
            actor: "test".into(),
            skip_backtest: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut candidate_customer = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    for round in 1.. {
        let items = scoring
            .score_batch(batch(format!("r{round}"), round * 500))
            .await
            .unwrap()
            .into_inner()
            .items;
        for (i, item) in (round * 500..).zip(items) {
            if let Some(pb::score_batch_item::Outcome::Response(r)) = item.outcome
                && r.arm == pb::Arm::Candidate as i32
                && r.current_limit.is_some_and(|c| c > 0)
                && r.granted_limit == 0
            {
                candidate_customer.get_or_insert(all[i % all.len()].id.clone());
            }
        }
        let status = rollouts
            .status(pb::RolloutRef {
                model: MODEL.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if status.state != "active" {
            assert_eq!(status.state, "rolled_back");
            break;
        }
        assert!(Instant::now() < deadline, "v9 was never rolled back");
    }
    let customer = &candidate_customer.expect("the candidate withdrew someone's limit");

    // The reports, through the command line a reviewer uses.
    let dir = tempfile::tempdir().unwrap();
    let rollout_html = dir.path().join("rollout.html");
    let customer_html = dir.path().join("customer.html");
    let said = riskserve(&[
        "report",
        "rollout",
        &started.id,
        "--server",
        &addr,
        "--out",
        rollout_html.to_str().unwrap(),
    ]);
    assert!(said.contains("rolled_back"), "{said}");
    riskserve(&[
        "report",
        "customer",
        customer,
        "--server",
        &addr,
        "--out",
        customer_html.to_str().unwrap(),
    ]);
    // By model instead of id: the model's latest rollout, the same page.
    let by_model = dir.path().join("by-model.html");
    riskserve(&[
        "report",
        "rollout",
        "--model",
        MODEL,
        "--server",
        &addr,
        "--out",
        by_model.to_str().unwrap(),
    ]);
    server.stop().await.unwrap();

    let page = std::fs::read_to_string(&rollout_html).unwrap();
    assert_self_contained(&page);
    assert_eq!(page, std::fs::read_to_string(&by_model).unwrap());
    for chart in [
        "Step timeline",
        "Each arm&#39;s share of the decisions over time",
        "Decisions per second by arm",
        "Guardrail withdrawal_rate_diff against its threshold",
        "Guardrail psi against its threshold",
        "Probability of default by arm",
    ] {
        assert!(page.contains(chart), "the rollout page lacks {chart:?}");
    }
    assert!(page.matches("<svg").count() >= 8, "too few charts");
    assert!(page.contains("rolled back"));
    // The guardrail that fired is drawn as breached.
    assert!(page.contains("breached"));

    let page = std::fs::read_to_string(&customer_html).unwrap();
    assert_self_contained(&page);
    assert!(page.contains("<svg"));
    assert!(page.contains("Credit limit over time"));
    assert!(
        page.contains("v9 candidate"),
        "the change by v9 is not marked"
    );
    // Under v9's withdrawal, the notice the customer was given.
    assert!(
        page.contains("Notice sent for this withdrawal: reasons 1 "),
        "no notice under the withdrawal"
    );
    assert!(page.contains("we withdrew your credit limit of"));

    let png = dir.path().join("rollout.png");
    screenshot(&rollout_html, &png, dir.path());
    let (ink, orange) = ink(&png);
    assert!(
        ink > 0.02,
        "the screenshot is blank ({ink:.4} of pixels drawn)"
    );
    assert!(
        orange > 500,
        "no candidate-coloured chart pixels ({orange})"
    );
}

/// Debian's chromium, headless, with everything that would reach a network turned off.
fn screenshot(page: &Path, png: &Path, scratch: &Path) {
    let browser = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
        .expect("chromium is needed for this test (.ci/run installs Debian's chromium)");
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1100,2400",
        ])
        .arg(format!(
            "--user-data-dir={}",
            scratch.join("profile").display()
        ))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("running chromium");
    assert!(
        png.exists(),
        "chromium wrote no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The share of pixels that are not white, and how many are the candidate's orange.
fn ink(png: &Path) -> (f64, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    assert!(
        channels >= 3,
        "unexpected PNG colour type {:?}",
        info.color_type
    );
    let pixels = &buf[..info.buffer_size()];
    let (mut drawn, mut orange, mut total) = (0usize, 0usize, 0usize);
    for p in pixels.chunks(channels) {
        total += 1;
        let (r, g, b) = (p[0], p[1], p[2]);
        if r < 245 || g < 245 || b < 245 {
            drawn += 1;
        }
        // #ff7f0e, the candidate's colour, allowing for anti-aliasing.
        if r > 230 && (100..160).contains(&g) && b < 60 {
            orange += 1;
        }
    }
    (drawn as f64 / total.max(1) as f64, orange)
}
