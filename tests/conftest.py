"""Shared fixtures: the demo model trained once per session, its reference, deadline-bound waits."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest
import torch

from selfheal_core.monitor.monitor import CALIBRATION_CACHE_ENV

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# One intra-op thread in the test process and in what it starts (servers, learners, scripts): the
# suite shares 2 cores with the servers it starts and with whatever else runs on the machine, and
# a parallel op waits for its slowest thread, which a busy neighbour keeps off the CPU. With two
# `yes` beside them, the two slowest core tests took 152 s on 2 threads and 49 s on 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The TorchServe frontends the suite starts (through selfheal_bench.torchserve) run a JVM that
# starts cheaply: C1 compilation only, one GC thread. A frontend then took 2.5 CPU-s to come up
# instead of 5.3 (one digits model, 4 starts), a server's whole tree 10-11 CPU-s instead of 14-15;
# the suite starts dozens. Servers live for seconds here, never long enough for C2 to pay.
# Benchmarks and deployments keep the JVM as TorchServe ships it.
os.environ.setdefault("SELFHEAL_TS_VMARGS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")

# One calibration cache for the whole run (selfheal_core.monitor.monitor, CALIBRATION_CACHE_ENV):
# the first process that simulates a reference's thresholds leaves them for every other process
# the run starts (the other xdist process, archives, servers, learners, benchmarks). The suite's
# processes simulated a few references over and over, 1-8 CPU-s each time. Made by the process
# that loads this first (xdist's controller; its workers inherit it) and removed by that one.
_OWN_CALIBRATION_CACHE = None
if not os.environ.get(CALIBRATION_CACHE_ENV):
    _OWN_CALIBRATION_CACHE = tempfile.mkdtemp(prefix="selfheal-calibration-")
    os.environ[CALIBRATION_CACHE_ENV] = _OWN_CALIBRATION_CACHE

# Ray starts its workers (every Serve replica) at nice 15 so that its own daemons stay responsive;
# beside two busy processes at nice 0 on 2 cores a replica then took 110-190 s to start, and Ray
# Serve's HTTP proxy, given 5 s to report ready three times, was killed and `serve.start` failed.
# What the Ray tests check is selfheal's, not how Ray shares a starved machine: their clusters
# run workers at the priority of everything else, and give the proxy a minute.
RAY_PATIENCE = {"RAY_worker_niceness": "0", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
                "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


# The files that take longest first (from `--durations`): `make test` runs with `--dist loadfile
# --no-loadscope-reorder`, so its two processes take files in this order, the longest while the
# other process has plenty left, and the many short files even out the end. xdist's own order
# (most tests first) left the few-test, server-heavy files for last, where one process ran them
# while the other had finished. The two files that start Ray clusters come first and third: xdist
# hands each process two files at the start (the 1st and 3rd to one, the 2nd and 4th to the
# other), so they run one after the other. Side by side, two clusters on 2 cores left a killed
# learner replica unrestarted past its test's minute.
SLOWEST_FILES = ("ray/test_ray.py", "integration/test_byom.py", "integration/test_readme.py",
                 "bench/test_benchmarks.py", "bench/test_bench_servers.py", "integration/test_workers.py",
                 "integration/test_healing.py", "core/test_healer.py", "core/test_concept.py",
                 "torchserve/test_learner_service.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {f"tests/{name}": i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep theirs


def wait_until(fetch: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str,
               interval: float = 0.1) -> T:
    """Poll `fetch()` until `done(value)`; fail the test naming `what` and the last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s; last seen: {str(value)[:1500]}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """Trained demo CNN weights and reference sample (train_demo.py's output)."""
    from selfheal_bench.train import save_demo

    out = tmp_path_factory.mktemp("model")
    save_demo(out)
    return out


@pytest.fixture(scope="session")
def digits():
    """(x_train, y_train, x_test, y_test) of the digits split the demo uses."""
    from selfheal_bench.data import load_digits_split

    return load_digits_split(seed=0)


@pytest.fixture()
def demo_model(demo_model_dir):
    from selfheal_bench.models import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(torch.load(demo_model_dir / "digits_cnn.pt", weights_only=True))
    return model.eval()


@pytest.fixture()
def reference(demo_model_dir):
    ref = torch.load(demo_model_dir / "reference.pt", weights_only=True)
    return ref["inputs"], ref["labels"]


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=300,
                     help="HTTP fuzz cases per route group (CI: short; e.g. 3000 for a long run)")


@pytest.fixture(scope="session")
def pg_url():
    """A real PostgreSQL on loopback: SELFHEAL_TEST_PG_URL if given, else one started for the session.

    Skipped with the reason when no server can be started here, unless SELFHEAL_REQUIRE_PG=1
    (.ci/run sets it, and installs PostgreSQL), which turns that into a failure.
    """

    from selfheal_bench import pgserver

    if os.environ.get("SELFHEAL_TEST_PG_URL"):
        yield os.environ["SELFHEAL_TEST_PG_URL"]
        return
    why = pgserver.available()
    if why:
        if os.environ.get("SELFHEAL_REQUIRE_PG") == "1":
            pytest.fail(f"SELFHEAL_REQUIRE_PG=1 but {why}")
        pytest.skip(why)
    with pgserver.PostgresServer() as server:
        yield server.url


@pytest.fixture()
def pg_database(pg_url):
    """A fresh, empty database on the PostgreSQL server (dropped afterwards): its URL."""
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    psycopg = pytest.importorskip("psycopg")
    name = f"selfheal_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield urlunsplit(urlsplit(pg_url)._replace(path=f"/{name}"))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pytest_sessionfinish(session, exitstatus):
    """No server a test started outlives the session: report and end any that did."""
    import signal

    import psutil

    base = str(session.config._tmp_path_factory.getbasetemp()) if hasattr(session.config, "_tmp_path_factory") \
        else "/nonexistent"
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "org.pytorch.serve.ModelServer" in cmd and base in cmd:
            print(f"\nleftover TorchServe {proc.pid} from this session: killing its process group")
            try:
                os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    if _OWN_CALIBRATION_CACHE:
        shutil.rmtree(_OWN_CALIBRATION_CACHE, ignore_errors=True)
