"""A .mar unpacked for Ray Serve and KServe (selfheal_serving.bundle.unpacked): once per content,
not once per process, since replicas are stopped by signals that leave no chance to clean up."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import zipfile

import pytest

from selfheal_serving.bundle import unpacked


def make_mar(path, body: str) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "m"}}))
        z.writestr("model.py", body)


@pytest.fixture()
def tmp_root(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp" / f"selfheal-mar-{os.getuid()}"


def test_one_folder_per_archive_content_whoever_unpacks_it(tmp_path, tmp_root):
    a, b = tmp_path / "a.mar", tmp_path / "b.mar"
    make_mar(a, "A = 1\n")
    make_mar(b, "B = 2\n")
    first = unpacked(a)
    assert unpacked(a) == first and (first / "model.py").read_text() == "A = 1\n"
    assert unpacked(b) != first
    assert tmp_root.stat().st_mode & 0o777 == 0o700
    # processes killed by SIGKILL after unpacking (a Ray actor's end) leave only the one folder
    code = ("import os, signal, sys, tempfile; from pathlib import Path; tempfile.tempdir = sys.argv[2];"
            "from selfheal_serving.bundle import unpacked; unpacked(Path(sys.argv[1]));"
            "print('unpacked', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    for _ in range(2):  # the first unpacks, the second finds it
        run = subprocess.run([sys.executable, "-c", code, str(a), str(tmp_path / "tmp")], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == -signal.SIGKILL and "unpacked" in run.stdout, run.stderr[-2000:]
    assert sorted(p.name for p in tmp_root.iterdir()) == sorted([first.name, unpacked(b).name])


def test_a_folder_a_temp_cleaner_thinned_is_unpacked_again(tmp_path, tmp_root):
    a = tmp_path / "a.mar"
    make_mar(a, "A = 1\n")
    folder = unpacked(a)
    (folder / "model.py").unlink()
    assert unpacked(a) == folder and (folder / "model.py").read_text() == "A = 1\n"
    (folder / "model.py").write_text("A")  # cut short
    assert (unpacked(a) / "model.py").read_text() == "A = 1\n"
    assert [p.name for p in tmp_root.iterdir()] == [folder.name]


def test_a_shared_folder_others_may_write_is_not_used(tmp_path, tmp_root):
    a = tmp_path / "a.mar"
    make_mar(a, "A = 1\n")
    tmp_root.mkdir(mode=0o777)
    tmp_root.chmod(0o777)  # another user could plant a model file here
    folder = unpacked(a)
    assert tmp_root not in folder.parents and (folder / "model.py").read_text() == "A = 1\n"


def test_a_file_that_is_not_a_zip_is_named(tmp_path, tmp_root):
    bad = tmp_path / "bad.mar"
    bad.write_text("not a zip")
    with pytest.raises(ValueError, match="is not a .mar"):
        unpacked(bad)
