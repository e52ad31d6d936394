"""The `llama-fast` command (also `python -m llama_fast`).

Subcommands: `info` (build, devices, registered ops), `bench` (the benchmark suite), and the
experiments `train` and `eval`. Those two build and validate an `ExperimentConfig` here (every
bad value is a one-line `parser.error`, exit code 2) and hand it to
`llama_fast.experiments.run.run` / `evaluate`, which hold the meta-training loop.

`train` also runs distributed, unchanged, under `torchrun --nproc_per_node=N -m llama_fast train
...`: every rank parses the same flags; rank 0 writes config.toml, and the experiment runner
joins the process group.
"""

import argparse
import functools
import importlib
import subprocess
import sys
from pathlib import Path

import torch

import llama_fast as lf
from ..meta import distributed
from .checkpoint import CheckpointError, TrainingDiverged, check_algorithms, load_checkpoint
from .config import (ALGORITHMS, CHECKPOINT_FILE, CONFIG_FILE, DAMPING_OBJECTIVES, FIELD_CHECKS, FISHERS,
                     QUICKSTART, ConfigError, ExperimentConfig)
from .runfolder import RunFolderBusy, RunFolderUnusable, locked_run_folder

RUNNER = "llama_fast.experiments.run"


def registered_ops() -> list[str]:
    """Every op the extension registered (``llama_fast::name``), whether or not Python has
    touched it yet: ``dir(torch.ops.llama_fast)`` lists only the ops already looked up."""
    names = {name.split("::", 1)[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("llama_fast::")}
    return sorted(names)


def cmd_info(args) -> int:
    import llama_fast._build_info as build

    print(f"llama_fast {lf.__version__}")
    print(f"torch {torch.__version__} (built against {build.TORCH_VERSION})")
    print(f"CUDA kernels built: {build.WITH_CUDA}; GPU visible: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    print("ops: " + ", ".join(f"torch.ops.llama_fast.{name}" for name in registered_ops()))
    return 0


def cmd_bench(args) -> int:
    root = Path(args.root).resolve()
    if not (root / "benchmarks").is_dir():
        print(f"llama-fast bench: no benchmarks/ under {root}; run it from a source checkout "
              "or pass --root", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "pytest", "--benchmark", "-q", *args.pytest_args]
    return subprocess.call(command, cwd=root)


# ----------------------------------------------------------------------------- train / eval flags


def _auto_or_float(text: str):
    return text if text == "auto" else float(text)


_PARSERS = {int: "an integer", float: "a number", _auto_or_float: "a number or 'auto'", str: "a value"}


def _flag_type(field: str, parse):
    """argparse type: parse the text, then the config's own check for that field."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_PARSERS[parse]}, got {text!r}") from None
        try:
            return FIELD_CHECKS[field](field, value)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None

    return convert


# config field: (flag, text parser, metavar, help); the help names the default where it is fixed.
_FLAGS = {
    "algorithm": ("--algorithm", str, "NAMES",
                  f"comma-separated algorithms to train/evaluate side by side: {', '.join(ALGORITHMS)} "
                  "(default: maml,llama)"),
    "device": ("--device", str, "DEVICE", "auto, cpu, cuda or cuda:N (default: auto = cuda if visible)"),
    "seed": ("--seed", int, "N", "random seed of the run: model init, task sampling, posterior samples (default: 0)"),
    "iterations": ("--iterations", int, "N", "meta-training iterations (default: 70000 sinusoid, 60000 omniglot)"),
    "meta_batch": ("--meta-batch", int, "T", "tasks per meta-update (default: 25 sinusoid, 32 omniglot)"),
    "meta_lr": ("--meta-lr", float, "LR", "outer-loop Adam learning rate (default: 0.001)"),
    "damping_lr": ("--damping-lr", float, "LR", "--learn-damping: Adam learning rate of log delta (default: 0.01)"),
    "inner_lr": ("--inner-lr", float, "ALPHA", "inner-loop SGD step size (default: 0.01 sinusoid, 0.4 omniglot)"),
    "inner_steps": ("--inner-steps", int, "K", "inner-loop gradient steps (default: 1)"),
    "eta": ("--eta", float, "ETA", "LLAMA weight of log det H_i / P (P: the K-FAC parameters), >= 0 (default: 1)"),
    "damping": ("--damping", _auto_or_float, "DELTA",
                "prior precision delta added to the K-FAC curvature, > 0, or 'auto' (default: auto)"),
    "damping_objective": ("--damping-objective", str, "OBJ",
                          f"how --damping auto chooses each learner's posterior delta on the meta-validation "
                          f"tasks: {', '.join(DAMPING_OBJECTIVES)}; evidence = per K-FAC layer, the Laplace "
                          "marginal likelihood of the support sets; nll = one delta, the GLM predictive NLL "
                          "of the query sets (laplace-torch's gridsearch); evidence-nll = the evidence's "
                          "deltas times the factor >= 1 with the lowest such NLL (default: evidence-nll)"),
    "noise": ("--noise", _auto_or_float, "SIGMA",
              "sinusoid: the Gaussian observation noise sigma > 0 of every predictive in the evaluation, "
              "or 'auto': per evaluation setting (K, inner steps) and per results column, the sigma on a "
              "log grid (0.01 ... 10, quarter decades) with the lowest mean predictive NLL of the "
              "meta-validation query sets (laplace-torch fits sigma_noise likewise); training's MSE "
              "is unaffected; omniglot ignores it (default: auto)"),
    "fisher": ("--fisher", str, "TYPE", f"K-FAC curvature: {', '.join(FISHERS)} (default: exact)"),
    "shots": ("--shots", int, "K", "support examples per class (omniglot) or per task (sinusoid) "
                                   "(default: 1 omniglot, 10 sinusoid)"),
    "query_shots": ("--query-shots", int, "Q", "query examples per class/task (default: = --shots; 10 sinusoid)"),
    "ways": ("--ways", int, "N", "classes per Omniglot task (default: 5; Finn et al.'s 20-way: "
                                 "--ways 20 --meta-batch 16 --inner-lr 0.1 --inner-steps 5)"),
    "eval_tasks": ("--eval-tasks", int, "N", "meta-test tasks for the final evaluation (default: 600)"),
    "samples": ("--samples", int, "S", "posterior samples per task for LLAMA's predictive (default: 10)"),
    "log_every": ("--log-every", int, "N", "iterations between metrics.csv rows (default: 100)"),
    "eval_every": ("--eval-every", int, "N", "iterations between meta-validation runs, 0 = never (default: 1000)"),
    "checkpoint_every": ("--checkpoint-every", int, "N",
                         "iterations between checkpoints, 0 = only at the end (default: 1000)"),
    "output": ("--output", str, "DIR", "run folder for config.toml, metrics.csv, checkpoint.pt and plots "
                                       "(default: runs/<task>-seed<seed>)"),
    "data": ("--data", str, "DIR", "folder holding the Omniglot zips or unpacked folders "
                                   "(default: $LLAMA_FAST_DATA)"),
    "oneshot_runs": ("--oneshot-runs", str, "DIR",
                     "also evaluate on Lake et al.'s one-shot runs (a folder of runNN/ with class_labels.txt)"),
}

TRAIN_FIELDS = [f for f in _FLAGS if f != "oneshot_runs"]
EVAL_FIELDS = ["algorithm", "device", "seed", "inner_lr", "inner_steps", "damping", "damping_objective",
               "noise", "fisher", "shots",
               "query_shots", "ways", "eval_tasks", "samples", "data", "oneshot_runs"]


def _add_flags(parser: argparse.ArgumentParser, fields) -> None:
    for field in fields:
        flag, parse, metavar, text = _FLAGS[field]
        parser.add_argument(flag, dest=field, type=_flag_type(field, parse), metavar=metavar,
                            default=argparse.SUPPRESS, help=text)


def _add_train_parser(sub) -> None:
    train = sub.add_parser(
        "train", help="meta-train MAML and/or LLAMA on sinusoid regression or Omniglot",
        description="Meta-train MAML and/or LLAMA. Settings come from the defaults, then --config, "
                    "then the flags; the result is written to <output>/config.toml.")
    # default None, not SUPPRESS: argparse would run the type check on the SUPPRESS string.
    train.add_argument("task", nargs="?", type=_flag_type("task", str), default=None,
                       metavar="{sinusoid,omniglot}",
                       help="the task family (or set task in --config); with neither, the quickstart: "
                            "MAML and LLAMA on sinusoid in a few minutes, into runs/quickstart")
    train.add_argument("--config", metavar="FILE", default=None,
                       help="TOML file of settings (keys as the flags, with underscores); flags override it")
    train.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                       help=f"continue the run in --output from its {CHECKPOINT_FILE} (its {CONFIG_FILE} "
                            "is the base config unless --config is given)")
    train.add_argument("--first-order", dest="first_order", action="store_true", default=argparse.SUPPRESS,
                       help="first-order meta-gradients (no backprop through the inner loop)")
    train.add_argument("--learn-damping", dest="learn_damping", action="store_true", default=argparse.SUPPRESS,
                       help="LLAMA: meta-learn one prior precision delta per K-FAC layer (log delta beside "
                            "theta in Adam) through the Laplace evidence's prior and Occam terms; its "
                            "evaluation then uses the learned deltas")
    train.add_argument("--force", action="store_true", default=False,
                       help=f"write into an --output folder that holds files but is not a run (no "
                            f"{CONFIG_FILE}); its metrics.csv, metrics.json and plots are replaced")
    _add_flags(train, TRAIN_FIELDS)
    train.set_defaults(run=cmd_train, parser=train)


def _add_eval_parser(sub) -> None:
    evaluate = sub.add_parser(
        "eval", help="evaluate a trained run on meta-test tasks (and Lake's one-shot runs)",
        description="Evaluate the checkpoint of a training run on meta-test tasks: accuracy/MSE, NLL, "
                    "calibration and coverage with 95% intervals (sinusoid: with the observation noise "
                    "sigma fitted on the meta-validation tasks, or --noise SIGMA). The run's config.toml "
                    "is the base; flags override it.")
    evaluate.add_argument("run_dir", metavar="RUN", help=f"a training run folder (holding {CONFIG_FILE} "
                                                         f"and {CHECKPOINT_FILE})")
    evaluate.add_argument("--config", metavar="FILE", default=None,
                          help=f"TOML file of settings to use instead of RUN/{CONFIG_FILE}")
    _add_flags(evaluate, EVAL_FIELDS)
    evaluate.set_defaults(run=cmd_eval, parser=evaluate)


_NOT_CONFIG = {"command", "run", "parser", "config", "run_dir", "force"}


def _overrides(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and v is not None}


def _build_config(parser, toml_path, overrides) -> ExperimentConfig:
    try:
        config = ExperimentConfig.from_sources(toml_path, overrides)
        config.resolved_device()
    except ConfigError as err:
        parser.error(str(err))
    return config


def _holds_other_files(folder: Path) -> bool:
    """An existing, non-empty folder that no run wrote (no config.toml): training into it would
    replace whatever metrics.csv, metrics.json or plots it holds."""
    return folder.is_dir() and not (folder / CONFIG_FILE).exists() and any(folder.iterdir())


def _train_config(parser, args) -> ExperimentConfig:
    overrides = _overrides(args)
    toml_path = args.config
    if overrides.get("resume") and toml_path is None:
        if "output" not in overrides:
            parser.error("--resume needs --output DIR (the run to continue) or --config")
        toml_path = Path(overrides["output"]) / CONFIG_FILE
    if toml_path is None and "task" not in overrides:
        overrides = {**QUICKSTART, **overrides}   # plain `llama-fast train`: the quickstart run
    config = _build_config(parser, toml_path, overrides)
    checkpoint = Path(config.output) / CHECKPOINT_FILE
    if config.resume and not checkpoint.is_file():
        parser.error(f"--resume: no {CHECKPOINT_FILE} in {config.output}")
    if not config.resume and checkpoint.exists():
        parser.error(f"{config.output} already holds {CHECKPOINT_FILE}; pass --resume to continue it "
                     "or choose another --output")
    if not config.resume and not getattr(args, "force", False) and _holds_other_files(Path(config.output)):
        parser.error(f"{config.output} holds files but is not a llama-fast run (no {CONFIG_FILE}); "
                     "choose another --output, or pass --force to write into it")
    if config.learn_damping and "llama" not in config.algorithm:
        parser.error("--learn-damping meta-learns LLAMA's prior precision; --algorithm has no llama")
    world_size = distributed.launched_world_size()
    if config.meta_batch < world_size:
        parser.error(f"--meta-batch {config.meta_batch} cannot give each of the {world_size} "
                     "torchrun processes a task; use a meta-batch of at least the process count")
    return config


def _resumable_state(config: ExperimentConfig) -> dict:
    """The run's checkpoint, loaded (and verified) once, holding a model for every algorithm
    asked for (a CheckpointError otherwise, before anything in the folder changes)."""
    path = Path(config.output) / CHECKPOINT_FILE
    state = load_checkpoint(path)
    check_algorithms(state, config.algorithm, path)
    return state


def cmd_train(args) -> int:
    config = _train_config(args.parser, args)
    runner = _runner()
    if not distributed.is_main_process():   # torchrun: rank 0 alone writes and holds the folder
        return _guarded(args.parser, runner.run, config) or 0
    try:
        with locked_run_folder(config.output):
            run = runner.run
            if config.resume:   # config.toml changes only once the checkpoint is known to fit
                state = _guarded(args.parser, _resumable_state, config)
                run = functools.partial(runner.run, checkpoint=state)   # not read a second time
            config.save(Path(config.output) / CONFIG_FILE)
            return _guarded(args.parser, run, config) or 0
    except RunFolderBusy as err:
        args.parser.error(str(err))
    except RunFolderUnusable as err:
        args.parser.error(f"--output {err}")


def cmd_eval(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        args.parser.error(f"{run_dir} is not a run folder")
    toml_path = args.config if args.config is not None else run_dir / CONFIG_FILE
    if not Path(toml_path).is_file():
        if args.config is None:
            args.parser.error(f"{run_dir} is not a run folder: it holds no {CONFIG_FILE} (the folder "
                              "`llama-fast train --output DIR` writes); pass a run folder, or --config FILE "
                              "for a run written without one")
        args.parser.error(f"--config {toml_path} not found")
    if not (run_dir / CHECKPOINT_FILE).is_file():
        args.parser.error(f"no {CHECKPOINT_FILE} in {run_dir}; train first")
    overrides = {**_overrides(args), "output": str(run_dir), "resume": False}
    config = _build_config(args.parser, toml_path, overrides)
    return _guarded(args.parser, _runner().evaluate, config) or 0


def _guarded(parser, function, config):
    """``function(config)``; an unreadable checkpoint is a one-line error with exit code 2 (the
    same as any other bad input), training stopped on non-finite steps one with exit code 1,
    not a traceback."""
    try:
        return function(config)
    except CheckpointError as err:
        if not distributed.is_main_process():
            raise SystemExit(2) from None   # torchrun: every rank fails alike, rank 0 says why
        parser.error(str(err))
    except TrainingDiverged as err:   # not bad input: exit code 1, still one line
        if not distributed.is_main_process():
            raise SystemExit(1) from None
        parser.exit(1, f"{parser.prog}: error: {err}\n")


def _runner():
    """The experiment runner, imported when a run starts (it imports the whole meta layer)."""
    return importlib.import_module(RUNNER)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-fast", description="Fast Bayesian gradient-based meta-learning (MAML, LLAMA)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show the build, the devices and the registered ops")
    info.set_defaults(run=cmd_info)
    bench = sub.add_parser("bench", help="run the benchmark suite (pytest --benchmark)")
    bench.add_argument("--root", default=".", help="source checkout holding benchmarks/ (default: .)")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra arguments for pytest")
    bench.set_defaults(run=cmd_bench)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
