"""Servers started by tests and benchmarks survive another process taking one of their ports."""
from __future__ import annotations

import socket

import requests

from selfheal_bench.ports import _ephemeral_start, free_ports
from selfheal_bench.torchserve import TorchServe


def test_drawn_ports_are_distinct_free_and_outside_the_ephemeral_range():
    assert free_ports(0) == []
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(10000 <= p < _ephemeral_start() for p in ports)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_torchserve_that_lost_a_port_starts_again_on_new_ports(model_store, tmp_path, caplog):
    ts = TorchServe(tmp_path / "server", model_store, env={"SELFHEAL_SNAPSHOT_DIR": str(tmp_path / "snapshots")})
    with socket.socket() as taken:  # what CI met: another process bound the gRPC port first
        taken.bind(("127.0.0.1", ts.ports[3]))
        taken.listen()
        lost = ts.ports[3]
        with ts:
            assert "Address already in use" in (tmp_path / "server" / "torchserve.out").read_text()
            assert ts.ports[3] != lost
            assert "lost a port" in caplog.text
            r = requests.post(f"{ts.inference_url}/predictions/digits", json={"instances": [[[0.0] * 8] * 8]},
                              headers=ts.headers(), timeout=60)
            assert r.status_code == 200, r.text
