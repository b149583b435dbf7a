"""selfheal on Ray Serve, for real: a local Ray cluster in a network namespace of its own (Ray binds
every interface), two ingress replicas and the learner (tests/ray/scenario.py runs it there)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import RAY_PATIENCE, REPO
from tests.integration.conftest import archive

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]' (make test installs it)")


@pytest.fixture(scope="module")
def ray_run(demo_model_dir, digits, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("ray")
    mar = archive(demo_model_dir, work, 0.0) / "digits.mar"
    torch.save({"x": digits[2][:128], "y": digits[3][:128]}, work / "stream.pt")
    out = work / "result.json"
    netns = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to keep Ray on a network namespace of its own")
    # HOME: Ray writes its cluster token under ~/.ray; this one lives and dies with the test
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "HOME": str(work), **RAY_PATIENCE}
    try:
        run = subprocess.run([*netns, sys.executable, str(REPO / "tests" / "ray" / "scenario.py"), "--mar", str(mar),
                              "--work", str(work), "--out", str(out)], env=env, capture_output=True, text=True,
                             timeout=540)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the Ray scenario ran past 540 s; so far: {out.read_text() if out.exists() else 'nothing'}\n"
                    f"{(exc.stderr or b'')[-2000:]}")
    result = json.loads(out.read_text()) if out.exists() else {}
    result["_log"] = (run.stdout + run.stderr)[-4000:]
    result["_rc"] = run.returncode
    return result


def check(result: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in result]
    assert not missing, f"the scenario stopped before {missing}: {result.get('failed')}\n{result['_log']}"


def test_two_replicas_serve_and_refuse_bad_input_alone(ray_run):
    check(ray_run, "header", "bad_codes")
    assert ray_run["header"].startswith("version=0; drift=")
    assert ray_run["bad_codes"] == [400, 400, 413]
    assert ray_run["served_after_bad"] == 200


def test_the_learners_routes_and_a_replicas_status_need_the_key(ray_run):
    check(ray_run, "feedback_without_key")
    assert ray_run["feedback_without_key"] == 401
    assert ray_run["status_without_key"] == 401


def test_labels_by_id_publish_a_version_both_replicas_serve(ray_run):
    check(ray_run, "accepted", "replicas_on_version")
    assert ray_run["accepted"] == 64
    versions = ray_run["replicas_on_version"]
    assert len(versions) >= 2 and min(versions.values()) >= ray_run["version"] >= 1


def test_a_replica_killed_is_restarted_by_ray_and_serves_the_newest_version(ray_run):
    check(ray_run, "after_replica_restart")
    fresh = set(ray_run["after_replica_restart"]) - set(ray_run["replicas_on_version"])
    assert fresh and min(ray_run["after_replica_restart"].values()) >= ray_run["version"]


def test_a_learner_killed_is_restarted_and_no_acknowledged_label_is_lost(ray_run):
    check(ray_run, "absorbed", "done")
    pids = ray_run["learner_pids"]
    assert pids[0] != pids[1]
    assert ray_run["log_entries"] == ray_run["acknowledged"] == 128
    assert ray_run["absorbed"] >= 128
    assert ray_run["_rc"] == 0, ray_run["_log"]


def test_replicas_on_more_than_one_node_refuse_to_start_without_postgresql(demo_model_dir, tmp_path, monkeypatch):
    from selfheal_ray import app
    from selfheal_serving.bundle import open_bundle

    bundle = open_bundle(archive(demo_model_dir, tmp_path, 0.0) / "digits.mar")
    monkeypatch.setattr(app, "_alive_nodes", lambda: 2)
    with pytest.raises(RuntimeError, match="log_url"):
        app._storage(bundle, str(tmp_path))
    monkeypatch.setattr(app, "_alive_nodes", lambda: 1)  # one machine: its snapshot folder is shared
    app._storage(bundle, str(tmp_path)).close()


def test_the_serve_config_fits_rays_schema_and_builds_both_applications(tmp_path, demo_model_dir):
    """deploy/ray/serve_config.yaml against Ray Serve's own schema; its builders with its args."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from selfheal_ray import app

    config = yaml.safe_load((REPO / "deploy" / "ray" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert {a.name for a in schema.applications} == {"digits", "digits-learner"}
    for a in schema.applications:
        module, name = a.import_path.split(":")
        assert module == "selfheal_ray.app"
        built = getattr(app, name)(dict(a.args))  # a bound application; nothing starts
        assert built is not None
    first = {k: v for k, v in config["applications"][0].items() if k != "import_path"}
    with pytest.raises(ValueError):  # the check can fail: an application without its import path
        ServeDeploySchema.model_validate(dict(config, applications=[first]))
