"""A targeted relabelling over HTTP: reported on GET /feedback, decided on POST /feedback/{m}/quarantine."""
from __future__ import annotations

import torch

from tests.conftest import wait_until
from tests.core.test_concept import relabelled


def test_relabelling_is_reported_and_an_operator_discards_it(start_server, digits):
    x, y = relabelled(digits, 160, 0.3, seed=7)
    with start_server() as server:
        for i in range(0, 160, 16):
            r = server.feedback({"instances": x[i:i + 16].tolist(), "labels": y[i:i + 16].tolist()})
            assert r.status_code == 200, r.text
        status = wait_until(server.feedback_status,
                            lambda st: any(p["pair"] == [3, 8] for p in (st.get("concept") or {}).get("suspected", [])),
                            60, "GET /feedback reports the 3 -> 8 relabelling")
        [pair] = [p for p in status["concept"]["suspected"] if p["pair"] == [3, 8]]
        assert pair["state"] == "suspected" and pair["count"] >= 5 and pair["learned"] == 0
        route = "/quarantine"
        bad = server.ts.feedback(server.model + route, {"pair": [3, 8], "action": "maybe"})
        assert bad.status_code == 400 and "approve" in bad.json()["message"]
        assert server.ts.feedback(server.model + route, {"pair": [3, 8], "action": "discard"}, key=None).status_code \
            in (400, 401), "decisions need the management key"
        unknown = server.ts.feedback(server.model + route, {"pair": [2, 5], "action": "discard"})
        assert unknown.status_code == 404, unknown.text
        done = server.ts.feedback(server.model + route, {"pair": [3, 8], "action": "discard"})
        assert done.status_code == 200 and done.json()["action"] == "discard", done.text
        after = wait_until(server.feedback_status,
                           lambda st: [p["state"] for p in st["concept"]["suspected"] if p["pair"] == [3, 8]]
                           == ["discarded"], 60, "the pair is discarded")
        assert after["concept"]["held"] == 0
        probe = x[(y == 8)][:8]
        r = server.predict({"instances": probe.tolist()})
        assert r.status_code == 200 and torch.tensor([p["label"] for p in r.json()["predictions"]]).numel() == 8
