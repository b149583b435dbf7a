"""deploy/kserve/ checked without a cluster: the Kubernetes kinds against the Kubernetes schemas
(kubernetes-validate, strict: an unknown field fails), the InferenceService against the KServe
SDK's own types, and the commands against the argument parser they run."""
from __future__ import annotations

import copy

import pytest
import yaml

from tests.conftest import REPO

kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (make test installs it)")
kserve = pytest.importorskip("kserve", reason="KServe is not installed: pip install -e '.[kserve]'")

DEPLOY = REPO / "deploy" / "kserve"
K8S = "1.33"


def documents() -> list[dict]:
    return [d for f in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def sdk_unknown_fields(obj, type_name: str, where: str = "") -> list[str]:
    """Fields of `obj` that the SDK type (kserve's V1beta1*, or the Kubernetes client's V1*) has not."""
    import kubernetes.client

    if type_name.startswith("list["):
        return [e for k, v in enumerate(obj) for e in sdk_unknown_fields(v, type_name[5:-1], f"{where}[{k}]")]
    cls = getattr(kserve, type_name, None) or getattr(kubernetes.client, type_name, None)
    if cls is None or not hasattr(cls, "openapi_types"):
        return []  # a scalar, a map or a free-form object
    if not isinstance(obj, dict):
        return [f"{where}: {type_name} expected, got {type(obj).__name__}"]
    by_key = {key: name for name, key in cls.attribute_map.items()}
    out = []
    for key, value in obj.items():
        if key not in by_key:
            out.append(f"{where}.{key}: not a field of {type_name}")
        else:
            out += sdk_unknown_fields(value, cls.openapi_types[by_key[key]], f"{where}.{key}")
    return out


def test_the_kubernetes_objects_fit_the_kubernetes_schemas():
    kinds = []
    for doc in documents():
        if doc["kind"] == "InferenceService":
            continue
        kv.validate(doc, K8S, strict=True)
        kinds.append(doc["kind"])
    assert {"Deployment", "Service", "Secret", "PersistentVolumeClaim"} <= set(kinds)
    bad = copy.deepcopy(next(d for d in documents() if d["kind"] == "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    with pytest.raises(kv.ValidationError):  # the check can fail
        kv.validate(bad, K8S, strict=True)


def test_the_inference_service_fits_kserves_types_and_runs_selfheals_server():
    from selfheal_kserve.server import parser

    isvc = next(d for d in documents() if d["kind"] == "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert sdk_unknown_fields(isvc, "V1beta1InferenceService") == []
    assert sdk_unknown_fields({"spec": {"predictor": {"minReplica": 2}}}, "V1beta1InferenceService")  # can fail
    containers = isvc["spec"]["predictor"]["containers"]
    kv.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
                 "spec": {"containers": containers}}, K8S, strict=True)
    command = containers[0]["command"]
    assert command[:3] == ["python", "-m", "selfheal_kserve"]
    args = parser().parse_args(command[3:])
    assert args.cmd == "serve" and args.http_port == containers[0]["ports"][0]["containerPort"]
    assert isvc["spec"]["predictor"]["minReplicas"] >= 2


def test_the_learner_runs_selfheals_learner_with_the_key_and_the_log_from_the_secret():
    from selfheal_kserve.server import parser

    docs = documents()
    secret = next(d for d in docs if d["kind"] == "Secret")
    learner = next(d for d in docs if d["kind"] == "Deployment" and "learner" in d["metadata"]["name"])
    container = learner["spec"]["template"]["spec"]["containers"][0]
    args = parser().parse_args(container["command"][3:])
    assert args.cmd == "learner" and learner["spec"]["replicas"] == 1
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(env) == {"SELFHEAL_MANAGEMENT_KEY", "SELFHEAL_LOG_URL"}
    for ref in env.values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    service = next(d for d in docs if d["kind"] == "Service" and d["spec"]["selector"] == learner["spec"]["selector"]
                   ["matchLabels"])
    assert service["spec"]["ports"][0]["port"] == args.port
