"""End to end over HTTP against a real TorchServe: contract, batching, auth, bad input."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from tests.conftest import wait_until


IMG = [[0.5] * 8] * 8


def probe_probs(server, x) -> list[list[float]]:
    r = server.predict({"instances": x.tolist()})
    r.raise_for_status()
    return [p["probabilities"] for p in r.json()["predictions"]]


def test_inference_contract(server, reference, demo_model):
    x = reference[0][:4]
    r = server.predict({"instances": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"predictions"} and len(body["predictions"]) == 4
    state = server.selfheal(r)
    assert len(state["ids"]) == 4 and state["version"] == 0 and state["drift"] is False
    with torch.no_grad():
        assert [p["label"] for p in body["predictions"]] == demo_model(x).argmax(1).tolist()
    single = server.predict({"data": x[0, 0].tolist()})  # an 8x8 image for the (1, 8, 8) model
    assert single.status_code == 200 and len(single.json()["predictions"]) == 1


def test_concurrent_requests_are_batched_and_answered_separately(server, reference, demo_model):
    """Concurrent one-input requests share forwards (TorchServe batches them) and each gets its own
    answer and id. Bursts are repeated until one forward held several requests (a deadline)."""
    x = reference[0][:24]
    for _ in range(10):
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: server.predict({"data": x[i].tolist()}), range(len(x))))
        if server.status()["batches"]["largest"] >= 2:
            break
    assert server.status()["batches"]["largest"] >= 2, "10 bursts of 24 concurrent requests, never batched"
    assert all(r.status_code == 200 for r in responses)
    labels = [r.json()["predictions"][0]["label"] for r in responses]
    with torch.no_grad():
        assert labels == demo_model(x).argmax(1).tolist()
    assert len({server.ids(r)[0] for r in responses}) == len(x)


def test_status_on_management_api(server):
    status = server.status()
    assert {"version", "drift", "counters", "label_free", "learner", "handler", "reference"} <= set(status)
    assert status["learner"]["active"] and status["handler"]["learner_mode"] == "auto"
    assert status["monitor"]["calibrated_from"] == "given thresholds"


@pytest.mark.parametrize("token", [None, "not-the-key"])
def test_token_auth_is_on(server, token):
    """TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for method, url in [("post", f"{server.ts.inference_url}/predictions/digits"),
                        ("get", f"{server.ts.management_url}/models/digits?customized=true"),
                        ("get", f"{server.ts.inference_url}/ping")]:
        r = requests.request(method, url, json={"data": IMG}, headers=headers, timeout=10)
        assert r.status_code == 400 and "Token Authorization failed" in r.json()["message"], (url, r.text)
    management_key_on_inference = {"Authorization": f"Bearer {server.ts.keys()['management']}"}
    r = requests.post(f"{server.ts.inference_url}/predictions/digits", json={"data": IMG},
                      headers=management_key_on_inference, timeout=10)
    assert r.status_code == 400


def test_feedback_goes_through_the_management_endpoint_only(server, reference):
    before = server.settled()
    body = {"instances": reference[0][:3].tolist(), "labels": reference[1][:3].tolist()}
    r = server.predict(body)  # the inference port has no feedback route
    assert r.status_code == 403 and "management API" in r.json()["message"], r.text
    for key in (None, "inference"):  # the feedback endpoint needs the management key
        r = server.feedback(body, key=key)
        assert r.status_code == 400 and "Token Authorization failed" in r.json()["message"], r.text
    r = requests.post(f"{server.ts.management_url}/feedback/digits", json=body,
                      headers={"Authorization": "Bearer not-the-key"}, timeout=10)
    assert r.status_code == 400
    assert server.feedback_status()["log"]["entries"] == before["log"]["entries"]
    r = server.feedback(body)
    assert r.status_code == 200 and r.json()["accepted"] == r.json()["logged"] == 3, r.text
    after = server.settled()
    assert after["counters"]["feedback"] == before["counters"]["feedback"] + 3
    assert after["log"]["entries"] == before["log"]["entries"] + 3 and "quarantine" in after


@pytest.mark.parametrize("method, path, code, words", [
    ("post", "/feedback/nosuchmodel", 404, "not loaded"),
    ("post", "/feedback/", 400, "/feedback/{model}"),
    ("post", "/feedback/digits/extra", 400, "/feedback/{model}"),
    ("get", "/feedback/digits/quarantine", 405, "POST"),
    ("put", "/feedback/digits", 405, "POST"),
    ("delete", "/feedback/digits", 405, "POST"),
    ("patch", "/feedback/digits", 405, "GET, POST"),
    ("head", "/feedback/digits", 405, None),
    ("options", "/feedback/digits", 204, None),
    ("patch", "/feedback/digits/quarantine", 405, "POST"),
])
def test_feedback_endpoint_routes(server, method, path, code, words):
    """Methods the serving SDK has no hook for (PATCH, HEAD, OPTIONS) answered 500 before the plugin
    answered them itself (issue 26 F)."""
    r = requests.request(method, server.ts.management_url + path, json={"feedback": []},
                         headers=server.ts.headers("management"), timeout=10)
    assert r.status_code == code, (method, path, r.status_code, r.text)
    if words is not None:
        assert words in r.json()["message"], r.text
    if code in (204, 405) and method in ("patch", "head", "options"):
        assert "POST" in r.headers["Allow"]


@pytest.mark.parametrize("body", [[1, 2], "approve", 3, {"pair": [1, True], "action": "approve"}])
def test_a_quarantine_decision_that_is_not_an_object_is_a_400(server, body):
    """A list, string or number body answered 503 (issue 26 E)."""
    r = requests.post(server.ts.management_url + "/feedback/digits/quarantine", data=json.dumps(body),
                      headers=server.ts.headers("management"), timeout=30)
    assert r.status_code == 400 and "pair" in r.json()["message"], r.text


def test_feedback_by_prediction_id(server, reference):
    r = server.predict({"instances": reference[0][:2].tolist()})
    body = {"feedback": [{"id": i, "label": int(y)} for i, y in zip(server.ids(r), reference[1][:2])]}
    fb = server.feedback(body)  # right after the answer: the id may still be in the worker's buffer
    assert fb.status_code == 200 and fb.json()["accepted"] == 2, fb.text
    again = server.feedback(body)
    assert again.status_code == 409 and "already" in again.json()["message"]


DEEP = ("[" * 1500 + "]" * 1500).encode()
BAD = [
    ("not json", None, b"{definitely not json", 400, "not valid JSON"),
    ("array body", [1, 2, 3], None, 400, "shape"),
    ("wrong shape", {"instances": [[1.0, 2.0]]}, None, 400, "shape"),
    ("ragged", {"instances": [[[0.1] * 8] * 8, [[0.1] * 7] * 8]}, None, 400, "numeric arrays"),
    ("strings", {"instances": [[["a"] * 8] * 8]}, None, 400, "numeric"),
    ("nan", None, json.dumps({"instances": [[[float("nan")] * 8] * 8]}).encode(), 400, "NaN"),
    ("inf", None, json.dumps({"instances": [[[float("inf")] * 8] * 8]}).encode(), 400, "NaN or inf"),
    ("empty batch", {"instances": []}, None, 400, "non-empty"),
    ("oversized batch", {"instances": [IMG] * 65}, None, 413, "limit"),
    ("no inputs", {"something": 1}, None, 400, "instances"),
    ("deep", None, DEEP, 400, "nested deeper"),
    ("long number", None, b'{"data": ' + b"7" * 6000 + b"}", 400, "characters"),
    ("non-ascii", {"data": "\u00e9\u2603\U0001f600"}, None, 400, "numeric"),
    ("booleans", {"instances": [[[True] * 8] * 8]}, None, 400, "true or false"),
]
BAD_FEEDBACK = [
    ("unknown id", {"feedback": [{"id": "0" * 32, "label": 1}]}, 404, "unknown"),
    ("non-ascii id", {"feedback": [{"id": "\u00e9\u2603\U0001f600", "label": 1}]}, 400, "not an id"),
    ("lone surrogate id", {"feedback": [{"id": "\udc80", "label": 1}]}, 400, "not an id"),
    ("forged id", {"feedback": [{"id": "f" * 32, "label": 1}]}, 404, "unknown"),
    ("boolean input", {"instances": [[[True] * 8] * 8], "labels": [1]}, 400, "true or false"),
    ("non-ascii label", {"feedback": [{"id": "x", "label": "\u2603"}]}, 400, "not an integer"),
    ("label out of range", {"instances": [IMG], "labels": [10]}, 422, "out of range"),
    ("negative label", {"instances": [IMG], "labels": [-1]}, 422, "out of range"),
    ("float label", {"instances": [IMG], "labels": [1.5]}, 400, "not an integer"),
    ("label count", {"instances": [IMG], "labels": [1, 2]}, 400, "2 labels for 1"),
    ("nan input", json.dumps({"instances": [[[float("nan")] * 8] * 8], "labels": [1]}).encode(), 400, "NaN"),
    ("empty body", b"", 400, "empty body"),
    ("not feedback", {"instances": [IMG]}, 400, "feedback needs"),
    ("too many items", {"feedback": [{"id": str(i), "label": 1} for i in range(65)]}, 413, "limit"),
    ("duplicate id", {"feedback": [{"id": "a", "label": 1}, {"id": "a", "label": 2}]}, 400, "twice"),
    ("deep", DEEP, 400, "nested deeper"),
]


def test_bad_input_gets_4xx_and_changes_nothing(server, reference):
    probe = reference[0][:8]
    before_status, before_probs = server.settled(), probe_probs(server, probe)
    before_files = sorted(p.name for p in server.snapshots.rglob("*.pt") if "status" not in p.parts)
    for name, body, raw, code, words in BAD:
        r = server.predict(body, raw=raw)
        assert r.status_code == code and words in r.json()["message"], (name, r.status_code, r.text)
        assert r.json()["message"].isascii() and r.reason.isascii()
    for name, body, code, words in BAD_FEEDBACK:
        raw = body if isinstance(body, bytes) else None
        r = server.feedback(body if raw is None else None, raw=raw)
        assert r.status_code == code and words in r.json()["message"], (name, r.status_code, r.text)
        assert r.json()["message"].isascii()
    after = server.settled()
    assert after["log"]["entries"] == before_status["log"]["entries"]
    assert after["version"] == before_status["version"]
    assert sorted(p.name for p in server.snapshots.rglob("*.pt") if "status" not in p.parts) == before_files
    assert probe_probs(server, probe) == before_probs
    assert server.predict({"data": IMG}).status_code == 200  # still serving


def test_a_bad_request_does_not_fail_its_batch_neighbours(server, reference):
    """Bodies that used to crash the worker (deep nesting, huge integers) answered 503 for every
    request batched with them; now only they get a 4xx."""
    good = {"data": reference[0][0].tolist()}
    bodies = [(None, DEEP), (None, b'{"data": ' + b"9" * 6000 + b"}")] + [(good, None)] * 30
    workers = server.ts.worker_pids()
    mixed = server.status()["batches"]["mixed"]
    for _ in range(10):  # until a refused request shared a batch with answered ones (a deadline)
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda b: server.predict(b[0], raw=b[1]).status_code, bodies * 2))
        assert codes.count(400) == 4 and codes.count(200) == 60, codes
        if server.status()["batches"]["mixed"] > mixed:
            break
    assert server.status()["batches"]["mixed"] > mixed, "no bad request was ever batched with good ones"
    assert server.ts.worker_pids() == workers, "no worker died"


@pytest.mark.parametrize("size", [5 * 1024 * 1024])
def test_body_over_server_limit_refused(server, size):
    r = server.predict(None, raw=b"[" + b"0," * (size // 2) + b"0]")
    assert 400 <= r.status_code < 500


def test_ids_that_are_not_yet_written_hold_up_no_other_labeller(server, reference):
    """13 concurrent requests with ids a worker could still be writing (a real id's prefix, the next
    counters) each waited 5 s under one intake lock, and an honest label behind them got 504 (issue
    26 D). Now they wait side by side and answer 503 (not yet recorded: not final, unlike 404), and
    the honest label is answered at once."""
    r = server.predict({"instances": reference[0][:1].tolist()})
    [real] = server.ids(r)
    prefix, counter = real[:20], int(real[20:], 16)
    forged = [{"feedback": [{"id": f"{prefix}{counter + 1000 + k:012x}", "label": 1}]} for k in range(13)]
    honest = server.predict({"instances": reference[0][1:2].tolist()})
    with ThreadPoolExecutor(14) as pool:
        slow = [pool.submit(server.feedback, body) for body in forged]
        time.sleep(0.2)  # the forged ones are in: the honest label comes behind them
        started = time.monotonic()
        ok = server.feedback({"feedback": [{"id": server.ids(honest)[0], "label": int(reference[1][1])}]})
        took = time.monotonic() - started
        codes = [f.result().status_code for f in slow]
    assert ok.status_code == 200, ok.text
    assert took < 4.0, f"the honest label waited {took:.1f} s behind ids it has nothing to do with"
    assert set(codes) == {503}, codes


def test_one_request_of_huge_pixels_is_answered_and_changes_nothing(server, reference):
    """Red team case A over TorchServe: 8 digits of pixels 1e18 and 3e38 are answered, counted as
    implausible, and others are still served finite, unchanged answers. (Exact equality of the
    probabilities is the unit test's, against a control model: this server is shared with other tests,
    and a version they taught may still arrive.)"""
    probe = reference[0][:8]
    settled = server.settled()  # labels of earlier tests learned and published: no version arrives meanwhile
    server.serving_version(probe.tolist(), at_least=settled["version"])
    before = probe_probs(server, probe)
    for value in (1e18, 3e38):
        r = server.predict({"instances": [[[value] * 8] * 8] * 8})
        assert r.status_code == 200, r.text
    after = probe_probs(server, probe)
    assert [max(range(10), key=p.__getitem__) for p in after] == [max(range(10), key=p.__getitem__) for p in before]
    assert all(0.0 <= v <= 1.0 for p in after for v in p), "finite probabilities, no NaN"
    status = wait_until(server.status, lambda st: st["counters"]["implausible"] >= 16 and st["counters"]["drains"]
                        and not st["accuracy"]["trusted"], 30,
                        "the worker counts the implausible inputs and says its estimate cannot be trusted")
    assert "outside" in status["accuracy"]["untrusted_reason"]
    assert status["label_free"]["nonfinite_resets"] == 0, "nothing non-finite reached the statistics"
    assert server.selfheal(server.predict({"instances": probe.tolist()}))["accuracy"] is None, \
        "the header says untrusted, not a number"
