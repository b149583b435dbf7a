"""Checks a running selfheal container over HTTP (used by scripts/docker_test.sh).

Phase "first": /ping healthy, a prediction, a feedback round that publishes a
snapshot; prints the model version. Phase "restarted": the version given by
--expect-version is still served.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import requests

from selfheal_bench.data import as_numpy_list, corrupt, load_digits_split, resample


def wait_healthy(url: str, key: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url}/ping", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            if r.ok and r.json().get("status") == "Healthy":
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise SystemExit(f"/ping not healthy after {timeout}s")


def status(args, keys) -> dict:
    r = requests.get(f"{args.management}/models/digits?customized=true",
                     headers={"Authorization": f"Bearer {keys['management']}"}, timeout=30)
    r.raise_for_status()
    return r.json()[0]["customizedMetadata"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("phase", choices=["first", "restarted"])
    ap.add_argument("--inference", required=True)
    ap.add_argument("--management", required=True)
    ap.add_argument("--keys", required=True, help="contents of the container's key_file.json")
    ap.add_argument("--metrics", help="the metrics port's URL: selfheal's gauges must be exported there")
    ap.add_argument("--expect-version", type=int)
    args = ap.parse_args()
    keys = {k: v["key"] for k, v in json.loads(args.keys).items()}
    auth = {"Authorization": f"Bearer {keys['inference']}"}
    wait_healthy(args.inference, keys["inference"])
    _, _, x_te, y_te = load_digits_split()
    x, y = resample(x_te, y_te, 60, seed=0)
    r = requests.post(f"{args.inference}/predictions/digits", json={"instances": as_numpy_list(x[:4])},
                      headers=auth, timeout=30)
    r.raise_for_status()
    pred = r.json()
    state = dict(part.strip().split("=", 1) for part in r.headers["X-Selfheal"].split(";"))
    assert len(pred["predictions"]) == 4 and len(state["ids"].split(",")) == 4, pred
    served_version = int(state["version"])
    if args.phase == "first":
        xc = corrupt(x, "rotate", 4, seed=0)
        fb = requests.post(f"{args.management}/feedback/digits",  # the endpoint plugin, management key
                           json={"instances": as_numpy_list(xc), "labels": y.tolist()},
                           headers={"Authorization": f"Bearer {keys['management']}"}, timeout=60)
        fb.raise_for_status()
        assert fb.json()["accepted"] == len(y), fb.text
        deadline = time.monotonic() + 60  # labels are learned and published by the model's learner process
        while (version := status(args, keys)["version"]) < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert version >= 1, f"feedback should publish a snapshot, version is {version}"
        if args.metrics:  # the image's config declares selfheal's gauges (written every status interval)
            while "selfheal_model_version{" not in (text := requests.get(f"{args.metrics}/metrics", timeout=30).text) \
                    and time.monotonic() < deadline + 30:
                time.sleep(0.5)
            assert "selfheal_model_version{" in text, "selfheal's gauges are not on the metrics port"
        print(json.dumps({"version": version, "prediction": pred["predictions"][0]["label"]}))
    else:
        st = status(args, keys)
        assert served_version == args.expect_version == st["version"], (served_version, st["version"])
        print(json.dumps({"version": st["version"]}))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as exc:
        sys.exit(f"docker check failed: {exc}")
