"""The TorchServe handler with a real ts.context.Context, no server."""
from __future__ import annotations

import hashlib
import hmac
import json
import shutil

import pytest
import torch
import yaml
from ts.context import Context, RequestProcessor

from selfheal_bench.torchserve import REPO

SECRET = "unit-secret"
# What the management-port plugin sends when token authorization is off and the secret is set.
CREDENTIAL = hmac.new(SECRET.encode(), b"selfheal-feedback/digits", hashlib.sha256).hexdigest()
AUTH = {"X-Selfheal-Feedback": CREDENTIAL}


@pytest.fixture()
def handler(demo_model_dir, tmp_path, monkeypatch):
    """An initialised SelfHealHandler over an unpacked-.mar-like model dir."""
    from selfheal_handler import SelfHealHandler

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(REPO / "selfheal_bench" / "models.py", model_dir / "models.py")
    shutil.copy(demo_model_dir / "digits_cnn.pt", model_dir / "digits_cnn.pt")
    shutil.copy(demo_model_dir / "reference.pt", model_dir / "reference.pt")
    manifest = {"model": {"modelName": "digits", "modelFile": "models.py", "serializedFile": "digits_cnn.pt",
                          "handler": "selfheal_handler.py"}}
    config = yaml.safe_load((REPO / "model-config.yaml").read_text())
    config["handler"]["snapshot_dir"] = str(tmp_path / "snapshots")
    config["handler"]["max_instances"] = 16
    monkeypatch.setenv("SELFHEAL_FEEDBACK_SECRET", SECRET)
    import selfheal_request
    monkeypatch.setattr(selfheal_request, "server_workdir", lambda: tmp_path)  # no key_file.json there
    monkeypatch.delenv("SELFHEAL_SNAPSHOT_DIR", raising=False)
    ctx = Context("digits", str(model_dir), manifest, 8, None, "0.12.0", model_yaml_config=config)
    h = SelfHealHandler()
    h.initialize(ctx)
    return h, ctx


def call(h, ctx, bodies, headers=None):
    """Run one TorchServe batch, then what the background thread would do; [(status, json)] per request."""
    headers = headers or [{} for _ in bodies]
    ctx.request_processor = [RequestProcessor(dict(hd)) for hd in headers]
    data = [{"body": b if isinstance(b, (bytes, bytearray)) else json.dumps(b).encode()} for b in bodies]
    out = h.handle(data, ctx)
    h.healer.drain()
    h.healer.catch_up()
    return [(ctx.get_response_status(i)[0], o) for i, o in enumerate(out)]


def img(v=0.5):
    return [[[v] * 8] * 8]


def test_inference_contract_and_batching(handler, reference):
    h, ctx = handler
    x = reference[0]
    bodies = [{"instances": x[:3].tolist()}, {"data": x[3].tolist()}, {"instances": x[4:5, 0].tolist()}]
    res = call(h, ctx, bodies)
    assert [s for s, _ in res] == [200, 200, 200]
    assert [len(o["predictions"]) for _, o in res] == [3, 1, 1]
    first = res[0][1]["predictions"][0]
    assert set(first) == {"id", "label", "probabilities"} and abs(sum(first["probabilities"]) - 1) < 1e-4
    assert res[0][1]["model_version"] == 0 and res[0][1]["drift"]["detected"] is False
    labels = [p["label"] for _, o in res for p in o["predictions"]]
    with torch.no_grad():
        assert labels == h.model(x[:5]).argmax(1).tolist()


@pytest.mark.parametrize("body, code, words", [
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({"instances": []}, 400, "non-empty"),
    ({"instances": [[1, 2], [3]]}, 400, "numeric arrays"),
    ({"instances": [[[1.0] * 8] * 7]}, 400, "shape"),
    ({"instances": [img(float("nan"))]}, 400, "NaN"),
    ({"instances": [img()] * 17}, 413, "limit"),
    ({"foo": 1}, 400, "instances"),
])
def test_bad_inference_input_gets_4xx_and_neighbours_are_served(handler, body, code, words):
    h, ctx = handler
    before = h.healer.state_dict()
    res = call(h, ctx, [body, {"data": img()}])
    assert res[0][0] == code and words in res[0][1]["message"], res[0]
    assert res[1][0] == 200 and len(res[1][1]["predictions"]) == 1
    assert h.healer.state_dict()["counters"]["feedback"] == before["counters"]["feedback"]


def test_feedback_needs_the_internal_credential(handler, reference, tmp_path):
    h, ctx = handler
    body = {"instances": reference[0][:2].tolist(), "labels": reference[1][:2].tolist()}
    [(code, out)] = call(h, ctx, [body])
    assert code == 403 and "management API" in out["message"]
    for wrong in ("", "wrong", SECRET):
        [(code, out)] = call(h, ctx, [body], [{"X-Selfheal-Feedback": wrong}])
        assert code == 403 and "invalid" in out["message"]
    assert h.healer.status()["counters"]["feedback"] == 0
    [(code, out)] = call(h, ctx, [body], [{"x-selfheal-feedback": CREDENTIAL}])  # header case does not matter
    assert code == 200 and out["accepted"] == out["logged"] == 2
    assert h.healer.status()["counters"]["feedback"] == 2
    [(code, out)] = call(h, ctx, [{"feedback_status": True}], [AUTH])
    assert code == 200 and out["counters"]["feedback"] == 2 and out["log"]["entries"] == 2
    # With token authorization on, the management key in key_file.json is the credential's key.
    (tmp_path / "key_file.json").write_text(json.dumps({"management": {"key": "mkey"}}))
    [(code, _)] = call(h, ctx, [body], [AUTH])
    assert code == 403
    keyed = hmac.new(b"mkey", b"selfheal-feedback/digits", hashlib.sha256).hexdigest()
    [(code, _)] = call(h, ctx, [body], [{"X-Selfheal-Feedback": keyed}])
    assert code == 200


def test_feedback_by_id_applies_once(handler, reference):
    h, ctx = handler
    [(_, out)] = call(h, ctx, [{"instances": reference[0][:2].tolist()}])
    ids = [p["id"] for p in out["predictions"]]
    auth = [AUTH]
    fb = {"feedback": [{"id": ids[0], "label": 3}, {"id": ids[1], "label": 4}]}
    [(code, res)] = call(h, ctx, [fb], auth)
    assert code == 200 and res["accepted"] == 2
    [(code, res)] = call(h, ctx, [fb], auth)
    assert code == 409 and "already" in res["message"]
    assert h.healer.status()["counters"]["feedback"] == 2


@pytest.mark.parametrize("body, code, words", [
    ({"feedback": [{"id": "nope", "label": 1}]}, 404, "unknown"),
    ({"feedback": [{"id": "x", "label": 10}]}, 422, "out of range"),
    ({"feedback": [{"id": "x", "label": 1.5}]}, 400, "not an integer"),
    ({"feedback": [{"label": 1}]}, 400, "each feedback item"),
    ({"feedback": []}, 400, "non-empty"),
    ({"instances": [img()], "labels": [1, 2]}, 400, "2 labels for 1"),
    ({"instances": [img()], "labels": [True]}, 400, "not an integer"),
    ({"instances": [img()]}, 400, "feedback needs"),
])
def test_bad_feedback_changes_nothing(handler, body, code, words):
    h, ctx = handler
    before = h.healer.state_dict()
    [(got, out)] = call(h, ctx, [body], [AUTH])
    assert got == code and words in out["message"], out
    after = h.healer.state_dict()
    assert after["counters"] == before["counters"]
    assert all(torch.equal(a, b) for a, b in zip(before["model"].values(), after["model"].values()))


def test_describe_returns_status(handler):
    h, ctx = handler
    ctx.request_processor = [RequestProcessor({"describe": "True"})]
    [out] = h.handle([{"body": b""}], ctx)
    status = json.loads(out)
    assert status["version"] == 0 and status["drift"]["detected"] is False
    assert status["handler"]["feedback_enabled"] is True
