"""Builds MLServer's copy of a riskserve logistic bundle, and its settings.

Usage: make_model.py BUNDLE_DIR OUT_DIR MODEL_NAME GRPC_PORT HTTP_PORT METRICS_PORT WORKERS

A riskserve logistic bundle (`parameters.toml`) scores
    PD = sigmoid(intercept + sum_i coefficient_i * (x_i - mean_i) / scale_i)
over the features in the file's order (the schema's order). The same model in scikit-learn is
a StandardScaler with mean_/scale_ set by hand, then a LogisticRegression with coef_,
intercept_ and classes_ set by hand: predict_proba(x)[:, 1] = expit(coef . ((x - mean_) /
scale_) + intercept_). Nothing is fitted.

Writes OUT_DIR/settings.json (the server) and OUT_DIR/MODEL_NAME/{model.joblib,
model-settings.json} (mlserver_sklearn.SKLearnModel, predict_proba), and prints the feature
order. MLServer is started with `mlserver start OUT_DIR`.
"""
import json
import os
import sys
import tomllib

import joblib
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

bundle, out, name, grpc_port, http_port, metrics_port, workers = sys.argv[1:8]
with open(os.path.join(bundle, "parameters.toml"), "rb") as f:
    params = tomllib.load(f)
terms = params["feature"]
names = [t["name"] for t in terms]
mean = np.array([t["mean"] for t in terms], dtype=np.float64)
scale = np.array([t["scale"] for t in terms], dtype=np.float64)
coef = np.array([[t["coefficient"] for t in terms]], dtype=np.float64)
intercept = np.array([params["intercept"]], dtype=np.float64)
if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
    sys.exit("make_model: a scale is not finite and positive")

scaler = StandardScaler()
scaler.mean_ = mean
scaler.scale_ = scale
scaler.var_ = scale**2
scaler.n_features_in_ = len(names)
scaler.n_samples_seen_ = 1
lr = LogisticRegression()
lr.coef_ = coef
lr.intercept_ = intercept
lr.classes_ = np.array([0, 1])
lr.n_features_in_ = len(names)
lr.n_iter_ = np.array([0])
model = Pipeline([("standardise", scaler), ("logistic", lr)])

# The copy scores as the bundle's formula does, here, before any server is involved.
rng = np.random.default_rng(7)
x = mean + scale * rng.normal(size=(1000, len(names)))
z = intercept[0] + ((x - mean) / scale) @ coef[0]
expected = 1.0 / (1.0 + np.exp(-z))
got = model.predict_proba(x)[:, 1]
diff = float(np.max(np.abs(got - expected)))
if not diff < 1e-12:
    sys.exit(f"make_model: the scikit-learn copy differs from the bundle's formula by {diff}")

os.makedirs(os.path.join(out, name), exist_ok=True)
joblib.dump(model, os.path.join(out, name, "model.joblib"))
with open(os.path.join(out, name, "model-settings.json"), "w") as f:
    json.dump(
        {
            "name": name,
            "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": "./model.joblib", "extra": {"predict_fn": "predict_proba"}},
        },
        f,
        indent=2,
    )
with open(os.path.join(out, "settings.json"), "w") as f:
    json.dump(
        {
            "host": "127.0.0.1",
            "grpc_port": int(grpc_port),
            "http_port": int(http_port),
            "metrics_port": int(metrics_port),
            "metrics_dir": out.rstrip("/") + "-metrics",
            # 0: inference in the server's own process (no worker pool over IPC).
            "parallel_workers": int(workers),
            # Not the DEBUG log level MLServer defaults to.
            "debug": False,
        },
        f,
        indent=2,
    )
print(json.dumps({"features": names, "local_max_abs_diff": diff}))
