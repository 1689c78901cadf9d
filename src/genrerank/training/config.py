"""Training configuration and the layered run config: defaults < config file < ``--set`` overrides.

A run config has four sections::

    {"model":  {"name": "nar4rec", "dim": 64},      # model name + its Config fields
     "train":  {"lr": 0.001, "epochs": 20, ...},     # TrainConfig fields
     "loss":   [{"name": "likelihood"}, ...],        # terms for genrerank.losses.build_objective
     "decode": {"name": "contrastive", "alpha": 0.6}}  # default decoding strategy for the model

and fine-tuning runs (``genrerank finetune``, :mod:`genrerank.preference`) a fifth, ``reward``
(``{"weights": {"engagement": 1.0, "diversity": 0.1}, "terms": {...}}``, :mod:`genrerank.rewards`).

Layers, lowest first: TrainConfig defaults < the model's packaged defaults
(``genrerank/configs/<model>.json``) < the user's file < ``--set`` overrides.

The file is JSON (``.json``) or TOML (``.toml``; ``[[loss]]`` tables for the loss terms).
Overrides are ``key=value`` strings with dotted keys: ``train.lr=0.001``, ``model.dim=64``,
``loss.0.tau=0.5`` (list index; the index one past the end appends a new term).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTIONS = ("model", "train", "loss", "decode", "reward")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Everything the shared :class:`~genrerank.training.trainer.Trainer` needs to know."""

    seed: int = 0
    epochs: int = 20  # maximum; early stopping may end sooner
    batch_size: int = 256
    eval_batch_size: int | None = None  # None = batch_size
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW, on weight matrices/embeddings only (not biases, norms)
    grad_clip: float | None = 1.0  # max global grad norm; None or 0 = no clipping
    lr_schedule: str = "constant"  # "constant" or "cosine" (decays to lr * min_lr_ratio)
    warmup_steps: int = 0  # linear warm-up from 0, for either schedule
    min_lr_ratio: float = 0.1
    patience: int = 3  # evaluations without improvement before stopping; <= 0 = never stop early
    eval_every: int = 0  # 0 = validate after every epoch; N > 0 = every N optimizer steps
    num_threads: int = 2  # torch.set_num_threads; fixed so CPU results are reproducible
    select_metric: str = "loss"  # validation metric for early stopping / best checkpoint
    select_mode: str = "min"  # "min" or "max"
    progress: bool = True  # a bar on a terminal, periodic lines (rate, time left) in a log file
    # Loss terms with ``tau=None`` (unlikelihood) get tau = this quantile of the training
    # split's list utility R, computed once before training.
    tau_quantile: float = 0.5
    device: str = "cpu"

    def __post_init__(self) -> None:
        problems = []
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            problems.append(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip < 0:
            problems.append(f"grad_clip must be >= 0 or None, got {self.grad_clip}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.tau_quantile <= 1:
            problems.append(f"tau_quantile must be in [0, 1], got {self.tau_quantile}")
        if self.eval_every < 0:
            problems.append(f"eval_every must be >= 0, got {self.eval_every}")
        if self.num_threads < 1:
            problems.append(f"num_threads must be >= 1, got {self.num_threads}")
        if self.select_mode not in ("min", "max"):
            problems.append(f"select_mode must be 'min' or 'max', got {self.select_mode!r}")
        if problems:
            raise ValueError("train config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TrainConfig:
        """Build from a dict, naming unknown keys and values of the wrong type."""
        values = dict(values or {})
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"train config: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: _check_type(f"train.{k}", v, hints[k]) for k, v in values.items()})


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """``value`` if it fits the annotation ``hint`` (ints are accepted for floats)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in allowed:
        if t is type(None) and value is None:
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise ValueError(f"{key}: expected {names}, got {value!r}")


def default_run_config() -> dict[str, Any]:
    return {"model": {}, "train": TrainConfig().to_dict(), "loss": [], "decode": {}}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or TOML config file as a dict (by extension)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
        elif suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            raise ValueError(f"config file {path}: expected a .json or .toml file")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: top level must be a table/object")
    return data


def load_run_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    base: str | Path | None = None,
) -> dict:
    """The run config: defaults < ``base`` file < file at ``path`` < ``key=value`` overrides.

    Returns ``{"model": {...}, "train": {...}, "loss": [...], "decode": {...}}``; ``train``
    always holds every TrainConfig field and is validated (build it with
    ``TrainConfig.from_dict(cfg["train"])``). A ``loss`` list in a later layer replaces the
    earlier one whole; the other sections are merged key by key.
    """
    config = default_run_config()
    for layer in (base, path):
        if layer is None:
            continue
        data = read_config_file(layer)
        _check_sections(data, where=f"config file {layer}")
        for section, value in data.items():
            _check_section_type(section, value, where=f"config file {layer}")
            if section == "loss":
                config["loss"] = copy.deepcopy(value)
            else:
                # ``reward`` (fine-tuning's list reward, genrerank.rewards) only when given.
                config.setdefault(section, {}).update(copy.deepcopy(value))
    for item in overrides:
        apply_override(config, item)
    TrainConfig.from_dict(config["train"])  # fail now, naming the bad option
    return config


def _check_sections(data: dict[str, Any], where: str) -> None:
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ValueError(
            f"{where}: unknown top-level section(s) {unknown}; known sections: {list(SECTIONS)}"
        )


def _check_section_type(section: str, value: Any, where: str) -> None:
    if section == "loss":
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ValueError(f"{where}: 'loss' must be a list of tables/objects, got {value!r}")
    elif not isinstance(value, dict):
        raise ValueError(f"{where}: {section!r} must be a table/object, got {value!r}")


def apply_override(config: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override to ``config`` in place."""
    if "=" not in item:
        raise ValueError(f"bad override {item!r}: expected key=value, e.g. train.lr=0.001")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ValueError(f"bad override {item!r}: empty key or key part")
    if parts[0] not in SECTIONS:
        raise ValueError(
            f"bad override {item!r}: unknown top-level section {parts[0]!r}; "
            f"known sections: {list(SECTIONS)}"
        )
    if len(parts) == 1:
        value = _parse_json(item, raw)
        _check_section_type(parts[0], value, where=f"override {item!r}")
        config[parts[0]] = value
        return
    node: Any = config
    for depth, part in enumerate(parts[:-1]):
        child = _child(node, part, item, create=True)
        if not isinstance(child, dict | list):
            prefix = ".".join(parts[: depth + 1])
            raise ValueError(f"bad override {item!r}: {prefix} is {child!r}, not a table or list")
        node = child
    last = parts[-1]
    current = _child(node, last, item, create=False)
    value = parse_value(raw, current, item)
    if isinstance(node, list):
        index = int(last)
        if index == len(node):
            node.append(value)
        else:
            node[index] = value
    else:
        node[last] = value


_MISSING = object()


def _child(node: dict | list, part: str, item: str, create: bool) -> Any:
    """``node[part]``; creates a missing table (or the list entry one past the end) if asked."""
    if isinstance(node, list):
        if not part.isdigit():
            raise ValueError(f"bad override {item!r}: {part!r} is not a list index")
        index = int(part)
        if index < len(node):
            return node[index]
        if index == len(node):
            if create:
                node.append({})
                return node[index]
            return _MISSING
        raise ValueError(
            f"bad override {item!r}: index {index} out of range (list has {len(node)} entries; "
            f"use index {len(node)} to append)"
        )
    if part not in node:
        if create:
            node[part] = {}
            return node[part]
        return _MISSING
    return node[part]


def _parse_json(item: str, raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"bad override {item!r}: value is not valid JSON: {exc}") from exc


def parse_value(raw: str, current: Any = _MISSING, item: str = "") -> Any:
    """Parse an override value, guided by the type of the value it replaces.

    With no current value (or None): JSON (numbers, true/false, null, lists, objects, quoted
    strings) and otherwise the raw string. A current bool accepts true/false/yes/no/1/0, an int
    an integer, a float any number, a str the raw text unchanged (or a number, for options such
    as ``decode.alpha`` that take ``"auto"`` or a number), a list/dict JSON.
    """
    where = f"bad override {item!r}" if item else f"bad value {raw!r}"
    text = raw.strip()
    if current is _MISSING or current is None:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{where}: expected a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            # An int option may still be given a float deliberately (e.g. a loss weight).
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{where}: expected an integer") from None
            return int(value) if value.is_integer() else value
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where}: expected a number") from None
    if isinstance(current, str):
        # Some options take a word or a number (decode.alpha: "auto" or 0.05): a number stays
        # a number. No string option of genrerank takes numeric text.
        try:
            number = json.loads(text)
        except json.JSONDecodeError:
            return raw
        return number if isinstance(number, int | float) and not isinstance(number, bool) \
            else raw
    if isinstance(current, list | dict):
        value = _parse_json(item, text)
        if not isinstance(value, list | dict):
            raise ValueError(f"{where}: expected a JSON {type(current).__name__}")
        return value
    return _parse_json(item, text)
