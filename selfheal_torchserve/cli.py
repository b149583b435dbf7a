"""The `selfheal` command line: archive a model for TorchServe, build and check a reference, run a learner.

    selfheal reference --inputs val.npz --labels val_labels.npy --out reference.pt [--model-file ... ]
    selfheal archive --name mymodel --model-file model.py --weights weights.pt --reference reference.pt
    selfheal learn --mar model_store/mymodel.mar          # a learner of its own (PostgreSQL deployments)
    selfheal replay stream.npz --inference-url http://127.0.0.1:8080 --model mymodel
    selfheal paths [--write-config config.properties]     # every path TorchServe needs, absolute
    selfheal stop                                         # torchserve --stop, and wait for workers and learners

Exit status 2 with a message naming the problem for anything a user can fix.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml

log = logging.getLogger("selfheal")

STOCK_HANDLER = "selfheal_torchserve.handler"
CALIBRATION_FILE = "selfheal_calibration.pt"  # read by selfheal_torchserve.worker
# torch-model-archiver copies a handler file into every .mar (it does not take a module name), so
# the stock handler goes in as this stub; the code itself comes from the installed package.
STOCK_STUB = '''"""selfheal's stock JSON-array handler (installed with selfheal; TorchServe loads the one class here)."""
from selfheal_torchserve.handler import SelfHealHandler as _Stock


class SelfHealHandler(_Stock):
    pass
'''


class UsageError(Exception):
    """A problem the user can fix: printed, exit status 2."""


# ---------------------------------------------------------------------------- data files
def read_array(path: Path, column: str | None = None) -> torch.Tensor:
    """A tensor from .pt (tensor or {"inputs"}), .npy, .npz (first array, or `column`), or .csv (numbers)."""
    import numpy as np

    suffix = path.suffix.lower()
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        obj = obj.get(column or "inputs") if isinstance(obj, dict) else obj
        if not isinstance(obj, torch.Tensor):
            raise UsageError(f"{path}: expected a tensor (or a dict with {column or 'inputs'!r})")
        return obj
    if suffix == ".npy":
        return torch.from_numpy(np.load(path))
    if suffix == ".npz":
        data = np.load(path)
        key = column or data.files[0]
        if key not in data.files:
            raise UsageError(f"{path}: no array {key!r}; arrays: {data.files}")
        return torch.from_numpy(data[key])
    if suffix == ".csv":
        return torch.from_numpy(read_csv(path)[0])
    raise UsageError(f"{path}: use .pt, .npy, .npz or .csv")


def read_csv(path: Path, label_column: str | None = None) -> tuple[Any, Any]:
    """(features float32 (N, F), labels or None) from a CSV with a header row of column names."""
    import csv

    import numpy as np

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise UsageError(f"{path}: needs a header row and data rows")
    header, body = rows[0], rows[1:]
    label_idx = None
    if label_column is not None:
        if label_column not in header:
            raise UsageError(f"{path}: no column {label_column!r}; columns: {header}")
        label_idx = header.index(label_column)
    try:
        table = np.array([[float(v) for v in r] for r in body], dtype=np.float64)
    except ValueError as exc:
        raise UsageError(f"{path}: every cell must be a number ({exc})") from None
    if label_idx is None:
        return table.astype(np.float32), None
    labels = table[:, label_idx]
    return np.delete(table, label_idx, axis=1).astype(np.float32), labels


# ---------------------------------------------------------------------------- the model
def model_settings(args) -> dict:
    """The handler-section keys the model arguments stand for."""
    out: dict[str, Any] = {"task": args.task}
    if getattr(args, "model_class", None):
        out["model_class"] = args.model_class
    if getattr(args, "model_kwargs", None):
        try:
            out["model_kwargs"] = json.loads(args.model_kwargs)
        except ValueError as exc:
            raise UsageError(f"--model-kwargs must be a JSON object: {exc}") from None
        if not isinstance(out["model_kwargs"], dict):
            raise UsageError("--model-kwargs must be a JSON object, e.g. '{\"hidden\": 64}'")
    if getattr(args, "model_factory", None):
        out["model_factory"] = args.model_factory
    return out


def load_model(args) -> torch.nn.Module:
    """The model the arguments describe: eager (model file + state_dict) or TorchScript (weights only)."""
    from selfheal_serving.loading import build_model
    from selfheal_serving.settings import HandlerSettings

    weights = Path(args.weights)
    if not weights.exists():
        raise UsageError(f"--weights {weights}: no such file")
    if not args.model_file:
        try:
            return torch.jit.load(str(weights), map_location="cpu").eval()
        except RuntimeError as exc:
            raise UsageError(f"{weights} is not TorchScript; give --model-file for eager weights ({exc})") from None
    model_file = Path(args.model_file)
    if not model_file.exists():
        raise UsageError(f"--model-file {model_file}: no such file")
    sys.path.insert(0, str(model_file.parent.resolve()))
    settings = HandlerSettings(**{k: v for k, v in model_settings(args).items() if k != "task"})
    try:
        return build_model(model_file.parent, model_file.name, str(weights), settings)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None


def check_reference(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None, task: str) -> dict:
    """The reference report of `model` on a reference, as a dict (UsageError if they do not fit)."""
    from selfheal_core.reference import check_reference as check
    from selfheal_core.serving import reference_outputs
    from selfheal_core.task import Task

    try:
        raw = reference_outputs(model, inputs)
        t = Task.from_outputs(task, raw)
        y = t.check_targets(targets, len(inputs)) if targets is not None else None
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"the model and the reference do not fit: {exc}") from None
    return check(t, raw, y).as_dict()


# ---------------------------------------------------------------------------- commands
def cmd_reference(args) -> int:
    """Build reference.pt from held-out data (and labels), and check it against the model if given."""
    labels = None
    if Path(args.inputs).suffix.lower() == ".csv":
        x_np, y_np = read_csv(Path(args.inputs), args.label_column)
        inputs = torch.from_numpy(x_np)
        labels = None if y_np is None else torch.from_numpy(y_np)
    else:
        inputs = read_array(Path(args.inputs), args.inputs_key)
    if args.labels:
        labels = read_array(Path(args.labels), args.labels_key)
    if labels is not None:
        if len(labels) != len(inputs):
            raise UsageError(f"{len(labels)} labels for {len(inputs)} inputs")
        if args.task != "regression" and labels.is_floating_point() and not bool((labels == labels.round()).all()):
            bad = labels[labels != labels.round()][0].item()
            raise UsageError(f"label {bad} is not a whole number: class labels are integers (--task regression "
                             "for real-valued targets)")
        labels = labels.long() if args.task != "regression" else labels.float()
        if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
            raise UsageError("the targets contain NaN or inf")
    if inputs.is_floating_point():
        inputs = inputs.float()
        if not bool(torch.isfinite(inputs).all()):
            rows = int((~torch.isfinite(inputs.reshape(len(inputs), -1))).any(1).sum())
            raise UsageError(f"{rows} reference input(s) contain NaN or inf: a reference must be finite")
    if len(inputs) > args.size:
        idx = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(args.seed))[: args.size]
        inputs = inputs[idx]
        labels = labels[idx] if labels is not None else None
    if len(inputs) < 30:
        raise UsageError(f"{len(inputs)} inputs: a reference needs at least 30 (a few hundred is better)")
    report = None
    if args.weights:
        report = check_reference(load_model(args), inputs, labels, args.task)
        for w in report["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        if report["looks_fitted"] and not args.allow_fitted:
            raise UsageError("refusing a reference that looks like training data (see the warning); pass held-out "
                             "data, or --allow-fitted to write it anyway")
    key = "targets" if args.task == "regression" else "labels"
    obj = {"inputs": inputs, **({key: labels} if labels is not None else {})}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, args.out)
    print(json.dumps({"out": str(args.out), "size": len(inputs), "input_shape": list(inputs.shape[1:]),
                      "labelled": labels is not None, "report": report}))
    return 0


def calibrate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None, section: dict) -> dict:
    """The detectors' thresholds for this model, reference and settings, computed once here so that
    every worker starts without simulating them (it checks the key and simulates if it differs)."""
    from selfheal_core import ServingModel
    from selfheal_serving.settings import HandlerSettings

    try:
        settings = HandlerSettings.from_yaml(section)
    except ValueError as exc:
        raise UsageError(f"the handler section of the model-config: {exc}") from None
    serving = ServingModel(model, inputs, settings.heal, settings.task, targets)
    serving.close()
    return serving.monitor.calibration()


def read_config(path: Path) -> dict:
    """A model-config YAML as a mapping, its handler section a mapping; UsageError naming the problem."""
    if not path.exists():
        raise UsageError(f"--config {path}: no such file")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path} is not valid YAML: {str(exc)[:300]}") from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise UsageError(f"--config {path}: expected a mapping of settings, got {type(config).__name__}")
    if config.get("handler") is not None and not isinstance(config["handler"], dict):
        raise UsageError(f"--config {path}: handler must be a mapping of settings, got "
                         f"{type(config['handler']).__name__}")
    return config


def cmd_archive(args) -> int:
    """torch-model-archiver with the selfheal handler, the reference and a model-config."""
    reference = Path(args.reference)
    if not reference.exists():
        raise UsageError(f"--reference {reference}: no such file (build one with `selfheal reference`)")
    from selfheal_serving.loading import load_reference

    inputs, targets = load_reference(reference)
    config = read_config(Path(args.config)) if args.config else {}
    section = config.get("handler") or {}
    for key in ("model_class", "model_kwargs", "model_factory"):  # built as the server will build it
        if key in section and not getattr(args, key, None):
            setattr(args, key, json.dumps(section[key]) if key == "model_kwargs" else section[key])
    model = load_model(args)
    report = check_reference(model, inputs, targets, args.task)
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if report["looks_fitted"] and not args.allow_fitted:
        raise UsageError("refusing a reference that looks like training data (see the warning); build one from "
                         "held-out data, or pass --allow-fitted")
    config = read_config(Path(args.config)) if args.config else {}
    config.setdefault("minWorkers", 1)
    config.setdefault("maxWorkers", 1)
    handler_section = dict(config.get("handler") or {})
    handler_section.update(model_settings(args))
    handler_section["reference_file"] = reference.name
    if args.monitor_only:
        handler_section["heal"] = False
    config["handler"] = handler_section
    calibration = calibrate(model, inputs, targets, handler_section)
    archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).with_name("torch-model-archiver"))
    export = Path(args.export_path)
    export.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "model-config.yaml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        torch.save(calibration, Path(tmp) / CALIBRATION_FILE)
        extra = [str(reference), str(Path(tmp) / CALIBRATION_FILE)] + [f for f in (args.extra_files or "").split(",")
                                                                       if f]
        handler = args.handler
        if handler == STOCK_HANDLER:
            handler = str(Path(tmp) / "selfheal_handler.py")
            Path(handler).write_text(STOCK_STUB)
        elif not Path(handler.split(":")[0]).exists():
            raise UsageError(f"--handler {handler}: no such file (give your handler file, or {STOCK_HANDLER})")
        cmd = [archiver, "--model-name", args.name, "--version", args.version, "--serialized-file", args.weights,
               "--handler", handler, "--extra-files", ",".join(extra), "--config-file", str(cfg),
               "--export-path", str(export), "--force"]
        if args.model_file:
            cmd += ["--model-file", args.model_file]
        # the archiver stages files in $TMPDIR/<model name>: a private one, so that two archives of
        # one name (tests, CI jobs on one machine) cannot meet there

        stage = Path(tmp) / "stage"
        stage.mkdir()
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(stage)})
        if run.returncode != 0:
            raise UsageError(f"torch-model-archiver failed: {run.stderr.strip()[-2000:]}")
    print(json.dumps({"mar": str(export / f"{args.name}.mar"), "handler": args.handler, "task": args.task,
                      "reference": report}))
    return 0


def cmd_learn(args) -> int:
    """Run a model's learner on its own, from its .mar (e.g. in a container of its own)."""
    from selfheal_torchserve import learner_service

    mar = Path(args.mar)
    if not mar.exists():
        raise UsageError(f"{mar}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(mar) as z:
            z.extractall(tmp)
        manifest = json.loads((Path(tmp) / "MAR-INF" / "MANIFEST.json").read_text())
        name = args.model_name or manifest["model"]["modelName"]
        handler = manifest["model"]["handler"]
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        argv = ["--model-dir", tmp, "--handler", handler, "--model-name", name, "--workdir", str(workdir),
                "--threads", str(args.threads), "--nice", str(args.nice)]
        return learner_service.main(argv)


def cmd_replay(args) -> int:
    """Replay a stream against a served model; write <out>/replay.png and <out>/replay.json."""
    from selfheal_torchserve import replay

    try:
        stream = replay.load_stream(Path(args.stream), args.label_column)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    inference_key, management_key = args.inference_key, args.management_key
    key_file = Path(args.key_file) if args.key_file else Path("key_file.json")
    if key_file.exists() and not (inference_key and management_key):
        inference_key, management_key = replay.read_keys(key_file)
    elif args.key_file:
        raise UsageError(f"no key file at {key_file}")
    cfg = replay.ReplayConfig(args.inference_url.rstrip("/"), args.management_url.rstrip("/"), args.model,
                              args.batch, args.feedback_rate, args.feedback_delay, inference_key, management_key,
                              args.seed, progress=not args.quiet)
    trace = replay.replay(stream, cfg)
    summary = replay.summarize(stream, trace, args.window)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps({**summary, "stream": str(args.stream), "model": args.model,
                                                 "feedback_rate": args.feedback_rate}, indent=2))
    replay.plot(summary, out / "replay.png", title=f"selfheal replay: {args.model}")
    acc = summary["accuracy"]
    print(f"{summary['inputs']} inputs, accuracy {acc:.3f}" if acc is not None else f"{summary['inputs']} inputs",
          f"final version {summary['final_version']}, {summary['feedback_sent']} labels sent;",
          f"wrote {out / 'replay.png'} and {out / 'replay.json'}")
    return 0


PLUGIN_JAR = "selfheal-feedback.jar"


def plugin_dir() -> Path | None:
    """Where the feedback plugin's jar is: $SELFHEAL_PLUGINS, or build/plugins of a source checkout."""

    for where in (os.environ.get("SELFHEAL_PLUGINS"), Path(__file__).resolve().parent.parent / "build" / "plugins"):
        if where and (Path(where) / PLUGIN_JAR).exists():
            return Path(where).resolve()
    return None


def cmd_paths(args) -> int:
    """Every path TorchServe needs, absolute, so that a config.properties works from any directory;
    with --write-config, a config.properties with them (from the repository's, or a minimal one)."""
    from selfheal_torchserve.metrics import METRICS_YAML

    plugins = plugin_dir()
    store = Path(args.model_store).resolve()
    paths = {"metrics_config": str(METRICS_YAML), "plugins_path": str(plugins) if plugins else None,
             "model_store": str(store)}
    for key, value in paths.items():
        print(f"{key}={value}" if value else f"# {key}: {PLUGIN_JAR} not found; build it with `make setup` "
              "(plugins/build.sh) or set SELFHEAL_PLUGINS to its folder")
    if args.write_config:
        template = Path(__file__).resolve().parent.parent / "config.properties"
        lines = template.read_text().splitlines() if template.exists() else [
            "inference_address=http://127.0.0.1:8080", "management_address=http://127.0.0.1:8081",
            "metrics_address=http://127.0.0.1:8082", "metrics_mode=prometheus"]
        out, seen = [], set()
        for line in lines:
            key = line.split("=", 1)[0].strip()
            if key in paths and not line.lstrip().startswith("#"):
                seen.add(key)
                line = f"{key}={paths[key]}" if paths[key] else f"# {line}"
            out.append(line)
        out += [f"{k}={v}" for k, v in paths.items() if k not in seen and v]
        Path(args.write_config).write_text("\n".join(out) + "\n")
        print(f"wrote {args.write_config}")
    return 0


def cmd_stop(args) -> int:
    """`torchserve --stop`, then wait until the frontend, its workers and the learners they started
    are gone: TorchServe's own command returns once it signalled the frontend, while the worker
    flushes and the learner notices its frontend is gone seconds later (a restart in between
    would find the old learner holding the lease and the ports)."""
    import psutil

    pid_file = Path(tempfile.gettempdir()) / ".model_server.pid"  # where TorchServe's CLI keeps it
    try:
        frontend = psutil.Process(int(pid_file.read_text().split()[0]))
    except (OSError, ValueError, IndexError, psutil.Error):
        print(f"TorchServe is not running (no live process in {pid_file})")
        return 0
    procs = [frontend]
    try:
        procs += frontend.children(recursive=True)
    except psutil.Error:
        pass
    for p in psutil.process_iter(["cmdline"]):  # learners whose worker died before: no longer children
        cmd = p.info.get("cmdline") or []
        if "--frontend-pid" in cmd and cmd[cmd.index("--frontend-pid") + 1:][:1] == [str(frontend.pid)]:
            procs.append(p)
    procs = list({p.pid: p for p in procs}.values())
    torchserve = shutil.which("torchserve", path=str(Path(sys.executable).parent)) or shutil.which("torchserve")
    if torchserve is None:
        raise UsageError("no torchserve command next to this Python or on PATH")
    subprocess.run([torchserve, "--stop"], check=False, stdout=subprocess.DEVNULL)
    t0 = time.monotonic()
    for p in procs:  # the learner runs at nice 19: beside busy processes it had too little CPU to exit
        for thread in _threads(p):  # in 60 s. Linux keeps niceness per thread; raising it back needs
            with contextlib.suppress(OSError):  # CAP_SYS_NICE: without it we only wait longer
                os.setpriority(os.PRIO_PROCESS, thread, 0)
    _, alive = psutil.wait_procs(procs, timeout=args.timeout)
    if alive:
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(alive, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        print(f"stopped TorchServe (pid {frontend.pid}); pids {sorted(p.pid for p in alive) or 'none'} were "
              f"still alive after {args.timeout:.0f} s and were signalled", file=sys.stderr)
        return 1
    print(f"stopped TorchServe (pid {frontend.pid}) and every process it started "
          f"(pids {sorted(p.pid for p in procs)}) in {time.monotonic() - t0:.1f} s")
    return 0


def _threads(proc) -> list[int]:
    import psutil

    try:
        return [t.id for t in proc.threads()]
    except psutil.Error:
        return []


def add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--weights", required=required, help="a state_dict (with --model-file) or a TorchScript .pt")
    p.add_argument("--model-file", help="the Python file defining the model class (eager models)")
    p.add_argument("--model-class", help="the class to build, when the file defines several")
    p.add_argument("--model-kwargs", help="constructor arguments as a JSON object")
    p.add_argument("--model-factory", help="module:function building the model (instead of a class)")
    p.add_argument("--task", default="classification", choices=["classification", "binary", "regression"])
    p.add_argument("--allow-fitted", action="store_true", help="accept a reference that looks like training data")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="selfheal", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="build reference.pt from held-out data and check it")
    ref.add_argument("--inputs", required=True, help=".pt/.npy/.npz/.csv of held-out inputs (already preprocessed)")
    ref.add_argument("--inputs-key", help="array name in an .npz or key in a .pt dict")
    ref.add_argument("--labels", help="labels (or regression targets) for the inputs")
    ref.add_argument("--labels-key", help="array name in an .npz or key in a .pt dict")
    ref.add_argument("--label-column", help="CSV inputs: the column holding labels or targets")
    ref.add_argument("--size", type=int, default=500, help="keep at most this many (a random subset)")
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--out", default="reference.pt")
    add_model_args(ref, required=False)
    ref.set_defaults(func=cmd_reference)
    arc = sub.add_parser("archive", help="build a .mar with the selfheal handler")
    arc.add_argument("--name", required=True)
    arc.add_argument("--version", default="1.0")
    arc.add_argument("--reference", required=True, help="reference.pt (selfheal reference)")
    arc.add_argument("--handler", default=STOCK_HANDLER, help=f"your handler file, or {STOCK_HANDLER} (JSON arrays)")
    arc.add_argument("--config", help="a model-config.yaml to start from (workers, batching, handler settings)")
    arc.add_argument("--extra-files", help="more files for the .mar, comma-separated")
    arc.add_argument("--export-path", default="model_store")
    arc.add_argument("--monitor-only", action="store_true", help="heal: false (watch and estimate, never change)")
    add_model_args(arc, required=True)
    arc.set_defaults(func=cmd_archive)
    lrn = sub.add_parser("learn", help="run a model's learner process on its own")
    lrn.add_argument("--mar", required=True)
    lrn.add_argument("--model-name")
    lrn.add_argument("--workdir", default=".", help="where selfheal/<model>.json and relative snapshot dirs live")
    lrn.add_argument("--threads", type=int, default=1)
    lrn.add_argument("--nice", type=int, default=0)
    lrn.set_defaults(func=cmd_learn)
    rep = sub.add_parser("replay", help="replay a stream against a served model, chart accuracy, drift, versions")
    rep.add_argument("stream", help=".npz (x, y[, phase]), .csv (a label column) or a folder of <label>/<image>")
    rep.add_argument("--model", default="digits")
    rep.add_argument("--inference-url", default="http://127.0.0.1:8080")
    rep.add_argument("--management-url", default="http://127.0.0.1:8081")
    rep.add_argument("--key-file", help="TorchServe's key_file.json (default: ./key_file.json when present)")
    # TorchServe's keys may start with "-", which argparse reads as an option: --inference-key=KEY
    rep.add_argument("--inference-key", help="the inference key (written --inference-key=KEY: a key may start with -)")
    rep.add_argument("--management-key", help="the management key (--management-key=KEY, as above)")
    rep.add_argument("--batch", type=int, default=8, help="rows per request (images: one per request)")
    rep.add_argument("--feedback-rate", type=float, default=0.0, help="share of predictions whose label is sent")
    rep.add_argument("--feedback-delay", type=int, default=1, help="requests between a prediction and its label")
    rep.add_argument("--label-column", default="label")
    rep.add_argument("--window", type=int, default=300)
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--out", default="replay_out")
    rep.add_argument("--quiet", action="store_true", help="no progress bar")
    rep.set_defaults(func=cmd_replay)
    pth = sub.add_parser("paths", help="print every path TorchServe needs (metrics.yaml, the feedback plugin, "
                                       "the model store), absolute")
    pth.add_argument("--model-store", default="model_store", help="the model store to name (default ./model_store)")
    pth.add_argument("--write-config", help="also write a config.properties with these paths absolute")
    pth.set_defaults(func=cmd_paths)
    stp = sub.add_parser("stop", help="torchserve --stop, and wait until its workers and learners have exited")
    stp.add_argument("--timeout", type=float, default=60.0, help="seconds to wait before signalling the rest")
    stp.set_defaults(func=cmd_stop)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"selfheal {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
