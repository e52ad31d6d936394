"""`llama-fast train` under torchrun: 2 CPU ranks (gloo over 127.0.0.1), tiny sinusoid runs.

    python -m torch.distributed.run --nproc_per_node=2 -m llama_fast train sinusoid ... --device cpu

Checked: one copy of every output (rank 0 writes), metrics.csv rows that are the global means
over both ranks' tasks, bit-identical parameters on both ranks, a run killed by a failing rank
(ending the job with that rank named) and resumed ending exactly like an uninterrupted one, and
the world-size check on --resume.

Each launch costs ~15 CPU-seconds of start-up (torchrun and two workers importing torch), so
the `runs` fixture starts independent launches together, in two waves, and the tests only read
their results.
"""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_fast.experiments import cli, learners, training
from llama_fast.experiments.checkpoint import load_checkpoint
from llama_fast.experiments.config import ExperimentConfig

pytestmark = pytest.mark.integration   # torchrun runs of `llama-fast train`

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
HELPERS = ROOT / "tests" / "helpers"
FAIL_ENTRY = HELPERS / "dist_cli_fail.py"
LAUNCH_TIMEOUT = 240   # seconds: a hung job fails the test instead of blocking CI
TINY = ["--meta-batch", "4", "--eval-tasks", "4", "--samples", "2", "--log-every", "1",
        "--eval-every", "2", "--checkpoint-every", "2", "--device", "cpu"]
OUTPUTS = {"config.toml", "checkpoint.pt", "metrics.csv", "metrics.json", "learning_curves.png",
           "sinusoid.png"}

_ports = set()


def free_port():
    while True:   # distinct ports for the launches running together
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports:
            _ports.add(port)
            return port


def start(*train_args, entry=None, **env):
    """torchrun with 2 processes of `llama-fast train ARGS` (or of the failing `entry`)."""
    target = ["-m", "llama_fast"] if entry is None else [str(entry)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *target, "train", *train_args]
    # One thread per process: two ranks share the two cores.
    env = dict(os.environ, OMP_NUM_THREADS="1", **env,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc):
    """(exit code, output); a launch still running after LAUNCH_TIMEOUT is killed (its whole
    process group: torchrun and the workers this test started)."""
    try:
        output = proc.communicate(timeout=LAUNCH_TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
        return None, output
    return proc.returncode, output


@pytest.fixture(scope="module", autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()   # a sinusoid Trainer built here sets 1 thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_cli")
    dirs = {name: root / name for name in ("straight", "killed", "single")}
    # The checkpoint a 1-process run writes before its first step, to resume with 2 processes.
    with torch.random.fork_rng():
        config = ExperimentConfig.from_sources(None, {"task": "sinusoid", "output": str(dirs["single"]),
                                                      "device": "cpu", "meta_batch": 4})
        config.save(dirs["single"] / "config.toml")
        training.Trainer(config).save()
    # Wave 1: an uninterrupted run, one that rank 1 kills after the checkpoint at 2, and the
    # 1-process checkpoint resumed by 2 processes.
    wave = {"straight": start("sinusoid", "--output", dirs["straight"], *TINY, "--iterations", "4"),
            "killed": start("sinusoid", "--output", dirs["killed"], *TINY, "--iterations", "4",
                            entry=FAIL_ENTRY, LF_FAIL_RANK="1", LF_FAIL_AT="2"),
            "mismatch": start("--output", dirs["single"], "--resume", "--iterations", "4")}
    results = {name: finish(proc) for name, proc in wave.items()}
    # Wave 2: resume the killed run.
    results["resumed"] = finish(start("--output", dirs["killed"], "--resume"))
    return dirs, results


def _succeeded(runs, name):
    code, output = runs[1][name]
    assert code == 0, output[-4000:]
    return output


def _means_of_both_shards(config, iterations):
    """A single-process Trainer stepped over the union of the two ranks' task shards (each
    rank's sampler rebuilt here): the global meta-batch the 2-process run trained on.

    The single-process CLI run cannot serve as the reference: its one sampler draws other
    tasks than the two per-rank streams. Over the same tasks the results agree to float32
    rounding (a 2-rank step sums two half-batch gradients), not bit for bit."""
    trainer = training.Trainer(config)
    shards = [learners.Tasks(config, trainer.device, rank, 2).train for rank in range(2)]

    class BothShards:
        generator = shards[0].generator

        def sample(self):
            parts = [shard.sample() for shard in shards]
            return type(parts[0])(*(torch.cat(fields) for fields in zip(*parts)))

    trainer.tasks.train = BothShards()
    return trainer, [trainer.step() for _ in range(iterations)]


def test_two_ranks_write_one_copy_of_each_output(runs):
    output = _succeeded(runs, "straight")
    out = runs[0]["straight"]
    assert {p.name for p in out.iterdir()} == OUTPUTS   # no per-rank copies, no temp files
    assert output.count("wall time") == 1 and output.count("posterior LLAMA K10_steps10: delta per layer by the Laplace evidence") == 1
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["iterations"] == 4 and set(summary["results"]) == {
        "maml_point", "maml_glm", "llama_point", "llama_glm", "llama_nn"}
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["iteration"] == 4 and state["world_size"] == 2 and len(state["ranks"]) == 2


def test_metrics_are_global_means_and_ranks_hold_identical_parameters(runs):
    _succeeded(runs, "straight")
    out = runs[0]["straight"]
    config = ExperimentConfig.from_sources(out / "config.toml")
    with torch.random.fork_rng():
        trainer, steps = _means_of_both_shards(config, 4)
    with (out / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["meta_loss"]]
    assert len(rows) == 4 * 2
    for row in rows:
        expected = steps[int(row["iteration"]) - 1][row["algorithm"]]
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), (row, key)
    state = load_checkpoint(out / "checkpoint.pt")
    for name, params in state["models"].items():
        for key, value in params.items():
            torch.testing.assert_close(value, trainer.learner(name).model.state_dict()[key], rtol=1e-5, atol=1e-6)
    # Bit-identical on both ranks: each rank's digest of its own parameters, gathered into
    # the checkpoint, equals the digest of the saved (rank 0's) parameters.
    digest = training.parameter_digest(state["models"])
    assert [r["params_sha256"] for r in state["ranks"]] == [digest, digest]


def test_failing_rank_ends_the_job_naming_it(runs):
    code, output = runs[1]["killed"]
    assert code is not None, "the job hung"
    assert code != 0
    root_cause = output.partition("Root Cause (first observed failure)")[2]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause), output[-4000:]
    assert "injected failure on rank 1 at iteration 2" in root_cause, output[-4000:]


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(runs):
    _succeeded(runs, "straight")
    output = _succeeded(runs, "resumed")
    assert output.count("resuming") == 1 and "from iteration 2" in output   # rank 0 alone prints
    straight, resumed = (load_checkpoint(runs[0][n] / "checkpoint.pt") for n in ("straight", "killed"))
    for part in ("models", "optimizers"):
        _assert_equal(straight[part], resumed[part], part)
    for rank in range(2):   # each rank's task stream went on from where it stopped
        for stream in ("torch", "generators"):   # (numpy's and python's: unseeded, unused)
            _assert_equal(straight["ranks"][rank]["rng"][stream], resumed["ranks"][rank]["rng"][stream], rank)
    assert (runs[0]["killed"] / "metrics.csv").read_text() == (runs[0]["straight"] / "metrics.csv").read_text()
    results = [json.loads((runs[0][n] / "metrics.json").read_text())["results"] for n in ("straight", "killed")]
    assert results[0] == results[1]


def _assert_equal(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], (where, key))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for x, y in zip(a, b):
            _assert_equal(x, y, where)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_resume_with_another_world_size_is_a_one_line_error(runs, capsys):
    code, output = runs[1]["mismatch"]
    assert code != 0
    errors = [line for line in output.splitlines() if ": error: " in line]
    assert len(errors) == 1, output[-4000:]   # rank 0 says it; rank 1 exits quietly
    assert "written by a 1-process run, this run has 2" in errors[0]
    assert errors[0].startswith("llama-fast train: error:")
    root_cause = output.partition("Root Cause (first observed failure)")[2]
    assert re.search(r"exitcode\s*:\s*2\b", root_cause), output[-4000:]
    assert load_checkpoint(runs[0]["single"] / "checkpoint.pt")["iteration"] == 0   # untouched
    # The other way round: one process resuming the 2-process checkpoint.
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "--output", str(runs[0]["straight"]), "--resume", "--iterations", "6"])
    assert err.value.code == 2
    assert "written by a 2-process run, this run has 1" in capsys.readouterr().err

