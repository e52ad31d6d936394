"""Experiment configuration: one dataclass, read from TOML, overridden by flags, written back.

Precedence: built-in defaults < task defaults (Finn et al. 2017's settings per task) < the
``--config`` TOML file < command-line flags. ``finalize`` fills the task defaults and
validates every field; each problem is a one-line ``ConfigError`` (a ValueError), which the
CLI turns into ``parser.error`` (exit code 2). The run's ``config.toml`` holds the finalized
values, so a run is reproducible from its output folder alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

TASKS = ("sinusoid", "omniglot")
ALGORITHMS = ("maml", "llama")
FISHERS = ("exact", "mc", "empirical")
# How damping = "auto" picks the posterior's delta on the meta-validation tasks: per layer by the
# Laplace evidence of the support sets, isotropic by the GLM predictive NLL of the query sets, or
# the evidence's per-layer deltas scaled by the factor >= 1 with the lowest such NLL
# (llama_fast.experiments.selection).
DAMPING_OBJECTIVES = ("evidence", "nll", "evidence-nll")
OMNIGLOT_DRAWINGS = 20
CONFIG_FILE = "config.toml"  # the files of a run folder (config.output)
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.csv"

# Finn et al. (2017): sinusoid section 5.1; Omniglot 5-way (20-way: meta_batch 16,
# inner_lr 0.1, inner_steps 5). Query examples per class equal the shots, as in their code.
TASK_DEFAULTS = {
    "sinusoid": {"iterations": 70000, "meta_batch": 25, "inner_lr": 0.01, "inner_steps": 1,
                 "shots": 10, "query_shots": 10},
    "omniglot": {"iterations": 60000, "meta_batch": 32, "inner_lr": 0.4, "inner_steps": 1,
                 "shots": 1, "query_shots": None, "ways": 5},
}


# `llama-fast train` with neither a task nor --config: the quickstart, MAML and LLAMA on
# sinusoid sized to finish (training, evaluation on 600 tasks, plots) in a few minutes on two
# CPU cores. Any flag still overrides these values.
QUICKSTART = {"task": "sinusoid", "iterations": 3000, "meta_batch": 25, "meta_lr": 0.003,
              "log_every": 20, "eval_every": 500, "checkpoint_every": 500,
              "output": "runs/quickstart"}


class ConfigError(ValueError):
    """An invalid configuration value (one line, naming the field)."""


@dataclass
class ExperimentConfig:
    task: str = "sinusoid"
    algorithm: tuple = ("maml", "llama")
    device: str = "auto"
    seed: int = 0
    iterations: int | None = None
    meta_batch: int | None = None
    meta_lr: float = 1e-3
    inner_lr: float | None = None
    inner_steps: int | None = None
    first_order: bool = False
    eta: float = 1.0   # per K-FAC parameter (meta_step logdet_norm="parameters"); docs/experiments.md#choosing-eta
    damping: float | str = "auto"
    damping_objective: str = "evidence-nll"
    learn_damping: bool = False   # LLAMA: per-layer log delta meta-learned through the evidence terms
    damping_lr: float = 0.01      # its Adam learning rate (a hyperparameter: laplace-torch's marglik uses 0.1)
    noise: float | str = "auto"
    fisher: str = "exact"
    shots: int | None = None
    query_shots: int | None = None
    ways: int | None = None
    eval_tasks: int = 600
    samples: int = 10
    log_every: int = 100
    eval_every: int = 1000
    checkpoint_every: int = 1000
    output: str | None = None
    data: str | None = None
    oneshot_runs: str | None = None
    resume: bool = False

    # ------------------------------------------------------------------ building

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_sources(cls, toml_path=None, overrides: dict | None = None) -> "ExperimentConfig":
        """Defaults, then the TOML file, then ``overrides``; finalized and validated."""
        values = read_toml(toml_path) if toml_path is not None else {}
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(values).finalize()

    @classmethod
    def from_dict(cls, values: dict) -> "ExperimentConfig":
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; "
                              f"valid keys: {', '.join(cls.field_names())}")
        return cls(**values)

    def finalize(self) -> "ExperimentConfig":
        """A validated copy with task defaults filled in (raises ConfigError)."""
        values = dataclasses.asdict(self)
        values["task"] = _check_choice("task", values["task"], TASKS)
        if values["task"] == "sinusoid" and values["ways"] is not None:
            raise ConfigError("ways: applies to omniglot only (sinusoid tasks are regression)")
        for key, default in TASK_DEFAULTS[values["task"]].items():
            if values[key] is None:
                values[key] = default
        if values["query_shots"] is None:
            values["query_shots"] = values["shots"]
        if values["data"] is None and values["task"] == "omniglot" and os.environ.get("LLAMA_FAST_DATA"):
            values["data"] = os.environ["LLAMA_FAST_DATA"]
        if values["output"] is None:
            values["output"] = f"runs/{values['task']}-seed{values['seed']}"
        for name, check in FIELD_CHECKS.items():
            if values[name] is not None:
                values[name] = check(name, values[name])
        config = ExperimentConfig(**values)
        config._check_combination()
        return config

    def _check_combination(self) -> None:
        if self.task == "omniglot":
            if self.data is None:
                raise ConfigError("data: omniglot needs --data DIR (the folder holding the Omniglot "
                                  "zips) or LLAMA_FAST_DATA")
            if not Path(self.data).is_dir():
                raise ConfigError(f"data: {self.data} is not a directory")
            if self.shots + self.query_shots > OMNIGLOT_DRAWINGS:
                raise ConfigError(f"shots + query_shots = {self.shots + self.query_shots}; an Omniglot "
                                  f"class has only {OMNIGLOT_DRAWINGS} drawings")
        if self.oneshot_runs is not None and not Path(self.oneshot_runs).is_dir():
            raise ConfigError(f"oneshot_runs: {self.oneshot_runs} is not a directory")

    # ------------------------------------------------------------------ writing

    def to_dict(self) -> dict:
        """TOML-ready values (None omitted: TOML has no null; tuples as lists)."""
        values = {}
        for key, value in dataclasses.asdict(self).items():
            if value is not None:
                values[key] = list(value) if isinstance(value, tuple) else value
        return values

    def save(self, path) -> Path:
        import tomli_w  # only writing needs it; reading is the stdlib's tomllib

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomically (temp file + rename): under torchrun the other ranks may be reading the
        # file (--resume) while rank 0 rewrites it.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(tomli_w.dumps(self.to_dict()))
        os.replace(tmp, path)
        return path

    def resolved_device(self) -> torch.device:
        """``auto`` -> cuda when a GPU is visible, else cpu; a cuda device must exist."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                raise ConfigError(f"device: {self.device} requested but {count} CUDA device(s) are visible")
        return device


def read_toml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {path} does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config: {path} is not valid TOML ({err})") from None


# ----------------------------------------------------------------------------- field checks
# Each takes (name, value) and returns the normalized value or raises a one-line ConfigError.


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(choices)}; got {value!r}")
    return value


# TOML integers (config.toml) and torch's seeds are 64-bit: a larger value could not be written
# back, or would overflow in torch.manual_seed.
INT_MAX = 2**63 - 1


def _check_int(minimum):
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
        if value > INT_MAX:
            raise ConfigError(f"{name}: must be <= {INT_MAX} (a 64-bit integer), got {value}")
        return value
    return check


def _check_float(minimum, strict):
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        if value < minimum or (strict and value == minimum):
            raise ConfigError(f"{name}: must be {'>' if strict else '>='} {minimum}, got {value}")
        return float(value)
    return check


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: must be true or false, got {value!r}")
    return value


def _check_algorithm(name, value):
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if not names:
        raise ConfigError(f"{name}: give at least one of {', '.join(ALGORITHMS)}")
    for algorithm in names:
        _check_choice(name, algorithm, ALGORITHMS)
    if len(set(names)) != len(names):
        raise ConfigError(f"{name}: listed twice in {', '.join(names)}")
    return tuple(names)


def _check_device(name, value):
    if value == "auto":
        return value
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{name}: must be auto, cpu, cuda or cuda:N; got {value!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{name}: must be auto, cpu, cuda or cuda:N; got {value!r}")
    return str(device)


def _check_damping(name, value):
    if value == "auto":
        return value
    if isinstance(value, str):
        raise ConfigError(f"{name}: must be a positive number or 'auto', got {value!r}")
    return _check_float(0.0, strict=True)(name, value)


def _check_noise(name, value):
    if value == "auto":
        return value
    if isinstance(value, str):
        raise ConfigError(f"{name}: must be a positive number (the observation noise sigma) or 'auto', "
                          f"got {value!r}")
    return _check_float(0.0, strict=True)(name, value)


def _check_path(name, value):
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(f"{name}: must be a path, got {value!r}")
    return str(value)


FIELD_CHECKS = {
    "task": lambda n, v: _check_choice(n, v, TASKS),
    "algorithm": _check_algorithm,
    "device": _check_device,
    "seed": _check_int(0),
    "iterations": _check_int(1),
    "meta_batch": _check_int(1),
    "meta_lr": _check_float(0.0, strict=True),
    "damping_lr": _check_float(0.0, strict=True),
    "inner_lr": _check_float(0.0, strict=True),
    "inner_steps": _check_int(1),
    "first_order": _check_bool,
    "learn_damping": _check_bool,
    "eta": _check_float(0.0, strict=False),
    "damping": _check_damping,
    "damping_objective": lambda n, v: _check_choice(n, v, DAMPING_OBJECTIVES),
    "noise": _check_noise,
    "fisher": lambda n, v: _check_choice(n, v, FISHERS),
    "shots": _check_int(1),
    "query_shots": _check_int(1),
    "ways": _check_int(2),
    "eval_tasks": _check_int(1),
    "samples": _check_int(1),
    "log_every": _check_int(1),
    "eval_every": _check_int(0),
    "checkpoint_every": _check_int(0),
    "output": _check_path,
    "data": _check_path,
    "oneshot_runs": _check_path,
    "resume": _check_bool,
}
assert set(FIELD_CHECKS) == set(ExperimentConfig.field_names())
