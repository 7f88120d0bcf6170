//! The CPU cost of one decision's model work, and the memory of a loaded version, for each
//! bundle given: `decide` (PD, reasons, policy) over the customers of a CSV, timed in-process
//! on one thread, and for a tree ensemble also its margin alone (no TreeSHAP), so that the
//! cost of exact reasons shows on its own. Prints one JSON line per bundle.
//!
//! `taskset -c 0 cargo run --release --example model_cost -- data.csv BUNDLE_DIR...`

use std::path::Path;
use std::time::Instant;

use riskserve::bundle::Bundle;
use riskserve::inputs::{EmptyCells, Table};
use riskserve::model::trees::Ensemble;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Nanoseconds per call of `f` over every vector, repeated for at least a second; the median
/// of five such runs.
fn ns_per_call(vectors: &[Vec<f64>], mut f: impl FnMut(&[f64]) -> f64) -> f64 {
    let mut runs = Vec::new();
    let mut sink = 0.0;
    for _ in 0..5 {
        let started = Instant::now();
        let mut calls = 0u64;
        while started.elapsed().as_secs_f64() < 1.0 {
            for x in vectors {
                sink += f(x);
            }
            calls += vectors.len() as u64;
        }
        runs.push(started.elapsed().as_nanos() as f64 / calls as f64);
    }
    std::hint::black_box(sink);
    runs.sort_by(f64::total_cmp);
    runs[2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [data, bundles @ ..] = args.as_slice() else {
        eprintln!("usage: model_cost DATA.csv BUNDLE_DIR...");
        std::process::exit(2);
    };
    let mut table = None;
    for dir in bundles {
        // The memory of a version: RSS before and after holding ten loaded copies of it.
        let before = rss_kib();
        let copies: Vec<Bundle> = (0..10)
            .map(|_| Bundle::load(Path::new(dir), None).expect("a bundle"))
            .collect();
        let per_version_kib = (rss_kib().saturating_sub(before)) as f64 / 10.0;
        let bundle = &copies[0];
        // Read after the first measurement of memory, so its freed pages are not reused.
        let table = table.get_or_insert_with(|| {
            let bytes = std::fs::read(data).expect("reading the data");
            Table::parse(&bytes, Path::new(data), EmptyCells::Missing).expect("a CSV")
        });
        let vectors = table
            .vectors(bundle.schema.features())
            .expect("the data fits the schema");
        let decide = ns_per_call(&vectors, |x| {
            bundle.decide(x, Some(50_000)).scored.probability_of_default
        });
        // The margin alone, where the model is a tree ensemble read again from its file.
        let source = bundle.manifest.source.as_ref();
        let margin = source.map(|s| {
            let file = std::fs::read(Path::new(dir).join(&s.file)).expect("the model file");
            let e: Ensemble = s.format.parse(&file).expect("it loaded once");
            let depth = e.trees.iter().map(|t| t.depth()).max().unwrap_or(0);
            let heap = e.heap_bytes();
            (
                ns_per_call(&vectors, |x| e.margin(x)),
                e.trees.len(),
                depth,
                heap,
            )
        });
        let (margin_ns, trees, depth, heap) = match margin {
            Some((m, t, d, h)) => (Some(m), t, d, Some(h as f64 / 1024.0)),
            None => (None, 0, 0, None),
        };
        println!(
            "{}",
            serde_json::json!({
                "bundle": dir,
                "kind": bundle.model.kind(),
                "trees": trees,
                "max_depth": depth,
                "decide_ns": decide.round(),
                "margin_only_ns": margin_ns.map(f64::round),
                "rss_per_version_kib": per_version_kib,
                "ensemble_heap_kib": heap,
            })
        );
    }
}
