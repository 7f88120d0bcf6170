//! Fuzzing on stable Rust: request validation and bundle parsing must refuse garbage with a
//! typed error and never panic, and whatever they accept must score to a usable answer.
//!
//! The proptest properties run in every `cargo test`. The time-budgeted loops
//! (`fuzz_*_for_a_while`, ignored by default) mutate the shipped bundle and real requests for
//! `FUZZ_SECS` seconds each; `.ci/run` runs them for 60 s. They stand in for cargo-fuzz, which
//! needs a nightly toolchain that CI does not have. A crash prints the input to add here as a
//! regression case.

use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::harness::{customers, repo, request};
use proptest::prelude::*;
use prost::Message;
use rand::{Rng, SeedableRng};
use riskserve::bundle::{Bundle, BundleDigest};
use riskserve::grpc::pb;
use riskserve::rollout::Route;
use riskserve::scoring::{ScoreRequest, decide};

fn v1() -> &'static Bundle {
    static B: OnceLock<Bundle> = OnceLock::new();
    B.get_or_init(|| Bundle::load(&repo().join("models/credit-limit/v1"), None).unwrap())
}

fn v1_texts() -> (String, String) {
    let dir = repo().join("models/credit-limit/v1");
    (
        std::fs::read_to_string(dir.join("manifest.toml")).unwrap(),
        std::fs::read_to_string(dir.join("parameters.toml")).unwrap(),
    )
}

/// Request bytes as they come off the wire, through every check to a decision.
fn check_request_bytes(bytes: &[u8]) {
    let Ok(message) = pb::ScoreRequest::decode(bytes) else {
        return;
    };
    check_request(message);
}

fn check_request(message: pb::ScoreRequest) {
    let req = match ScoreRequest::try_from(message) {
        Ok(r) => r,
        Err(e) => {
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(!status.message().is_empty());
            return;
        }
    };
    let bundle = v1();
    match bundle.schema.vector(&req.features) {
        Ok(x) => {
            assert_eq!(x.len(), bundle.schema.features().len());
            for (v, spec) in x.iter().zip(bundle.schema.features()) {
                assert!(
                    v.is_finite() && *v >= spec.min && *v <= spec.max,
                    "{} accepted as {v}",
                    spec.name
                );
            }
            let d = decide(bundle, &req, &x, &Route::champion());
            assert!((0.0..=1.0).contains(&d.probability_of_default));
            assert!(d.granted_limit >= 0);
        }
        Err(e) => {
            let status = tonic::Status::from(riskserve::scoring::ScoreError::Feature(e));
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains("feature"), "{}", status.message());
        }
    }
}

/// Bundle texts through parsing, validation and warm-up.
fn check_bundle(manifest: &str, parameters: &str) {
    let digest = BundleDigest::recorded("sha256:fuzz".into());
    let files = [
        ("manifest.toml".to_string(), manifest.as_bytes().to_vec()),
        (
            "parameters.toml".to_string(),
            parameters.as_bytes().to_vec(),
        ),
    ];
    if let Ok(bundle) = Bundle::parse(&files, digest, None) {
        // Validation passed: it must be able to score its own corners.
        let _ = bundle.warm_up();
    }
}

/// A feature value of any kind, weighted towards the awkward ones.
fn any_value() -> impl Strategy<Value = pb::FeatureValue> {
    use pb::feature_value::Kind;
    let number = prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
        Just(1e308),
        -1e6..1e6f64,
    ];
    prop_oneof![
        number.prop_map(|n| Some(Kind::Number(n))),
        any::<i64>().prop_map(|i| Some(Kind::Integer(i))),
        ".{0,12}".prop_map(|t| Some(Kind::Text(t))),
        any::<bool>().prop_map(|b| Some(Kind::Flag(b))),
        Just(None),
    ]
    .prop_map(|kind| pb::FeatureValue { kind })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn request_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        check_request_bytes(&bytes);
    }

    #[test]
    fn a_real_request_with_any_values_is_scored_in_range_or_refused(
        n in 0usize..30_000,
        changes in proptest::collection::vec((0usize..40, any_value()), 0..6),
        extra in proptest::option::of("[A-Z_]{1,12}"),
        limit in proptest::option::of(any::<i64>()),
    ) {
        let mut message = request(&customers()[n % customers().len()], "fuzz");
        let names: Vec<String> = message.features.keys().cloned().collect();
        for (i, value) in changes {
            match names.get(i) {
                Some(name) => { message.features.insert(name.clone(), value); }
                None if i % 2 == 0 => { message.features.remove(&names[i % names.len()]); }
                None => {}
            }
        }
        if let Some(name) = extra {
            message.features.insert(name, pb::FeatureValue { kind: None });
        }
        message.current_limit = limit.or(message.current_limit);
        check_request(message);
    }

    #[test]
    fn mutated_bundle_texts_never_panic(
        edits in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>(), mutation()), 1..4)
    ) {
        let (mut manifest, mut parameters) = v1_texts();
        for (which, at, m) in edits {
            let text = if which { &mut manifest } else { &mut parameters };
            apply(text, at.index(text.len().max(1)), &m);
        }
        check_bundle(&manifest, &parameters);
    }
}

/// Mutations that keep TOML nearly valid, so parsing gets past the syntax.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the number at or after a position with an awkward one.
    Number(&'static str),
    DeleteLine,
    DuplicateLine,
    Byte(u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        prop::sample::select(vec![
            "nan",
            "inf",
            "-inf",
            "0",
            "-0.0",
            "1e308",
            "-1e308",
            "5e-324",
            "-1",
            "9223372036854775807",
            "1.5",
            "\"x\"",
        ])
        .prop_map(Mutation::Number),
        Just(Mutation::DeleteLine),
        Just(Mutation::DuplicateLine),
        any::<u8>().prop_map(Mutation::Byte),
    ]
}

fn apply(text: &mut String, at: usize, m: &Mutation) {
    let at = (0..=at.min(text.len()))
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i + 1);
    match m {
        Mutation::Number(n) => {
            let Some(start) = text[at..]
                .find(|c: char| c.is_ascii_digit())
                .map(|i| at + i)
            else {
                return;
            };
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_digit() || "+-.eE_".contains(c)))
                .map_or(text.len(), |i| start + i);
            text.replace_range(start..end, n);
        }
        Mutation::DeleteLine => text.replace_range(line_start..line_end, ""),
        Mutation::DuplicateLine => {
            let line = text[line_start..line_end].to_string();
            text.insert_str(line_start, &line);
        }
        Mutation::Byte(b) => {
            if b.is_ascii() {
                text.insert(at, *b as char);
            }
        }
    }
}

/// FUZZ_SECS (default 5) of random mutation, reproducible from the printed seed.
fn fuzz_for(name: &str, mut one: impl FnMut(&mut rand_chacha::ChaCha8Rng)) {
    let secs: u64 = std::env::var("FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{name}: FUZZ_SEED={seed} for {secs} s");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        one(&mut rng);
        runs += 1;
    }
    eprintln!("{name}: {runs} inputs, no finding");
}

#[test]
#[ignore = "time-budgeted fuzzing; .ci/run runs it with FUZZ_SECS=60"]
fn fuzz_request_validation_for_a_while() {
    let seeds: Vec<Vec<u8>> = (0..50)
        .map(|i| request(&customers()[i * 97], "seed").encode_to_vec())
        .collect();
    fuzz_for("request validation", |rng| {
        let mut bytes = seeds[rng.gen_range(0..seeds.len())].clone();
        for _ in 0..rng.gen_range(1..8) {
            let at = rng.gen_range(0..=bytes.len());
            match rng.gen_range(0..4) {
                0 if at < bytes.len() => bytes[at] = rng.r#gen(),
                1 => bytes.insert(at, rng.r#gen()),
                2 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.truncate(at),
            }
        }
        let input = bytes.clone();
        if std::panic::catch_unwind(AssertUnwindSafe(|| check_request_bytes(&bytes))).is_err() {
            panic!("request bytes that crash: {}", hex(&input));
        }
    });
}

#[test]
#[ignore = "time-budgeted fuzzing; .ci/run runs it with FUZZ_SECS=60"]
fn fuzz_bundle_parsing_for_a_while() {
    let (manifest, parameters) = v1_texts();
    let numbers = [
        "nan", "inf", "-inf", "0", "-0.0", "1e308", "-1e308", "5e-324", "-1", "1.5", "\"x\"",
    ];
    fuzz_for("bundle parsing", |rng| {
        let (mut m, mut p) = (manifest.clone(), parameters.clone());
        for _ in 0..rng.gen_range(1..5) {
            let text = if rng.r#gen() { &mut m } else { &mut p };
            let at = rng.gen_range(0..text.len().max(1));
            let mutation = match rng.gen_range(0..4) {
                0 => Mutation::Number(numbers[rng.gen_range(0..numbers.len())]),
                1 => Mutation::DeleteLine,
                2 => Mutation::DuplicateLine,
                _ => Mutation::Byte(rng.r#gen()),
            };
            apply(text, at, &mutation);
        }
        let (mi, pi) = (m.clone(), p.clone());
        if std::panic::catch_unwind(AssertUnwindSafe(|| check_bundle(&m, &p))).is_err() {
            panic!("bundle texts that crash:\n--- manifest\n{mi}\n--- parameters\n{pi}");
        }
    });
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
