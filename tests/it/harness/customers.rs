//! Taiwan customers as the CSV has them, the v1 schema's features, and Score requests for
//! them.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use riskserve::grpc::pb;

use super::fixtures::{MODEL, repo, taiwan_csv};
use super::server::TestServer;

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
