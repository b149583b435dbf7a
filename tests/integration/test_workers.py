"""Many workers and replicas heal as one: workers serve, one learner learns, everyone follows its versions."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psutil

from selfheal_bench.data import corrupt, load_digits_split, resample
from selfheal_core.storage import open_storage
from tests.conftest import wait_until


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
        r = s.predict({"instances": probe})
        return (i % len(servers), s.version(r),
                tuple(tuple(round(q, 3) for q in p["probabilities"]) for p in r.json()["predictions"]))
    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(one, range(rounds)))


def wait_converged(servers, probe, version: int, timeout: float = 60.0) -> set[tuple]:
    """Until every server and worker answers from `version` with one set of outputs."""
    return wait_until(lambda: served_versions(servers, probe),
                      lambda seen: len({(v, p) for _, v, p in seen}) == 1 and min(v for _, v, _ in seen) == version,
                      timeout, f"every worker serves version {version}")


def send_concurrently(servers, x, y, chunk: int = 10) -> int:
    def one(i):
        s = servers[(i // chunk) % len(servers)]
        r = s.feedback({"instances": x[i:i + chunk].tolist(), "labels": y[i:i + chunk].tolist()})
        assert r.status_code == 200, r.text
        return r.json()["accepted"]
    with ThreadPoolExecutor(6) as pool:
        return sum(pool.map(one, range(0, len(y), chunk)))


def test_two_workers_serve_one_learner_learns(start_server, two_worker_store):
    x, y = labelled(200, seed=11)
    probe = probe_inputs()
    with start_server(store=two_worker_store) as server:
        server.ts.wait_ready(120, workers=2)
        workers = server.ts.worker_pids()
        assert len(workers) == 2
        # feedback by id right after the answer, whichever worker served it: every id resolves
        for k in range(40):
            r = server.predict({"instances": x[k:k + 1].tolist()})
            fb = server.feedback({"feedback": [{"id": server.ids(r)[0], "label": int(y[k])}]})
            assert fb.status_code == 200, (k, fb.text)
        assert send_concurrently([server], x[40:], y[40:]) == 160
        status = server.settled()
        assert status["log"]["entries"] == 200, "every accepted label is in the one shared log"
        wait_converged([server], probe, status["version"])
        board = open_storage("digits", server.snapshots / "digits").status.read(30)
    # the process that trains is the learner, not a worker
    learners = [r for r in board.values() if r["role"] == "learner" and r["active"]]
    assert len(learners) == 1 and learners[0]["counters"]["updates"] > 0
    assert learners[0]["pid"] not in workers
    worker_records = [r for r in board.values() if r["role"] == "worker"]
    assert {r["pid"] for r in worker_records} == set(workers)
    assert all(r["optimizer_steps"] == 0 for r in worker_records), "a worker took a gradient step"


def test_replicas_sharing_a_store_converge(start_server, one_second_store, tmp_path):
    snapshots = tmp_path / "shared"
    probe = probe_inputs()
    x, y = labelled(120, seed=12)
    with start_server(snapshots, one_second_store) as a, start_server(snapshots, one_second_store) as b:
        assert a.feedback({"instances": x[:60].tolist(), "labels": y[:60].tolist()}).status_code == 200
        assert b.feedback({"instances": x[60:].tolist(), "labels": y[60:].tolist()}).status_code == 200
        status = wait_until(lambda: [s.feedback_status() for s in (a, b)],
                            lambda sts: all(st["log"]["entries"] == 120 for st in sts)
                            and any(st["active"] and st["absorbed"] == 120 for st in sts), 60,
                            "one of the two learners absorbs all 120 labels")
        active = next(st for st in status if st["active"])
        version = wait_until(lambda: open_storage("digits", snapshots / "digits").snapshots.load_latest()[1],
                             lambda meta: meta["feedback_seq"] == 120, 60, "a version holding every label")["version"]
        seen = wait_converged([a, b], probe, version)
        assert {s for s, _, _ in seen} == {0, 1} and active["version"] >= 1


def test_replicas_share_postgres_and_no_directory(start_server, one_second_store, tmp_path, pg_database):
    """Two instances with no directory in common, log, ids, snapshots and status in PostgreSQL: an id
    served by one replica takes feedback on the other; one learner learns; both serve its versions."""
    env = {"SELFHEAL_LOG_URL": pg_database}
    probe = probe_inputs()
    x, y = labelled(120, seed=13)
    _, _, x_te, y_te = load_digits_split(seed=0)
    with start_server(tmp_path / "a", one_second_store, env) as a, \
            start_server(tmp_path / "b", one_second_store, env) as b:
        # clean inputs: label-free correction follows each replica's own traffic, and the outputs
        # compared below must differ only by what the learner published
        r = a.predict({"instances": x_te[:20].tolist()})
        by_id = {"feedback": [{"id": pid, "label": int(y_te[i])} for i, pid in enumerate(a.ids(r))]}
        assert b.feedback(by_id).status_code == 200, "b resolves a's prediction ids through PostgreSQL"
        assert b.feedback(by_id).status_code == 409, "and takes them once"
        assert a.feedback({"instances": x[20:70].tolist(), "labels": y[20:70].tolist()}).status_code == 200
        assert b.feedback({"instances": x[70:].tolist(), "labels": y[70:].tolist()}).status_code == 200
        store = open_storage("digits", tmp_path / "unused", pg_database)
        meta = wait_until(lambda: store.snapshots.load_latest(), lambda got: got and got[1]["feedback_seq"] == 120,
                          60, "a version holding all 120 labels")[1]
        seen = wait_converged([a, b], probe, meta["version"])
        assert {s for s, _, _ in seen} == {0, 1}
        learners = [r for r in store.status.read(30).values() if r["role"] == "learner"]
        assert sorted(r["active"] for r in learners) == [False, True], "one learner per deployment"
    for d in ("a", "b"):
        assert not list((tmp_path / d).rglob("*")), "nothing written to the replicas' directories"


def test_feedback_while_the_learner_publishes_never_blocks(start_server):
    """The interleaving that deadlocked the old design (a snapshot being written while feedback
    arrives) now only shares the log: 24 concurrent feedback requests while every update publishes."""
    x, y = labelled(240, seed=14)
    with start_server() as server:
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: server.feedback({"instances": x[i:i + 10].tolist(),
                                                             "labels": y[i:i + 10].tolist()}).status_code,
                                  range(0, 240, 10)))
        assert codes == [200] * 24
        status = server.settled()
        assert status["absorbed"] == 240 and status["counters"]["publishes"] >= 2


def test_learner_process_is_restarted_and_resumes(start_server, tmp_path):
    """SIGKILL the learner mid-stream: the supervising worker restarts it, it resumes from the newest
    version and the log, no accepted label is lost and the lineage continues."""
    x, y = labelled(160, seed=15)
    with start_server(tmp_path / "snaps") as server:
        for i in range(0, 80, 40):
            assert server.feedback({"instances": x[i:i + 40].tolist(), "labels": y[i:i + 40].tolist()}).ok
        first = server.settled()
        assert "pid" in first, first
        old_pid = first["pid"]
        for i in range(80, 160, 40):
            assert server.feedback({"instances": x[i:i + 40].tolist(), "labels": y[i:i + 40].tolist()}).ok
        psutil.Process(old_pid).kill()
        status = wait_until(lambda: _status_or_none(server), lambda st: st is not None and st.get("pid") != old_pid
                            and st["absorbed"] == 160 and st.get("lag") == 0, 120,
                            "a restarted learner absorbs every accepted label")
        assert status["log"]["entries"] == 160
        store = open_storage("digits", tmp_path / "snaps" / "digits").snapshots
        status = server.settled()
        metas = [store.load(v)[1] for v in store.versions()]
        assert all(m["based_on"] == m["parent"] for m in metas), "each version is based on the one before"
        assert metas[-1]["feedback_seq"] == 160 and status["version"] == metas[-1]["version"]


def _status_or_none(server):
    r = server.ts.feedback(server.model, method="get")
    return r.json() if r.ok else None
