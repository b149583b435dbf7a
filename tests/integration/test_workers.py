"""Many workers and replicas heal as one: shared store, one publisher, every worker follows."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from selfheal_bench.data import corrupt, load_digits_split, resample


def probe_inputs() -> list:
    """A fixed, class-balanced clean probe: repeating it must not look like label shift."""
    _, _, x_te, y_te = load_digits_split(seed=0)
    idx = [int((y_te == k).nonzero()[i]) for i in range(3) for k in range(10)]
    return x_te[idx].tolist()


def labelled(n: int, seed: int):
    _, _, x_te, y_te = load_digits_split(seed=0)
    x, y = resample(x_te, y_te, n, seed=seed)
    return corrupt(x, "rotate", 4, seed=seed), y


def served_versions(servers, probe, rounds: int = 48) -> set[tuple]:
    """(server, model_version, probabilities to 3 decimals) seen over concurrent requests, which
    spread over the workers. Rounded: a request batched with others differs in the last float bits."""
    def one(i):
        s = servers[i % len(servers)]
        out = s.predict({"instances": probe}).json()
        return (i % len(servers), out["model_version"],
                tuple(tuple(round(q, 3) for q in p["probabilities"]) for p in out["predictions"]))
    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(one, range(rounds)))


def wait_converged(servers, probe, timeout: float = 30.0) -> set[tuple]:
    """Until every server and worker answers from one published version (>= 1) with one set of outputs."""
    deadline = time.monotonic() + timeout
    while True:
        seen = served_versions(servers, probe)
        if (len({(v, p) for _, v, p in seen}) == 1 and min(v for _, v, _ in seen) >= 1) \
                or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def send_concurrently(servers, x, y, chunk: int = 10) -> int:
    def one(i):
        s = servers[(i // chunk) % len(servers)]
        r = s.feedback({"instances": x[i:i + chunk].tolist(), "labels": y[i:i + chunk].tolist()})
        assert r.status_code == 200, r.text
        return r.json()["accepted"]
    with ThreadPoolExecutor(6) as pool:
        return sum(pool.map(one, range(0, len(y), chunk)))


def test_two_workers_converge_and_lose_no_label(start_server, two_worker_store):
    x, y = labelled(200, seed=11)
    probe = probe_inputs()
    with start_server(store=two_worker_store) as server:
        server.ts.wait_ready(120, workers=2)
        assert len(server.ts.worker_pids()) == 2
        assert send_concurrently([server], x, y) == 200
        status = server.feedback_status()
        assert status["log"]["entries"] == 200, "every accepted label is in the one shared log"
        seen = wait_converged([server], probe)
        versions = {v for _, v, _ in seen}
        assert len({(v, p) for _, v, p in seen}) == 1 and min(versions) >= 1, seen
        log_text = (server.ts.workdir / "logs" / "model_log.log").read_text()
    # Both workers took part: one holds the publisher lease, the other loaded what it published.
    assert log_text.count("publisher lease taken") == 1
    assert "resumed from snapshot" in log_text


def test_replicas_sharing_a_store_converge(start_server, one_second_store, tmp_path):
    snapshots = tmp_path / "shared"
    probe = probe_inputs()
    x, y = labelled(120, seed=12)
    with start_server(snapshots, one_second_store) as a, start_server(snapshots, one_second_store) as b:
        assert a.feedback({"instances": x[:60].tolist(), "labels": y[:60].tolist()}).status_code == 200
        assert b.feedback({"instances": x[60:].tolist(), "labels": y[60:].tolist()}).status_code == 200
        seen = wait_converged([a, b], probe)
        assert len({(v, p) for _, v, p in seen}) == 1 and {s for s, _, _ in seen} == {0, 1}, seen
        (_, version, _), = {(0, v, p) for _, v, p in seen}
        assert version >= 1
        for s in (a, b):
            st = s.feedback_status()
            assert st["log"]["entries"] == 120 and st["log"]["absorbed"] == st["log"]["last_seq"]


def test_replicas_share_a_postgres_log(start_server, one_second_store, tmp_path, pg_database):
    """Two instances, one model store, the feedback log and prediction ids in PostgreSQL: an id
    served by one replica takes feedback on the other; both absorb every label and converge."""
    snapshots = tmp_path / "shared"
    env = {"SELFHEAL_LOG_URL": pg_database}
    probe = probe_inputs()
    x, y = labelled(120, seed=13)
    with start_server(snapshots, one_second_store, env) as a, start_server(snapshots, one_second_store, env) as b:
        served = a.predict({"instances": x[:20].tolist()}).json()["predictions"]
        time.sleep(0.5)  # ids are written by a's background thread within a drain interval
        by_id = {"feedback": [{"id": p["id"], "label": int(y[i])} for i, p in enumerate(served)]}
        assert b.feedback(by_id).status_code == 200, "b resolves a's prediction ids through PostgreSQL"
        assert b.feedback(by_id).status_code == 409, "and takes them once"
        assert a.feedback({"instances": x[20:70].tolist(), "labels": y[20:70].tolist()}).status_code == 200
        assert b.feedback({"instances": x[70:].tolist(), "labels": y[70:].tolist()}).status_code == 200
        seen = wait_converged([a, b], probe)
        assert len({(v, p) for _, v, p in seen}) == 1 and {s for s, _, _ in seen} == {0, 1}, seen
        for s in (a, b):
            st = s.feedback_status()
            assert st["log"]["entries"] == 120 and st["log"]["absorbed"] == st["log"]["last_seq"] == 120, st
        assert not list(snapshots.glob("digits/*.sqlite")), "no SQLite log beside the snapshots"
