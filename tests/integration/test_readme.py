"""The README's "Serve your own model" commands run as written.

They run in a scratch directory that looks like the repository root to them
(`.venv`, `selfheal_bench`, `selfheal_torchserve`, `model-config.yaml`, an empty `model_store`) with the
repository's `config.properties` on free ports, and their own TMPDIR, so
`torchserve --stop` stops only the server they started.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import psutil
import pytest

from selfheal_bench.torchserve import PLUGINS, REPO, free_ports
from tests.conftest import RAY_PATIENCE

PORTS = ("8080", "8081", "8082", "7070", "7071")


STEP_3 = "# 3. serve it"  # where "Serve your own model" starts serving what steps 1-2 built


def copy_archived(archived, dest) -> None:
    """What steps 1-2 left (build/, model_store/), copied into `dest` for a test of its own."""
    shutil.copytree(archived / "build", dest / "build", symlinks=True)
    shutil.copytree(archived / "model_store", dest / "model_store")


def readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(f"## {heading}"):]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_serve_your_own_model_commands_run_as_written(archived, tmp_path):
    """Steps 3-5 as written, in a copy of the folder steps 1-2 (the `archived` fixture, as written too)
    left: training, the reference and the archive cost half a minute of CPU, once for the file."""
    own = readme_block("Serve your own model")
    script = own[own.index(STEP_3):]
    ports = [str(p) for p in free_ports(5)]
    config = (REPO / "config.properties").read_text()
    for old, new in zip(PORTS, ports):
        config = config.replace(f":{old}", f":{new}").replace(f"={old}", f"={new}")
        script = script.replace(f":{old}/", f":{new}/")
    (tmp_path / "config.properties").write_text(config.replace("plugins_path=build/plugins",
                                                               f"plugins_path={PLUGINS}"))
    for name in (".venv", "selfheal_bench", "selfheal_torchserve"):  # config.properties names metrics.yaml in it
        (tmp_path / name).symlink_to(REPO / name)
    copy_archived(archived, tmp_path)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "TEMP": str(tmp_path / "tmp"),
           "LOG_LOCATION": str(tmp_path / "logs"), "METRICS_LOCATION": str(tmp_path / "logs")}
    env.pop("SELFHEAL_SNAPSHOT_DIR", None)
    try:
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run([str(REPO / ".venv" / "bin" / "torchserve"), "--stop"], cwd=tmp_path, env=env,
                       capture_output=True, timeout=120)
    out = run.stdout
    (tmp_path / "stdout.txt").write_text(out)  # the whole transcript, for a failure's diagnosis
    (tmp_path / "stderr.txt").write_text(run.stderr)
    assert run.returncode == 0, f"exit {run.returncode}\n{out[-3000:]}\n{run.stderr[-3000:]}"
    assert re.search(r"X-Selfheal: version=0; drift=false(; accuracy=[0-9.]+)?; ids=", out) and '"predictions"' in out
    assert '"accepted": 1' in out, f"{out[-2000:]}\n{run.stderr[-1000:]}"
    assert '"model": "tabular"' in out and '"log":' in out
    # `selfheal stop` returned only once every process TorchServe started was gone (torchserve
    # --stop alone returns while the worker and the learner live on for seconds)
    stopped = re.search(r"stopped TorchServe \(pid \d+\) and every process it started \(pids \[([\d, ]+)\]\)", out)
    assert stopped, out[-2000:]
    pids = [int(p) for p in stopped.group(1).split(",")]
    assert len(pids) >= 3  # the frontend, the worker, the learner
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def archived(tmp_path_factory):
    """Steps 1-2 of "Serve your own model" run once: the folder holding build/ and model_store/."""
    own = readme_block("Serve your own model")
    work = tmp_path_factory.mktemp("archived")
    for name in (".venv", "selfheal_bench"):
        (work / name).symlink_to(REPO / name)
    (work / "model-config.yaml").write_text((REPO / "model-config.yaml").read_text())
    (work / "model_store").mkdir()
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", own[:own.index(STEP_3)]], cwd=work,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"steps 1-2: exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    return work


def run_after_archive(archived, tmp_path, heading: str, prefix: list[str] = (), ports: tuple[str, ...] = (),
                      **env_extra: str) -> str:
    """The README block under `heading` as written (its `ports` swapped for free ones), in a folder
    holding steps 1-2's output, with `prefix` before bash (a network namespace); its stdout.
    Whatever the script started in the background is killed with its session."""
    import signal

    script = readme_block(heading)
    # in one pass: swapped one at a time, a free port that contains a later README port (48087 for
    # 8085, then 8087 -> 50933) became 450933 and the script waited on a port that cannot exist
    swap = dict(zip(ports, map(str, free_ports(len(ports)))))
    if swap:
        script = re.sub(r"(?<!\d)(" + "|".join(map(re.escape, swap)) + r")(?!\d)", lambda m: swap[m.group(1)], script)
    for name in (".venv", "selfheal_bench"):
        (tmp_path / name).symlink_to(REPO / name)
    copy_archived(archived, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("SELFHEAL_SNAPSHOT_DIR", "SELFHEAL_LOG_URL")}
    env.update(env_extra)
    # output to files, not pipes: the servers the script left in the background hold a pipe open, so
    # a script that failed early would be reported only after the whole timeout
    with open(tmp_path / "stdout.txt", "w") as out_file, open(tmp_path / "stderr.txt", "w") as err_file:
        proc = subprocess.Popen([*prefix, "bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                                stdout=out_file, stderr=err_file, start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = (tmp_path / "stdout.txt").read_text()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    assert '"accepted": 1' in out, f"{out[-2000:]}\n{err[-1000:]}"
    return out


def test_serve_it_on_kserve_commands_run_as_written(archived, tmp_path):
    pytest.importorskip("kserve", reason="KServe is not installed: pip install -e '.[kserve]' (make test installs it)")
    out = run_after_archive(archived, tmp_path, "Serve it on KServe", ports=("8085", "8086", "8087", "8088", "8090"))
    assert re.search(r"(?i)x-selfheal: version=0; drift=false(; accuracy=[0-9.]+)?; ids=", out), out[-2000:]
    assert '"predictions"' in out


def test_serve_it_on_ray_commands_run_as_written(archived, tmp_path):
    """In a network namespace of their own: Ray's processes bind every interface."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]' (make test installs it)")
    netns = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]
    out = run_after_archive(archived, tmp_path, "Serve it on Ray Serve", prefix=[*netns, "sh", "-c", 'ip link set lo up && exec "$@"',
                                                                      "netns"],
                            HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0",  # Ray keeps a token under ~/.ray
                            **RAY_PATIENCE)
    assert '"version":' in out and '"learner":' in out, out[-2000:]
