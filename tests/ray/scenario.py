"""A Ray Serve scenario run inside its own network namespace (Ray binds every interface):
`unshare -n python tests/ray/scenario.py --mar digits.mar --work DIR --out result.json`.

A local cluster, the learner and two ingress replicas; labels by id from the replicas'
predictions; the version reaching both; one replica killed (Ray restarts it); the learner killed
right after labels were acknowledged (Ray restarts it). Every step's findings go to the JSON the
test asserts on, written as it goes, so a step that hangs leaves what came before it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import requests

KEY = "ray-test-key"
MODEL = "digits"
BASE = "http://127.0.0.1:8000"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Scenario:
    def __init__(self, out: Path) -> None:
        self.out, self.result = out, {}

    def note(self, **kw) -> None:
        self.result.update(kw)
        self.out.write_text(json.dumps(self.result, indent=1, default=str))

    def wait(self, fetch, done, timeout: float, what: str, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = fetch()
            except requests.RequestException as exc:
                value = exc
            if not isinstance(value, Exception) and done(value):
                return value
            if time.monotonic() > deadline:
                self.note(failed=f"{what}: not within {timeout:.0f} s; last: {str(value)[:800]}")
                raise SystemExit(1)
            time.sleep(interval)


def predict(rows) -> requests.Response:
    return requests.post(f"{BASE}/predictions/{MODEL}", json={"instances": rows}, timeout=60)


def replica_versions(s: Scenario, calls: int = 12) -> dict[str, int]:
    """Each ingress replica met over `calls` status requests: its member id and version."""
    seen = {}
    for _ in range(calls):
        st = requests.get(f"{BASE}/predictions/{MODEL}", headers=AUTH, timeout=30).json()
        seen[st["handler"]["worker"]] = st["version"]
    return seen


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mar", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    s = Scenario(Path(args.out))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    import ray
    import torch
    from ray import serve

    from selfheal_ray.app import deploy
    from selfheal_serving.header import parse_header

    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    deploy(args.mar, replicas=2, workdir=args.work, key=KEY)
    s.note(started_s=round(time.monotonic() - t0, 1))

    data = torch.load(Path(args.work) / "stream.pt", weights_only=True)
    x, y = data["x"], data["y"]
    ok = s.wait(lambda: predict(x[:1].tolist()), lambda r: r.status_code == 200, 120, "a first prediction")
    s.note(header=ok.headers.get("X-Selfheal"))
    bad = [predict([[1.0, 2.0]]).status_code,
           requests.post(f"{BASE}/predictions/{MODEL}", data=b"{oops", timeout=30).status_code,
           predict([[[[0.0] * 8] * 8]] * 65).status_code]
    no_key = requests.get(f"{BASE}/feedback/{MODEL}", timeout=30).status_code
    status_without_key = requests.get(f"{BASE}/predictions/{MODEL}", timeout=30).status_code
    s.note(bad_codes=bad, feedback_without_key=no_key, status_without_key=status_without_key,
           served_after_bad=predict(x[:1].tolist()).status_code)

    # labels by id for predictions from both replicas
    ids = []
    for i in range(0, 64, 8):
        ids += parse_header(predict(x[i:i + 8].tolist()).headers["X-Selfheal"])["ids"]
    body = {"feedback": [{"id": i, "label": int(t)} for i, t in zip(ids, y[:64])]}
    sent = time.monotonic()
    r = s.wait(lambda: requests.post(f"{BASE}/feedback/{MODEL}", json=body, headers=AUTH, timeout=120),
               lambda r: r.status_code == 200, 60, "labels by id accepted")
    s.note(accepted=r.json()["accepted"])
    status = s.wait(lambda: requests.get(f"{BASE}/feedback/{MODEL}", headers=AUTH, timeout=30).json(),
                    lambda st: st.get("version", 0) >= 1, 120, "a version from the labels")
    newest = status["version"]
    s.note(label_to_version_s=round(time.monotonic() - sent, 2), version=newest)
    seen = s.wait(lambda: replica_versions(s), lambda v: len(v) >= 2 and min(v.values()) >= newest, 60,
                  "both replicas on the newest version")
    s.note(replicas_on_version=seen)

    # one ingress replica killed: Ray starts another, which serves the newest version
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "SelfHealIngress" in a["name"]]
    victim = replicas[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    killed_at = time.monotonic()
    fresh = s.wait(lambda: replica_versions(s), lambda v: len(set(v) - set(seen)) >= 1 and len(v) >= 2
                   and min(v.values()) >= newest, 180, "a restarted replica serving the newest version",
                   interval=1.0)
    s.note(killed_replica=victim["name"], after_replica_restart=fresh,
           replica_restart_s=round(time.monotonic() - killed_at, 1))

    # labels acknowledged, then the learner killed at once: none of them is lost
    more = []
    for i in range(64, 128, 8):
        more += parse_header(predict(x[i:i + 8].tolist()).headers["X-Selfheal"])["ids"]
    body = {"feedback": [{"id": i, "label": int(t)} for i, t in zip(more, y[64:128])]}
    r = s.wait(lambda: requests.post(f"{BASE}/feedback/{MODEL}", json=body, headers=AUTH, timeout=120),
               lambda r: r.status_code == 200, 60, "second labels accepted")
    acknowledged = 64 + r.json()["accepted"]
    before = requests.get(f"{BASE}/feedback/{MODEL}", headers=AUTH, timeout=30).json()
    learner = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SelfHealLearner" in a["name"]][0]
    ray.kill(ray.get_actor(learner["name"], namespace=learner["namespace"]), no_restart=True)
    after = s.wait(lambda: requests.get(f"{BASE}/feedback/{MODEL}", headers=AUTH, timeout=30).json(),
                   lambda st: st.get("pid") != before["pid"] and st.get("active")
                   and st.get("absorbed", 0) >= acknowledged, 180, "a restarted learner that absorbed every label",
                   interval=1.0)
    s.note(acknowledged=acknowledged, learner_pids=[before["pid"], after["pid"]],
           log_entries=after["log"]["entries"], absorbed=after["absorbed"], version_after_restart=after["version"])
    serve.shutdown()
    ray.shutdown()
    s.note(done=True, elapsed_s=round(time.monotonic() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
