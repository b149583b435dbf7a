"""Settings and the CLI checked whole (issue 26 L, the newcomer's path): every mistake is named with
exit status 2 or a ValueError, never a traceback or a silent acceptance."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from selfheal_torchserve import cli
from selfheal_serving.settings import HandlerSettings
from tests.torchserve.conftest import digits_args


@pytest.mark.parametrize("section, words", [
    ({"max_instances": "abc"}, "max_instances must be an integer"),
    ([1, 2], "must be a mapping"),
    ({"json_limits": {"max_depth": "x"}}, "json_limits.max_depth"),
    ({"json_limits": {"max_depth": -1}}, "json_limits.max_depth"),
    ({"json_limits": {"depth": 3}}, "unknown handler setting json_limits keys ['depth']"),
    ({"heal": {"learn": {"lr": float("inf")}}}, "lr must be a finite number"),
    ({"heal": {"observe_every": 9000}}, "observe_every (9000) must be <= HealConfig.max_queued"),
    ({"drain_interval_s": 1e-9}, "drain_interval_s must be a number in [0.01"),
    ({"reference_file": "../../../../etc/passwd"}, "inside the .mar"),
    ({"snapshot_keep": 1e12}, "snapshot_keep must be an integer in [1, 1000]"),
    ({"my_threshold": 0.3}, "handler.custom"),
])
def test_handler_settings_name_what_is_wrong(section, words):
    with pytest.raises(ValueError) as err:
        HandlerSettings.from_yaml(section)
    assert words in str(err.value), str(err.value)


def test_a_handler_s_own_settings_have_a_place():
    assert HandlerSettings.from_yaml({"custom": {"my_threshold": 0.3}}).custom == {"my_threshold": 0.3}
    with pytest.raises(ValueError, match="max_instances"):
        HandlerSettings(max_instances=0)  # checked at construction, however it is built


def test_archive_names_bad_config_files(trained, tmp_path, capsys):
    bad = {"invalid.yaml": "handler: [unclosed", "list.yaml": yaml.safe_dump([1, 2]),
           "handler-list.yaml": yaml.safe_dump({"handler": [1, 2]}),
           "type.yaml": yaml.safe_dump({"handler": {"max_instances": "abc"}})}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        code = cli.main(["archive", "--name", "m", "--config", str(tmp_path / name),
                         "--export-path", str(tmp_path / "store"), *digits_args(trained)])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and err.startswith("selfheal archive:"), (name, err)


def test_reference_refuses_nan_inputs_and_fractional_labels(tmp_path, capsys):
    x = np.random.default_rng(0).random((40, 3)).astype(np.float32)
    x[3, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(40) % 3)
    assert cli.main(["reference", "--inputs", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                     "--out", str(tmp_path / "r.pt")]) == 2
    assert "NaN" in capsys.readouterr().err and not (tmp_path / "r.pt").exists()
    np.save(tmp_path / "x.npy", np.nan_to_num(x))
    np.save(tmp_path / "y.npy", np.full(40, 5.5))
    assert cli.main(["reference", "--inputs", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                     "--out", str(tmp_path / "r.pt")]) == 2
    assert "5.5 is not a whole number" in capsys.readouterr().err


def test_paths_prints_every_path_and_writes_a_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["paths", "--write-config", "ts.properties"]) == 0
    out = capsys.readouterr().out
    assert "metrics_config=/" in out and "model_store=/" in out and "plugins_path" in out
    written = (tmp_path / "ts.properties").read_text()
    assert f"model_store={tmp_path / 'model_store'}" in written and "metrics_config=/" in written
