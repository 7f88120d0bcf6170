"""Equivalence check before measuring: the same rows of the CSV, sent as the load sends them
(one ModelInfer per 64 rows: an FP64 [rows, n_features] tensor `features` in
raw_input_contents, the model's name, `customer_ids` / `current_limits` parameters), must
get the same probability of default from every server, to TOL.

Usage: check.py BUNDLE_DIR CSV MODEL_NAME TOL ROWS riskserve=HOST:PORT... mlserver=HOST:PORT
riskserve answers `probability_of_default`; MLServer's SKLearnModel answers `predict_proba`
([rows, 2], column 1 is the default class). Prints one JSON line; exits 1 on any difference
above TOL, on a server's error, or on a shape mismatch.
"""
import csv
import json
import sys
import tomllib
import uuid

import grpc
import numpy as np
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc

bundle, data, model, tol, nrows = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
servers = [a.split("=", 1) for a in sys.argv[6:]]
with open(f"{bundle}/parameters.toml", "rb") as f:
    names = [t["name"] for t in tomllib.load(f)["feature"]]
with open(data) as f:
    rows = list(csv.DictReader(f))
# Rows spread over the whole file, not only its head.
picked = [rows[i] for i in np.linspace(0, len(rows) - 1, nrows).astype(int)]
x = np.array([[float(r[n]) for n in names] for r in picked], dtype=np.float64)
ids = [r["USER_ID"] for r in picked]
limits = [int(float(r["CREDIT_LIMIT"])) for r in picked]


def output(resp, name):
    for i, o in enumerate(resp.outputs):
        if o.name == name:
            if resp.raw_output_contents:
                a = np.frombuffer(resp.raw_output_contents[i], dtype="<f8")
            else:
                a = np.array(o.contents.fp64_contents, dtype=np.float64)
            return a.reshape(tuple(o.shape))
    raise SystemExit(f"check: no output {name!r} in {[o.name for o in resp.outputs]}")


def score(kind, addr):
    pd = []
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for s in range(0, len(x), 64):
            chunk = x[s : s + 64]
            req = pb.ModelInferRequest(
                model_name=model,
                id=f"mlserver-check-{uuid.uuid4()}",
                inputs=[pb.ModelInferRequest.InferInputTensor(name="features", datatype="FP64", shape=list(chunk.shape))],
                raw_input_contents=[chunk.astype("<f8").tobytes()],
            )
            req.parameters["customer_ids"].string_param = json.dumps(ids[s : s + 64])
            req.parameters["current_limits"].string_param = json.dumps(limits[s : s + 64])
            try:
                resp = stub.ModelInfer(req, timeout=30)
            except grpc.RpcError as e:
                raise SystemExit(f"check: {kind} at {addr} refused the request: {e.code()}: {e.details()}")
            if kind == "mlserver":
                p = output(resp, "predict_proba")
                if p.shape != (len(chunk), 2):
                    raise SystemExit(f"check: MLServer's predict_proba has shape {p.shape}")
                pd.append(p[:, 1])
            else:
                pd.append(output(resp, "probability_of_default").reshape(-1))
    return np.concatenate(pd)


scores = {f"{kind}@{addr}": score(kind, addr) for kind, addr in servers}
first = next(iter(scores))
ref = scores[first]
# The bundle's formula in numpy as well, so that a fault common to all servers shows too.
with open(f"{bundle}/parameters.toml", "rb") as f:
    p = tomllib.load(f)
t = p["feature"]
z = p["intercept"] + ((x - [a["mean"] for a in t]) / [a["scale"] for a in t]) @ np.array([a["coefficient"] for a in t])
scores["formula"] = 1.0 / (1.0 + np.exp(-z))
diffs = {k: float(np.max(np.abs(v - ref))) for k, v in scores.items() if k != first}
worst = max(diffs.values())
print(json.dumps({"label": "equivalence", "rows": len(x), "reference": first,
                  "max_abs_diff": diffs, "pd_range": [float(ref.min()), float(ref.max())],
                  "tolerance": tol, "ok": worst <= tol}))
if not worst <= tol:
    k = max(diffs, key=diffs.get)
    i = int(np.argmax(np.abs(scores[k] - ref)))
    print(f"check: FAILED: {k} differs from {first} by {diffs[k]:.3g} > {tol:g} "
          f"(row USER_ID={ids[i]}: {scores[k][i]!r} against {ref[i]!r})", file=sys.stderr)
    sys.exit(1)
