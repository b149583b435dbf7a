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

import json
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
    folder: Path  # the unpacked archive (a temporary folder for a .mar, kept while the process runs)
    model: torch.nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor | None
    settings: HandlerSettings
    calibration: dict | None


_UNPACKED: list[tempfile.TemporaryDirectory] = []  # a .mar's folder lives as long as the process


def open_bundle(path: str | Path, name: str | None = None) -> ModelBundle:
    """The model, reference, settings and calibration of a .mar or an unpacked one; ValueError
    naming what is missing."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder (a .mar from `selfheal archive`, or its unpacked folder)")
    if path.is_file():
        tmp = tempfile.TemporaryDirectory(prefix="selfheal-mar-")
        _UNPACKED.append(tmp)
        try:
            with zipfile.ZipFile(path) as z:
                z.extractall(tmp.name)
        except zipfile.BadZipFile:
            raise ValueError(f"{path} is not a .mar (a zip archive)") from None
        folder = Path(tmp.name)
    else:
        folder = path
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
