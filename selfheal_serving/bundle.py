"""A model's files as every server reads them: a `.mar` (what `selfheal archive` writes) or its
unpacked folder.

The same archive serves on TorchServe, KServe and Ray Serve with the same
settings: the model (eager: the model file and its state_dict, built as the
`handler:` section says; or TorchScript), the reference sample, the detectors'
calibration and the model-config (`MAR-INF/MANIFEST.json` names the files).
Servers other than TorchServe read numeric instances themselves
(`selfheal_serving.parsing`), so the handler file in the archive is not run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from selfheal_serving.loading import build_model, load_reference
from selfheal_serving.runtime import load_calibration
from selfheal_serving.settings import HandlerSettings


@dataclass
class ModelBundle:
    name: str
    folder: Path  # the unpacked archive (for a .mar: `unpacked(path)`)
    model: torch.nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor | None
    settings: HandlerSettings
    calibration: dict | None


def unpacked(path: Path) -> Path:
    """The .mar at `path` unpacked once per user and content: `<tmp>/selfheal-mar-<uid>/<digest>`.

    Replicas and model servers are stopped by signals (Ray kills its actors; a KServe server is
    sent SIGTERM), so a folder of their own would outlive every one of them: one per start. Named
    by the archive's digest, a restarted replica reads the folder its predecessor unpacked, and
    replicas of one archive share it. It is unpacked beside its place and renamed into it, so a
    reader never sees half an archive; one found incomplete (a temp cleaner aged files out of it)
    is unpacked again. The per-user folder must be this user's and writable by no one else (the
    model file in it is imported); where it is not, the archive goes to a private folder of its
    own."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    try:
        with zipfile.ZipFile(path) as z:
            members = {i.filename.rstrip("/"): i.file_size for i in z.infolist() if not i.is_dir()}
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a .mar (a zip archive)") from None
    root = Path(tempfile.gettempdir()) / f"selfheal-mar-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        st = root.lstat()
        private = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
    except OSError:
        private = False
    if not private:
        root = Path(tempfile.mkdtemp(prefix="selfheal-mar-"))
    folder = root / digest.hexdigest()[:32]

    def complete() -> bool:
        try:
            return all((folder / name).stat().st_size == size for name, size in members.items())
        except OSError:
            return False

    if complete():
        return folder
    part = Path(tempfile.mkdtemp(prefix=".part-", dir=root))
    try:
        with zipfile.ZipFile(path) as z:
            z.extractall(part)
        if folder.exists():  # incomplete: set aside, replaced at once by the whole archive
            shutil.rmtree(folder.rename(Path(tempfile.mkdtemp(prefix=".old-", dir=root)) / "old"),
                          ignore_errors=True)
        part.rename(folder)
    except OSError:
        if not complete():  # not another process's rename first
            raise
    finally:
        shutil.rmtree(part, ignore_errors=True)
        for old in root.glob(".old-*"):
            shutil.rmtree(old, ignore_errors=True)
    return folder


def open_bundle(path: str | Path, name: str | None = None) -> ModelBundle:
    """The model, reference, settings and calibration of a .mar or an unpacked one; ValueError
    naming what is missing."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder (a .mar from `selfheal archive`, or its unpacked folder)")
    folder = unpacked(path) if path.is_file() else path
    manifest_file = folder / "MAR-INF" / "MANIFEST.json"
    if not manifest_file.exists():
        raise ValueError(f"{path} has no MAR-INF/MANIFEST.json: build it with `selfheal archive`")
    model_info = json.loads(manifest_file.read_text()).get("model", {})
    config = {}
    if model_info.get("configFile"):
        config = yaml.safe_load((folder / model_info["configFile"]).read_text()) or {}
    settings = HandlerSettings.from_yaml(config.get("handler"))
    weights = folder / model_info.get("serializedFile", "")
    if not model_info.get("serializedFile") or not weights.exists():
        raise ValueError(f"{path}: the manifest names no serialized weights that exist")
    if model_info.get("modelFile"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))  # the model file and its extra files import from here
        model = build_model(folder, model_info["modelFile"], str(weights), settings)
    else:
        model = torch.jit.load(str(weights), map_location="cpu").eval()
    inputs, targets = load_reference(folder / settings.reference_file)
    return ModelBundle(name or model_info.get("modelName") or path.stem, folder, model, inputs, targets, settings,
                       load_calibration(folder))


def archive_name(path: str | Path) -> str:
    """The model name a .mar (or its folder) was archived under, read from its manifest alone."""
    path = Path(path)
    try:
        if path.is_file():
            with zipfile.ZipFile(path) as z:
                manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        else:
            manifest = json.loads((path / "MAR-INF" / "MANIFEST.json").read_text())
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: no readable MAR-INF/MANIFEST.json ({exc})") from None
    return manifest.get("model", {}).get("modelName") or path.stem
