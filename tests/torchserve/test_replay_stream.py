"""What `selfheal replay` reads: .npz, CSV, a folder of labelled images; bad streams named."""
from __future__ import annotations

import numpy as np
import pytest

from selfheal_bench.examples import data
from selfheal_torchserve.replay import Stream, Trace, load_stream, summarize


def test_npz_csv_and_image_folders(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.zeros((3, 2)), y=np.array([1, 0, 1]))
    s = load_stream(tmp_path / "s.npz")
    assert len(s) == 3 and s.labels == [1, 0, 1] and s.instances[0] == [0.0, 0.0]
    (tmp_path / "s.csv").write_text("a,b,label,phase\n1,2,0,clean\n3,4,1.5,shifted\n")
    c = load_stream(tmp_path / "s.csv")
    assert c.instances == [[1.0, 2.0], [3.0, 4.0]] and c.labels == [0, 1.5] and c.phases == ["clean", "shifted"]
    blobs, labels = data.images(n=2, seed=1)
    for i, (blob, label) in enumerate(zip(blobs, labels)):
        (tmp_path / "imgs" / str(int(label))).mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / str(int(label)) / f"{i}.png").write_bytes(blob)
    f = load_stream(tmp_path / "imgs")
    assert len(f) == 2 and sorted(f.labels) == sorted(int(v) for v in labels) and f.bodies[0][:4] == b"\x89PNG"


def test_bad_streams_are_named(tmp_path):
    np.savez(tmp_path / "bad.npz", inputs_wrong=np.zeros(2))
    with pytest.raises(ValueError, match="needs an array named x"):
        load_stream(tmp_path / "bad.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_stream(tmp_path / "empty")
    (tmp_path / "s.txt").write_text("x")
    with pytest.raises(ValueError, match="an .npz, a .csv or a folder"):
        load_stream(tmp_path / "s.txt")


def test_summary_windows_observed_and_estimated():
    stream = Stream(instances=[[0]] * 4, labels=[1, 1, 0, 0], phases=["a", "a", "b", "b"])
    trace = Trace(served=[1, 0, 0, 0], version=[0, 0, 1, 1], drift=[False, False, True, True],
                  estimate=[None, 0.9, 0.5, 0.7])
    s = summarize(stream, trace, 2)
    assert [w["observed"] for w in s["windows"]] == [0.5, 1.0] and s["windows"][1]["estimated"] == 0.6
    assert s["windows"][1]["drift"] == 1.0 and s["final_version"] == 1 and s["accuracy"] == 0.75
