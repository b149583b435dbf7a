"""selfheal on KServe, for real: two `python -m selfheal_kserve serve` processes and one learner on
loopback, sharing one snapshot folder; v1, v2 REST and v2 gRPC; the learner's routes behind their key."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from selfheal_bench.ports import free_port
from tests.conftest import wait_until
from tests.integration.conftest import archive

pytest.importorskip("kserve", reason="KServe is not installed: pip install -e '.[kserve]' (make test installs it)")

KEY = "test-management-key"
MODEL = "digits"


def start(args: list[str], work: Path, log_name: str) -> subprocess.Popen:
    env = {**os.environ, "SELFHEAL_MANAGEMENT_KEY": KEY, "OMP_NUM_THREADS": "1"}
    log = open(work / log_name, "wb")
    return subprocess.Popen([sys.executable, "-m", "selfheal_kserve", *args], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def reachable(url: str, **kw) -> int | None:
    try:
        return requests.get(url, timeout=2, **kw).status_code
    except requests.RequestException:
        return None


@pytest.fixture(scope="module")
def kserve(demo_model_dir, tmp_path_factory):
    """{"servers": [(http, grpc), (http, grpc)], "learner": url, "work": folder}"""
    work = tmp_path_factory.mktemp("kserve")
    mar = archive(demo_model_dir, work, 0.0) / f"{MODEL}.mar"
    learner_port = free_port()
    procs = [start(["learner", "--mar", str(mar), "--host", "127.0.0.1", "--port", str(learner_port)], work,
                   "learner.log")]
    servers = [(free_port(), free_port()) for _ in range(2)]
    for k, (http, grpc_port) in enumerate(servers):
        procs.append(start(["serve", "--mar", str(mar), "--host", "127.0.0.1", "--http-port", str(http),
                            "--grpc-port", str(grpc_port)], work, f"server{k}.log"))
    learner = f"http://127.0.0.1:{learner_port}"
    try:
        for k, (http, _) in enumerate(servers):
            wait_until(lambda: (procs[k + 1].poll(), reachable(f"http://127.0.0.1:{http}/v2/models/{MODEL}/ready")),
                       lambda r: r[0] is not None or r[1] == 200, 180, f"KServe server {k} ready")
            assert procs[k + 1].poll() is None, (work / f"server{k}.log").read_text()[-3000:]
        wait_until(lambda: (procs[0].poll(), reachable(f"{learner}/feedback/{MODEL}",
                                                       headers={"Authorization": f"Bearer {KEY}"})),
                   lambda r: r[0] is not None or r[1] == 200, 120, "the learner's intake")
        assert procs[0].poll() is None, (work / "learner.log").read_text()[-3000:]
        yield {"servers": servers, "learner": learner, "work": work}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def v1(http: int, instances) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{http}/v1/models/{MODEL}:predict", json={"instances": instances},
                         timeout=30)


def version_of(response: requests.Response) -> int:
    from selfheal_serving.header import parse_header

    return parse_header(response.headers["X-Selfheal"])["version"]


def test_v1_v2_rest_and_grpc_answer_with_prediction_ids(kserve, digits):
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
    from selfheal_serving.header import parse_header

    x = digits[2][:3].numpy()
    (http, grpc_port), _ = kserve["servers"]
    r = v1(http, x.tolist())
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 3 and "probabilities" in r.json()["predictions"][0]
    assert len(parse_header(r.headers["X-Selfheal"])["ids"]) == 3

    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = requests.post(f"http://127.0.0.1:{http}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["outputs"][0]["shape"] == [3, 10]
    ids = answer["parameters"]["selfheal_ids"].split(",")
    assert len(ids) == 3 and ids == parse_header(r.headers["X-Selfheal"])["ids"]
    assert answer["parameters"]["drift"] in ("true", "false")

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(x.shape),
                                                       contents=pb.InferTensorContents(fp32_contents=x.ravel()))
        reply = stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL, inputs=[tensor]), timeout=30)
        assert list(reply.outputs[0].shape) == [3, 10]
        assert len(reply.parameters["selfheal_ids"].string_param.split(",")) == 3
        bad = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4],
                                                    contents=pb.InferTensorContents(fp32_contents=[1, 2, 3, 4]))
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL, inputs=[bad]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shape" in err.value.details()


def test_bad_input_gets_the_4xx_torchserve_gives_and_the_server_goes_on(kserve, digits):
    (http, _), _ = kserve["servers"]
    cases = [({"instances": [[1.0, 2.0]]}, 400, "shape"),
             ({"instances": [True]}, 400, "true or false"),
             ({"instances": np.zeros((65, 1, 8, 8)).tolist()}, 413, "exceed"),
             ({"instances": digits[2][:1].tolist(), "labels": [3]}, 403, "feedback"),
             ({"rows": 1}, 400, "instances")]
    for body, code, words in cases:
        r = requests.post(f"http://127.0.0.1:{http}/v1/models/{MODEL}:predict", json=body, timeout=30)
        assert r.status_code == code, (body if len(str(body)) < 200 else code, r.text)
        assert words in r.json()["message"] and r.text.isascii()
    r = requests.post(f"http://127.0.0.1:{http}/v2/models/{MODEL}/infer", timeout=30,
                      json={"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "BOOL", "data": [True] * 64}]})
    assert r.status_code == 400 and "numeric" in r.json()["message"]
    assert v1(http, digits[2][:1].tolist()).status_code == 200


def test_the_learners_routes_need_its_key(kserve):
    url = f"{kserve['learner']}/feedback/{MODEL}"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert requests.post(url, json={"feedback": [{"id": "x", "label": 1}]}, timeout=10).status_code == 401
    r = requests.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200 and r.json()["role"] == "learner"
    r = requests.patch(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 405


def test_labels_by_id_from_one_server_publish_a_version_both_servers_serve(kserve, digits):
    from selfheal_serving.header import parse_header

    (http_a, _), (http_b, _) = kserve["servers"]
    x, y = digits[2][:64], digits[3][:64]
    ids, served_before = [], version_of(v1(http_b, x[:1].tolist()))
    for i in range(0, 64, 16):
        r = v1(http_a if i % 32 == 0 else http_b, x[i:i + 16].tolist())
        ids += parse_header(r.headers["X-Selfheal"])["ids"]
    feedback = {"feedback": [{"id": i, "label": int(t)} for i, t in zip(ids, y)]}
    auth = {"Authorization": f"Bearer {KEY}"}
    # ids are resolvable once the servers' background threads wrote them (record_interval_s)
    r = wait_until(lambda: requests.post(f"{kserve['learner']}/feedback/{MODEL}", json=feedback, headers=auth,
                                         timeout=60),
                   lambda r: r.status_code == 200, 60, "feedback by id accepted")
    assert r.json()["accepted"] == 64
    status = wait_until(lambda: requests.get(f"{kserve['learner']}/feedback/{MODEL}", headers=auth, timeout=10).json(),
                        lambda s: s.get("version", 0) > served_before, 120, "a version published from the labels")
    newest = status["version"]
    for http in (http_a, http_b):
        wait_until(lambda: version_of(v1(http, x[:1].tolist())), lambda v: v >= newest, 30,
                   f"server on {http} serving version {newest}")
