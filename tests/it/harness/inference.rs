//! The inference protocol's tensors, encoded and decoded here independently of the
//! server's code: ModelInfer requests for customers, and the outputs of a response.

use std::collections::BTreeMap;

use riskserve::grpc::v2;

use super::customers::{Customer, schema_features};
use super::fixtures::MODEL;

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
