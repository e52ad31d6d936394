"""`llama-fast train` / `eval`: flag parsing, config files, one-line errors (exit 2), hand-off.

The runner (`llama_fast.experiments.run`'s `run` / `evaluate`) is replaced by a recorder, so these tests
check what the CLI hands over, not the training itself.
"""

import os
import sys
import types

import pytest

from llama_fast.experiments import cli
from llama_fast.experiments.checkpoint import save_checkpoint
from llama_fast.experiments.config import ExperimentConfig
from llama_fast.experiments.runfolder import locked_run_folder


class Calls(list):
    """The runner calls, ("run" | "evaluate", config); ``checkpoints``: the state each run got."""
    checkpoints: list


@pytest.fixture
def runner(monkeypatch):
    calls = Calls()
    calls.checkpoints = []
    fake = types.ModuleType("llama_fast.experiments.run")

    def run(config, checkpoint=None):
        calls.append(("run", config))
        calls.checkpoints.append(checkpoint)

    fake.run = run
    fake.evaluate = lambda config: calls.append(("evaluate", config))
    monkeypatch.setitem(sys.modules, "llama_fast.experiments.run", fake)
    return calls


def _exit_code_and_error(argv, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    return err.value.code, errors


def test_train_hands_the_config_over_and_writes_it(tmp_path, runner):
    out = tmp_path / "run"
    argv = ["train", "sinusoid", "--output", str(out), "--seed", "3", "--algorithm", "llama",
            "--meta-batch", "4", "--inner-lr", "0.02", "--inner-steps", "2", "--eta", "0.1",
            "--damping", "0.5", "--noise", "0.2", "--fisher", "mc", "--device", "cpu", "--first-order"]
    assert cli.main(argv) == 0
    (kind, config), = runner
    assert kind == "run"
    assert (config.seed, config.algorithm, config.meta_batch, config.inner_lr) == (3, ("llama",), 4, 0.02)
    assert (config.inner_steps, config.eta, config.damping, config.fisher) == (2, 0.1, 0.5, "mc")
    assert config.first_order and config.device == "cpu" and config.iterations == 70000
    assert config.noise == 0.2
    assert ExperimentConfig.from_sources(out / "config.toml") == config


def test_flags_override_the_config_file(tmp_path, runner):
    (tmp_path / "exp.toml").write_text(f'task = "sinusoid"\nseed = 9\nsamples = 7\noutput = "{tmp_path / "o"}"\n')
    assert cli.main(["train", "--config", str(tmp_path / "exp.toml"), "--samples", "20"]) == 0
    config = runner[0][1]
    assert (config.task, config.seed, config.samples) == ("sinusoid", 9, 20)


TRAIN_BAD = {  # flag: (the arguments after "train", the expected error)
    "task": (["mnist"], "must be one of sinusoid, omniglot"),
    "--algorithm": (["sinusoid", "--algorithm", "reptile"], "must be one of maml, llama"),
    "--device": (["sinusoid", "--device", "gpu0"], "auto, cpu, cuda or cuda:N"),
    "--seed": (["sinusoid", "--seed", "-1"], "must be >= 0"),
    "--iterations": (["sinusoid", "--iterations", "ten"], "expected an integer"),
    "--meta-batch": (["sinusoid", "--meta-batch", "0"], "must be >= 1"),
    "--meta-lr": (["sinusoid", "--meta-lr", "0"], "must be > 0"),
    "--damping-lr": (["sinusoid", "--damping-lr", "-1"], "argument --damping-lr: must be > 0"),
    "--inner-lr": (["sinusoid", "--inner-lr", "-0.1"], "must be > 0"),
    "--inner-steps": (["sinusoid", "--inner-steps", "1.5"], "expected an integer"),
    "--eta": (["sinusoid", "--eta", "-1"], "must be >= 0"),
    "--damping": (["sinusoid", "--damping", "none"], "expected a number or 'auto'"),
    "--damping-objective": (["sinusoid", "--damping-objective", "mse"], "must be one of evidence, nll"),
    "--noise": (["sinusoid", "--noise", "fitted"], "expected a number or 'auto'"),
    "--fisher": (["sinusoid", "--fisher", "diag"], "must be one of exact, mc, empirical"),
    "--shots": (["sinusoid", "--shots", "0"], "must be >= 1"),
    "--query-shots": (["sinusoid", "--query-shots", "0"], "must be >= 1"),
    "--ways": (["sinusoid", "--ways", "5"], "ways: applies to omniglot only"),
    "--eval-tasks": (["sinusoid", "--eval-tasks", "0"], "must be >= 1"),
    "--samples": (["sinusoid", "--samples", "0"], "must be >= 1"),
    "--log-every": (["sinusoid", "--log-every", "0"], "must be >= 1"),
    "--eval-every": (["sinusoid", "--eval-every", "-5"], "must be >= 0"),
    "--checkpoint-every": (["sinusoid", "--checkpoint-every", "x"], "expected an integer"),
    "--output": (["sinusoid", "--output", ""], "must be a path"),
    "--data": (["omniglot", "--data", "/nonexistent/omniglot"], "is not a directory"),
    "--config": (["sinusoid", "--config", "/nonexistent/exp.toml"], "does not exist"),
    "--resume": (["sinusoid", "--resume"], "--resume needs --output"),
    "--first-order": (["sinusoid", "--first-order=yes"], "ignored explicit argument 'yes'"),
    "--learn-damping": (["sinusoid", "--algorithm", "maml", "--learn-damping"],
                        "--learn-damping meta-learns LLAMA's prior precision; --algorithm has no llama"),
    "--force": (["sinusoid", "--force=yes"], "ignored explicit argument 'yes'"),
}


def _flags_of(subcommand: str) -> set:
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[subcommand]
    flags = {a.option_strings[0] if a.option_strings else a.dest for a in sub._actions}
    return flags - {"-h", "run_dir"}


def test_every_train_flag_has_a_bad_value_case():
    assert set(TRAIN_BAD) == _flags_of("train")


@pytest.mark.parametrize("flag", sorted(TRAIN_BAD))
def test_train_bad_values_exit_2_with_one_line(flag, tmp_path, capsys, runner, monkeypatch):
    monkeypatch.delenv("LLAMA_FAST_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # the default output folder would land here
    arguments, message = TRAIN_BAD[flag]
    code, errors = _exit_code_and_error(["train", *arguments], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("llama-fast train: error:") and message in errors[0]
    assert not runner and not list(tmp_path.iterdir())  # nothing written


def test_resume_rules(tmp_path, capsys, runner):
    out = tmp_path / "run"
    assert cli.main(["train", "sinusoid", "--output", str(out), "--iterations", "50"]) == 0
    code, errors = _exit_code_and_error(["train", "sinusoid", "--output", str(out), "--resume"], capsys)
    assert code == 2 and "no checkpoint.pt" in errors[0]
    # A checkpoint of both learners (--resume loads it and checks its algorithms first).
    save_checkpoint(out / "checkpoint.pt", {"models": {"maml": {}, "llama": {}}})
    code, errors = _exit_code_and_error(["train", "sinusoid", "--output", str(out)], capsys)
    assert code == 2 and "already holds checkpoint.pt" in errors[0]
    assert cli.main(["train", "--output", str(out), "--resume", "--samples", "3"]) == 0
    resumed = runner[-1][1]
    assert resumed.resume and resumed.iterations == 50 and resumed.samples == 3  # base: the run's config
    assert runner.checkpoints[-1] == {"models": {"maml": {}, "llama": {}}}   # loaded once, handed over



@pytest.mark.parametrize("seed", ["99999999999999999999999", str(2**63)])
def test_a_seed_beyond_64_bits_is_a_one_line_error(seed, tmp_path, capsys, runner):
    code, errors = _exit_code_and_error(["train", "sinusoid", "--output", str(tmp_path / "r"), "--seed", seed],
                                        capsys)
    assert code == 2 and len(errors) == 1 and "argument --seed: must be <= 9223372036854775807" in errors[0]
    assert not runner and not list(tmp_path.iterdir())
    (tmp_path / "exp.toml").write_text(f"task = 'sinusoid'\nseed = {seed}\n")
    code, errors = _exit_code_and_error(["train", "--config", str(tmp_path / "exp.toml")], capsys)
    assert code == 2 and len(errors) == 1 and "seed: must be <= 9223372036854775807" in errors[0]
    assert cli.main(["train", "sinusoid", "--output", str(tmp_path / "r"), "--seed", str(2**63 - 1)]) == 0


@pytest.mark.parametrize("below", ["", "run", "a/b"])
def test_an_output_under_a_file_is_a_one_line_error(below, tmp_path, capsys, runner):
    (tmp_path / "file").write_text("mine\n")
    out = tmp_path / "file" / below
    code, errors = _exit_code_and_error(["train", "sinusoid", "--output", str(out)], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].endswith(f"--output {out}: {tmp_path / 'file'} is a file, not a folder")
    assert not runner and (tmp_path / "file").read_text() == "mine\n"


def test_an_output_without_write_permission_is_a_one_line_error(tmp_path, capsys, runner, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)   # as a user without the right
    code, errors = _exit_code_and_error(["train", "sinusoid", "--output", str(tmp_path / "run")], capsys)
    assert code == 2 and len(errors) == 1 and "--output" in errors[0] and "not writable" in errors[0]
    assert not runner and not (tmp_path / "run" / "config.toml").exists()


@pytest.mark.parametrize("subcommand", ["train", "eval"])
def test_help_explains_every_flag(subcommand, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main([subcommand, "--help"])
    assert err.value.code == 0
    text = capsys.readouterr().out
    for flag in _flags_of(subcommand) - {"task"}:
        assert flag in text
    parser = cli.build_parser()._subparsers._group_actions[0].choices[subcommand]
    assert all(action.help for action in parser._actions)


def test_a_folder_that_is_not_a_run_is_refused_without_force(tmp_path, capsys, runner):
    """--output at an existing folder holding files that no run wrote (no config.toml) would
    replace the user's metrics.csv, metrics.json or plots: refused, nothing written, unless
    --force; an empty folder and a run folder are fine."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.csv").write_text("my own numbers\n")
    code, errors = _exit_code_and_error(["train", "sinusoid", "--output", str(out)], capsys)
    assert code == 2 and len(errors) == 1 and "not a llama-fast run" in errors[0] and "--force" in errors[0]
    assert not runner and sorted(p.name for p in out.iterdir()) == ["metrics.csv"]
    assert cli.main(["train", "sinusoid", "--output", str(out), "--force"]) == 0
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", "sinusoid", "--output", str(tmp_path / "empty")]) == 0
    assert cli.main(["train", "sinusoid", "--output", str(out)]) == 0   # a run folder now
    assert [kind for kind, _ in runner] == ["run"] * 3


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path, capsys, runner):
    """While one run holds its output folder (its lock), a second `train` into the same folder
    stops with a one-line error before writing anything, and the folder is free again after."""
    out = tmp_path / "run"
    with locked_run_folder(out):
        code, errors = _exit_code_and_error(["train", "sinusoid", "--output", str(out)], capsys)
        assert code == 2 and len(errors) == 1 and "is in use by another llama-fast run" in errors[0]
        assert not runner and not list(out.iterdir())
    assert cli.main(["train", "sinusoid", "--output", str(out)]) == 0
    assert [kind for kind, _ in runner] == ["run"] and (out / "config.toml").is_file()


# ----------------------------------------------------------------------------- eval


@pytest.fixture
def trained_run(tmp_path, runner):
    out = tmp_path / "run"
    cli.main(["train", "sinusoid", "--output", str(out), "--samples", "4"])
    (out / "checkpoint.pt").write_bytes(b"")
    runner.clear()
    return out


def test_eval_hands_the_run_config_over(trained_run, tmp_path, runner):
    runs = tmp_path / "all_runs"
    runs.mkdir()
    assert cli.main(["eval", str(trained_run), "--eval-tasks", "50", "--oneshot-runs", str(runs)]) == 0
    (kind, config), = runner
    assert kind == "evaluate" and config.output == str(trained_run) and config.samples == 4
    assert config.eval_tasks == 50 and config.oneshot_runs == str(runs)


EVAL_BAD = {
    "--algorithm": ("maml,", "must be one of maml, llama"),
    "--device": ("tpu", "auto, cpu, cuda or cuda:N"),
    "--seed": ("x", "expected an integer"),
    "--inner-lr": ("0", "must be > 0"),
    "--inner-steps": ("0", "must be >= 1"),
    "--damping": ("-1", "must be > 0"),
    "--damping-objective": ("marglik", "must be one of evidence, nll"),
    "--noise": ("0", "must be > 0"),
    "--fisher": ("kfac", "must be one of exact, mc, empirical"),
    "--shots": ("0", "must be >= 1"),
    "--query-shots": ("-2", "must be >= 1"),
    "--ways": ("3", "ways: applies to omniglot only"),
    "--eval-tasks": ("0", "must be >= 1"),
    "--samples": ("many", "expected an integer"),
    "--data": ("", "must be a path"),
    "--oneshot-runs": ("/nonexistent/runs", "is not a directory"),
    "--config": ("/nonexistent/exp.toml", "not found"),
}


def test_every_eval_flag_has_a_bad_value_case():
    assert set(EVAL_BAD) == _flags_of("eval")


@pytest.mark.parametrize("flag", sorted(EVAL_BAD))
def test_eval_bad_values_exit_2_with_one_line(flag, trained_run, capsys, runner):
    value, message = EVAL_BAD[flag]
    code, errors = _exit_code_and_error(["eval", str(trained_run), flag, value], capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert errors[0].startswith("llama-fast eval: error:")
    assert not runner


def test_eval_needs_a_trained_run(tmp_path, capsys, runner):
    code, errors = _exit_code_and_error(["eval", str(tmp_path / "absent")], capsys)
    assert code == 2 and "not a run folder" in errors[0]
    code, errors = _exit_code_and_error(["eval", str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path} is not a run folder: it holds no config.toml" in errors[0]
    ExperimentConfig.from_sources(None, {"output": str(tmp_path)}).save(tmp_path / "config.toml")
    code, errors = _exit_code_and_error(["eval", str(tmp_path)], capsys)
    assert code == 2 and "no checkpoint.pt" in errors[0]
