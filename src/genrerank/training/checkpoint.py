"""Checkpoints as safetensors + JSON only: nothing is ever pickled, so loading runs no code.

A checkpoint is a folder::

    model.safetensors       model.state_dict()
    optimizer.safetensors   optimizer state tensors, keys "state.<param index>.<name>" (last/ only)
    objective.safetensors   the objective's state_dict, only when it has parameters/buffers
    checkpoint.json         model name + config, feature spec, train + loss config, epoch, step,
                            best metric, patience counter, optimizer param groups and non-tensor
                            state, RNG states (python, numpy, torch)

A run folder holds two: ``last/`` (to resume) and ``best/`` (the selected model). A checkpoint is
written into a temporary folder beside its target (``.last.tmp-*``, ``.best.tmp-*``) and renamed
into place, so a crash mid-write leaves the previous checkpoint whole; a crash between the two
renames of a replace is repaired on the next read or write (see :func:`_recover`), and the
temporary folders a killed process left are removed when a trainer next starts in the run
(:func:`remove_stale_temps`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from genrerank.data.schema import FeatureSpec

FORMAT = "genrerank.checkpoint"
FORMAT_VERSION = 1
META_FILE = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OBJECTIVE_FILE = "objective.safetensors"
CHECKPOINTS = ("best", "last")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; names the file."""


# --------------------------------------------------------------------------- atomic folders


def _old_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old-{os.getpid()}")


def _recover(target: Path) -> None:
    """Put back a checkpoint moved aside by a replace that crashed before finishing."""
    if target.exists():
        return
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        # Failing that (e.g. read-only), the read that follows names the missing file.
        with contextlib.suppress(OSError):
            os.replace(olds[-1], target)


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def remove_stale_temps(run_dir: str | Path) -> list[Path]:
    """Remove the temporary checkpoint folders (``.best.tmp-*``, ``.last.tmp-*``) in ``run_dir``
    that a killed :func:`save_checkpoint` left behind; returns those removed. Nothing else is
    touched: not ``.*.old-*`` (it may hold the only copy, see :func:`_recover`), not files, not
    symlinks. A temporary folder is never the only copy of a checkpoint, but one being written
    right now looks the same: call this only from the process that owns the run (a trainer
    starting or resuming), never while another writes to it."""
    removed = []
    for name in CHECKPOINTS:
        for path in Path(run_dir).glob(_tmp_prefix(Path(name)) + "*"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    removed.append(path)
    return sorted(removed)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported everywhere (Windows); rename atomicity still holds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` folder to ``target``, replacing any folder there."""
    # rename(2) cannot replace a non-empty folder, so the old one steps aside first; should
    # the second rename fail, the old one is moved back (and _recover covers a hard crash).
    if target.exists():
        old = _old_name(target)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)


# --------------------------------------------------------------------------- optimizer state


def flatten_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (string keys) and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = _jsonable(value, f"state.{pid}.{name}")
    groups = [
        {k: _jsonable(v, f"param_groups.{i}.{k}") for k, v in group.items()}
        for i, group in enumerate(state_dict["param_groups"])
    ]
    return tensors, {"param_groups": groups, "state": scalars}


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta.get("state", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        # JSON turns tuples (AdamW's betas) into lists; give them back their type.
        groups.append(
            {
                k: (v if k == "params" or not isinstance(v, list) else tuple(v))
                for k, v in group.items()
            }
        )
    return {"state": state, "param_groups": groups}


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"optimizer {where}: cannot store {type(value).__name__} without pickle")


# --------------------------------------------------------------------------- RNG state


def rng_state(cuda: bool = False) -> dict[str, Any]:
    """Python, numpy and torch RNG states, JSON-able."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if cuda and torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


# --------------------------------------------------------------------------- save / load


def model_meta(model: nn.Module) -> dict[str, Any]:
    """The part of checkpoint.json that rebuilds the model: name, config and feature spec."""
    config = getattr(model, "config", None)
    spec = getattr(model, "spec", None)
    return {
        "model_name": getattr(model, "name", "") or type(model).__name__,
        "model_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {},
        "feature_spec": spec.to_dict() if isinstance(spec, FeatureSpec) else None,
    }


def save_checkpoint(
    ckpt_dir: str | Path,
    model: nn.Module,
    meta: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    objective: nn.Module | None = None,
) -> Path:
    """Write a checkpoint folder atomically; ``meta`` is merged into checkpoint.json."""
    target = Path(ckpt_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
    try:
        doc: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
        doc.update(model_meta(model))
        doc.update(meta)
        save_file(_state_tensors(model.state_dict()), str(tmp / MODEL_FILE))
        files = [MODEL_FILE]
        if optimizer is not None:
            tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            doc["optimizer"] = opt_meta
            files.append(OPTIMIZER_FILE)
        if objective is not None and objective.state_dict():
            save_file(_state_tensors(objective.state_dict()), str(tmp / OBJECTIVE_FILE))
            files.append(OBJECTIVE_FILE)
        doc["files"] = files
        (tmp / META_FILE).write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n")
        for name in [*files, META_FILE]:
            _fsync_file(tmp / name)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _state_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing memory (tied weights) or non-contiguous ones: copy.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """checkpoint.json of a checkpoint folder, checked for format and version."""
    ckpt_dir = Path(ckpt_dir)
    _recover(ckpt_dir)
    path = ckpt_dir / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} not found")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a genrerank checkpoint")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {doc.get('format_version')!r}, this genrerank "
            f"reads {FORMAT_VERSION}"
        )
    return doc


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, with an error naming the file when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint file {path} is damaged or not safetensors: {exc}"
        ) from exc


def load_tensors_into(module: nn.Module, path: str | Path) -> None:
    """Load a safetensors state_dict into ``module``, strict on tensor names and shapes."""
    path = Path(path)
    tensors = read_tensors(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_few(unexpected)}")
        if wrong:
            parts.append(f"shape mismatch {_few(wrong)}")
        raise CheckpointError(f"checkpoint file {path} does not fit the model: " + "; ".join(parts))
    module.load_state_dict(tensors, strict=True)


def _few(items: list[str], k: int = 5) -> str:
    return str(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


def load_checkpoint(
    ckpt_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    objective: nn.Module | None = None,
) -> dict[str, Any]:
    """Load weights (and optimizer / objective state) into existing objects; returns the meta."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    load_tensors_into(model, ckpt_dir / MODEL_FILE)
    if optimizer is not None:
        if "optimizer" not in meta:
            raise CheckpointError(f"checkpoint {ckpt_dir} holds no optimizer state")
        tensors = read_tensors(ckpt_dir / OPTIMIZER_FILE)
        try:
            optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"checkpoint file {ckpt_dir / OPTIMIZER_FILE} does not fit the optimizer: {exc}"
            ) from exc
    if objective is not None and OBJECTIVE_FILE in meta.get("files", []):
        load_tensors_into(objective, ckpt_dir / OBJECTIVE_FILE)
    return meta


def resolve_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """The checkpoint folder: ``run_dir/which``, or ``run_dir`` itself if it is one."""
    run_dir = Path(run_dir)
    if (run_dir / META_FILE).is_file():
        return run_dir
    if which not in CHECKPOINTS:
        raise ValueError(f"which must be one of {CHECKPOINTS}, got {which!r}")
    return run_dir / which


def load_model(
    run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a run folder (``best/`` or ``last/``) in eval mode.

    Returns ``(model, meta)`` where ``meta`` is checkpoint.json. Raises FileNotFoundError naming
    a missing file and CheckpointError naming a damaged one or one that does not fit the model.
    """
    from genrerank.models.base import build_model

    ckpt = resolve_checkpoint(run_dir, which)
    meta = read_meta(ckpt)
    if not meta.get("feature_spec"):
        raise CheckpointError(f"{ckpt / META_FILE} has no feature_spec; cannot rebuild the model")
    spec = FeatureSpec.from_dict(meta["feature_spec"])
    model = build_model(meta["model_name"], spec, meta.get("model_config") or {})
    load_tensors_into(model, ckpt / MODEL_FILE)
    model.to(device)
    model.eval()
    return model, meta
