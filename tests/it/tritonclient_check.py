"""Drives riskserve with NVIDIA's stock Python client (tritonclient[grpc]), as a caller that
speaks the Open Inference Protocol would. Run by tests/it/tritonclient.rs, which compares what
this prints with Score's answers for the same customers.

Usage: tritonclient_check.py HOST:PORT SPEC.json
SPEC: {"model": str, "columns": [feature names in schema order],
       "customers": [{"id": str, "limit": int, "values": {feature: number}}]}
Prints one JSON object: the metadata seen and the outputs of two ModelInfer calls.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main():
    address, spec_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    model, columns, customers = spec["model"], spec["columns"], spec["customers"]

    client = grpcclient.InferenceServerClient(url=address)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready(model), "model not ready"
    meta = client.get_model_metadata(model, as_json=True)

    # The whole batch, raw FP64 contents, customers as JSON-array parameters.
    rows = np.array([[c["values"][name] for name in columns] for c in customers], dtype=np.float64)
    features = grpcclient.InferInput("features", list(rows.shape), "FP64")
    features.set_data_from_numpy(rows)
    batch = client.infer(
        model,
        [features],
        request_id="triton-batch",
        parameters={
            "customer_ids": json.dumps([c["id"] for c in customers]),
            "current_limits": json.dumps([c["limit"] for c in customers]),
        },
    )

    # One row with the single-row parameters (current_limit goes as an int64 parameter).
    first = customers[0]
    one = grpcclient.InferInput("features", [1, len(columns)], "FP64")
    one.set_data_from_numpy(rows[:1])
    single = client.infer(
        model,
        [one],
        request_id="triton-one",
        parameters={"customer_id": first["id"], "current_limit": int(first["limit"])},
        outputs=[grpcclient.InferRequestedOutput("probability_of_default")],
    )

    def strings(result, name):
        return [b.decode() for b in result.as_numpy(name).tolist()]

    print(
        json.dumps(
            {
                "metadata": meta,
                "model_version": batch.get_response().model_version,
                "probability_of_default": batch.as_numpy("probability_of_default").tolist(),
                "grade": strings(batch, "grade"),
                "decision": strings(batch, "decision"),
                "granted_limit": batch.as_numpy("granted_limit").tolist(),
                "version": strings(batch, "version"),
                "decision_id": strings(batch, "decision_id"),
                "single_probability_of_default": single.as_numpy(
                    "probability_of_default"
                ).tolist(),
                "single_outputs": [o.name for o in single.get_response().outputs],
            }
        )
    )


if __name__ == "__main__":
    main()
