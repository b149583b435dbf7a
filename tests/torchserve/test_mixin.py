"""SelfHealMixin in real handlers (the stock JSON one, TorchServe's VisionHandler, TorchScript), no server."""
from __future__ import annotations

import json

import pytest
import torch

from selfheal_bench.examples import data
from tests.torchserve.conftest import digits_args, np_list, rul_args, tabular_args

IMG = [[0.5] * 8] * 8
from selfheal_serving.header import parse_header


def test_stock_handler_keeps_the_answer_and_adds_headers(serve, trained, reference):
    s = serve("digits", digits_args(trained))
    x = reference[0]
    res = s.call([{"instances": np_list(x[:3])}, {"data": np_list(x[3, 0])}, np_list(x[4])])
    assert [code for code, _, _ in res] == [200, 200, 200]
    assert [len(body["predictions"]) for _, body, _ in res] == [3, 1, 1]
    first = res[0][1]["predictions"][0]
    assert set(first) == {"label", "probabilities"} and abs(sum(first["probabilities"]) - 1) < 1e-4
    _, _, headers = res[0]
    assert set(headers) == {"X-Selfheal"}, "one header: each one more costs the frontend"
    state = parse_header(headers["X-Selfheal"])
    assert state["version"] == 0 and state["drift"] is False and len(state["ids"]) == 3 and not state["detectors"]
    labels = [p["label"] for _, body, _ in res for p in body["predictions"]]
    with torch.no_grad():
        assert labels == s.handler.model(x[:5]).argmax(1).tolist()


def test_envelope_puts_selfheal_in_the_body(serve, trained, reference):
    s = serve("digits", digits_args(trained), {"envelope": True})
    [(code, body, headers)] = s.call([{"instances": np_list(reference[0][:2])}])
    assert code == 200 and set(body) == {"response", "selfheal"} and "X-Selfheal" not in headers
    assert len(body["selfheal"]["ids"]) == 2 and body["selfheal"]["model_version"] == 0
    assert body["selfheal"]["drift"]["detected"] is False and len(body["response"]["predictions"]) == 2


def test_a_batch_of_requests_beyond_max_batch_is_forwarded_in_chunks(serve, trained, reference):
    """Each request passed max_batch alone; TorchServe's batch of them together did not, and went
    into one forward unchecked (issue 26). Now it is forwarded in chunks of at most max_batch."""
    s = serve("digits", digits_args(trained), {"heal": {"max_batch": 4, "observe_every": 4}})
    x = reference[0]
    sizes: list[int] = []
    hook = s.handler.model.register_forward_hook(lambda _m, args, _out: sizes.append(len(args[0])))
    res = s.call([{"instances": np_list(x[i:i + 3])} for i in range(0, 9, 3)])
    hook.remove()
    assert sizes and max(sizes) <= 4, sizes
    assert [code for code, _, _ in res] == [200, 200, 200]
    labels = [p["label"] for _, body, _ in res for p in body["predictions"]]
    with torch.no_grad():
        assert labels == s.handler.model(x[:9]).argmax(1).tolist()
    status = s.handler.selfheal.describe()
    assert status["batches"]["largest"] == 3 and status["counters"]["predictions"] == 9


DEEP = ("[" * 1200 + "]" * 1200).encode()
BAD = [
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "shape"),
    ({"instances": []}, 400, "non-empty"),
    ({"instances": [[1, 2], [3]]}, 400, "numeric arrays"),
    ({"instances": [[[1.0] * 8] * 7]}, 400, "shape"),
    (json.dumps({"instances": [[[float("nan")] * 8] * 8]}).encode(), 400, "NaN"),
    ({"instances": [IMG] * 17}, 413, "limit"),
    ({"foo": 1}, 400, "instances"),
    (DEEP, 400, "nested deeper"),
    (b'{"data": ' + b"9" * 5000 + b"}", 400, "characters"),
    ({"data": "caf\u00e9 \u2603" * 3}, 400, "numeric"),
    ("caf\u00e9".encode("latin-1"), 400, "UTF-8"),
]


@pytest.mark.parametrize("body, code, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_answers_its_request_alone(serve, trained, body, code, words):
    s = serve("digits", digits_args(trained))
    res = s.call([{"data": IMG}, body, {"data": IMG}])
    (c0, _, _), (c1, err, _), (c2, _, _) = res
    assert (c0, c1, c2) == (200, code, 200), res
    assert words in err["message"] and err["message"].isascii() and err["code"] == code
    assert s.handler.selfheal.serving.counters["predictions"] == 2, "the bad request was not served"


def test_image_bytes_through_torchserves_vision_handler(serve, trained):
    s = serve("images", digits_args(trained)[:4] + ["--reference", str(trained["images"] / "reference.pt"),
                                                      "--handler", str(data.__file__).replace("data.py",
                                                                                               "image_handler.py")])
    blobs, labels = data.images(n=6, seed=1)
    jpeg = data.image_bytes(data.load_digits_split(0)[2][0], "JPEG")
    rows = [blobs[0], b"\x89PNG\r\n\x1a\n not really", blobs[1], jpeg]
    res = s.call(rows)
    assert [c for c, _, _ in res] == [200, 400, 200, 200], res
    assert res[0][1] == {"digit": res[0][1]["digit"], "confidence": res[0][1]["confidence"]}, "the user's answer"
    assert "could not read the request" in res[1][1]["message"] and "UnidentifiedImageError" in res[1][1]["message"]
    assert len(parse_header(res[0][2]["X-Selfheal"])["ids"]) == 1
    # multipart/form-data (curl -F data=@img.png): TorchServe hands the file under its field name
    from ts.context import RequestProcessor

    s.ctx.request_processor = [RequestProcessor({})]
    [answer] = s.handler.handle([{"data": blobs[2]}], s.ctx)
    assert set(answer) == {"digit", "confidence"}


def test_explain_and_describe_keep_working(serve, trained):
    s = serve("images", digits_args(trained)[:4] + ["--reference", str(trained["images"] / "reference.pt"),
                                                      "--handler", str(data.__file__).replace("data.py",
                                                                                               "image_handler.py")])
    blobs, _ = data.images(n=1, seed=2)
    from ts.context import RequestProcessor

    s.ctx.request_processor = [RequestProcessor({"explain": "True"})]
    [attributions] = s.handler.handle([{"body": blobs[0]}], s.ctx)
    assert torch.tensor(attributions).shape == (1, 8, 8), "BaseHandler's explain path (captum) answered"
    s.ctx.request_processor = [RequestProcessor({"describe": "True"})]
    [described] = s.handler.handle([{"body": b""}], s.ctx)
    status = json.loads(described)
    assert status["version"] == 0 and status["task"] == "classification" and status["mode"] == "heal"
    assert status["label_free"]["available"] == "input_polarity, norm_stats, prior" and status["handler"]["learner_mode"] == "off"
    assert status["monitor"]["calibrated_from"] == "given thresholds", "selfheal archive shipped the thresholds"


def test_tabular_model_with_constructor_arguments(serve, trained):
    s = serve("tabular", tabular_args(trained))
    rows = data.tabular(3, seed=9).x
    res = s.call([{"instances": np_list(rows)}, np_list(rows[0]), {"instances": [[1.0, 2.0]]}])
    assert [c for c, _, _ in res] == [200, 200, 400]
    assert "shape [10]" in res[2][1]["message"]
    assert s.handler.selfheal.serving.status()["label_free"]["available"] == "input_stats, norm_affine, prior"


def test_regression_answers_values(serve, trained):
    s = serve("rul", rul_args(trained))
    rows = data.rul(2, seed=9).x
    [(code, body, headers)] = s.call([{"instances": np_list(rows)}])
    assert code == 200 and all(isinstance(p["value"], float) for p in body["predictions"])
    st = s.handler.selfheal.serving.status()
    assert st["task"] == "regression" and set(st["drift"]["scores"]) == {"feature_shift", "output_shift"}


def test_torchscript_is_served_monitor_only(serve, trained, reference):
    s = serve("scripted", ["--weights", str(trained["images"] / "model.pt"),
                           "--reference", str(trained["images"] / "reference.pt")])
    [(code, body, _)] = s.call([{"instances": np_list(reference[0][:2])}])
    assert code == 200 and len(body["predictions"]) == 2
    st = s.handler.selfheal.describe()
    assert st["mode"] == "monitor" and st["model"]["scripted"]


def test_constructor_arguments_missing_names_the_setting(tmp_path, trained):
    from tests.torchserve.conftest import Served, archive

    args = tabular_args(trained)
    args = args[:args.index("--model-kwargs")] + args[args.index("--model-kwargs") + 2:]
    with pytest.raises(SystemExit) if False else pytest.raises(AssertionError):
        archive(tmp_path / "a", "tabular", args)  # the archive command loads the model and refuses
    kw = {"model_kwargs": {"n_features": 10}}  # incomplete kwargs reach the worker through the yaml
    model_dir = archive(tmp_path / "b", "tabular", tabular_args(trained))
    config = model_dir / "model-config.yaml"
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["handler"].update(kw)
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(RuntimeError, match="model_kwargs"):
        Served(model_dir, "tabular")


def test_a_base_handler_s_own_model_loader_is_kept():
    """The mixin came first in the MRO and silently replaced a user's own `_load_pickled_model`."""
    from ts.torch_handler.base_handler import BaseHandler

    from selfheal_torchserve import SelfHealMixin
    from selfheal_torchserve.mixin import _own_loader

    class MyBase(BaseHandler):
        def _load_pickled_model(self, model_dir, model_file, model_pt_path):
            return "mine"

    class Mine(SelfHealMixin, MyBase):
        pass

    class Stock(SelfHealMixin, BaseHandler):
        pass

    assert _own_loader(Mine) is MyBase and _own_loader(Stock) is None
    assert Mine()._load_pickled_model("d", "f", "p") == "mine"


def test_the_background_round_drains_a_batch_worth_a_pass_or_when_its_interval_is_up(serve, trained, reference):
    """A drain's cost is mostly fixed: the round writes ids every time, but monitors only once
    observe_every predictions are queued or drain_interval_s has passed."""
    s = serve("digits", digits_args(trained), {"heal": {"observe_every": 8}})
    rt, x = s.handler.selfheal, reference[0]
    _, fields = rt.serve(x[:3])
    assert not rt.drain_due(100.0, 101.0), "3 queued of 8, interval not up: no drain"
    assert rt.drain_due(101.0, 101.0), "the interval is up"
    rt.step(drain=False)
    assert rt.serving.queued == 3 and rt.serving.counters["drains"] == 0
    assert rt.storage.predictions.stats()["predictions"] == 3, "ids are written every round"
    rt.serve(x[3:8])
    assert rt.drain_due(100.0, 101.0), "observe_every queued"
    rt.step(drain=rt.drain_due(100.0, 101.0))
    assert rt.serving.queued == 0 and rt.serving.counters["drains"] == 1
