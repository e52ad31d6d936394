"""Distributed meta_step on 2 CPU processes (gloo over 127.0.0.1, launched with torchrun):
the same parameters as a single-process meta_step over the same tasks (MAML and LLAMA, unequal
shards), and a failing rank ending the job with its rank named instead of hanging.

Each launch starts two fresh Python processes (~5 s of imports each on 2 busy cores), so all
algorithms run in one launch; the whole file stays well under a minute."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dist_worker
import llama_fast as lf
from llama_fast.meta import distributed

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
HELPERS = ROOT / "tests" / "helpers"
WORKER = HELPERS / "dist_worker.py"
LAUNCH_TIMEOUT = 120   # seconds: a hung job fails the test instead of blocking CI


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra):
    # One thread per process: two ranks share the two cores.
    env = dict(os.environ, OMP_NUM_THREADS="1", LF_TEST_TIMEOUT="10",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def torchrun(*args, nproc=2, **env):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=worker_env(**env),
                          timeout=LAUNCH_TIMEOUT, cwd=ROOT)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Both algorithms, 2 steps of a 5-task meta-batch split 3 + 2 over 2 ranks."""
    out = tmp_path_factory.mktemp("dist")
    proc = torchrun(out, "maml,llama", 2, 5)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["maml", "llama"])
def test_two_ranks_match_single_process(two_rank_run, algorithm):
    model, history = dist_worker.train(algorithm, steps=2, tasks=5)
    initial, _ = dist_worker.make_model_and_optimizer()
    for name, expected in model.named_parameters():
        got = two_rank_run[0][algorithm]["params"][name]
        torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-6 * expected.abs().max().item())
        # Every rank took the identical optimizer steps.
        assert torch.equal(got, two_rank_run[1][algorithm]["params"][name])
        assert not torch.equal(got, dict(initial.named_parameters())[name].detach()), "no step was taken"
    # The logged metrics are the global means over all 5 tasks, the same on both ranks.
    for rank_result in two_rank_run:
        for got, expected in zip(rank_result[algorithm]["history"], history):
            assert got.keys() == expected.keys()
            for key in expected:
                assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


def failed_run_root_cause(tmp_path, **env) -> tuple[str, str]:
    """Launches 2 ranks whose rank 1 fails before its step 1 (how: `env`); checks the job ends
    non-zero within 60 s, names rank 1 as torchrun's root cause and saved nothing. Returns
    (root cause section, whole output)."""
    start = time.monotonic()
    proc = torchrun(tmp_path, "maml", 4, 4, 1, 1, **env)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    root_cause = output.partition("Root Cause (first observed failure)")[2]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause), output[-3000:]
    assert elapsed < 60, f"the job took {elapsed:.0f}s to end"
    assert not (tmp_path / "rank0.pt").exists()
    return root_cause, output


@pytest.mark.integration
def test_failing_rank_ends_job_naming_it(tmp_path):
    # torchrun's summary names the first failure: its rank and (from @record's error file)
    # its traceback.
    root_cause, output = failed_run_root_cause(tmp_path)   # rank 1 raises
    assert "injected failure on rank 1 at step 1" in root_cause, output[-3000:]


@pytest.mark.integration
def test_killed_rank_ends_job_naming_it(tmp_path):
    """A rank killed mid-training (SIGKILL at its step 1: no exception, no error file): torchrun's
    agent sees the dead worker, stops the survivor (blocked in the step's all-reduce) and names
    the rank and the signal."""
    root_cause, output = failed_run_root_cause(tmp_path, LF_TEST_FAIL_MODE="kill")
    assert "SIGKILL" in root_cause, output[-3000:]


@pytest.mark.integration
def test_stalled_rank_times_out_without_torchrun(tmp_path):
    """Without torchrun's agent to stop the survivors, a rank whose peer is alive but never
    joins the step's all-reduce raises after the collective timeout (10 s here) instead of
    hanging."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = worker_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LF_TEST_FAIL_MODE="hang")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "maml", "4", "4", "1", "1"],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        output = procs[0].communicate(timeout=LAUNCH_TIMEOUT)[0]
    finally:
        for p in procs:   # rank 1 sleeps on: end it (only the processes this test started)
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode != 0
    assert "rank 0 of 2: the meta_step all-reduce failed" in output, output[-3000:]
    # gloo reports the timeout as "Timed out ..." or, when the pair's own timer fires first,
    # "Application timeout caused pair closure": both are the collective timeout.
    assert re.search(r"Timed out|Application timeout", output), output[-3000:]


def test_shard_sizes_and_batches():
    assert distributed.shard_sizes(5, 2) == [3, 2]
    assert distributed.shard_sizes(8, 4) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="at least one task"):
        distributed.shard_sizes(1, 2)
    batch = dist_worker.sinusoid_tasks(0, 5)
    parts = [distributed.shard_batch(batch, r, 2) for r in range(2)]
    assert [p.tasks for p in parts] == [3, 2]
    assert torch.equal(torch.cat([p.query_y for p in parts]), batch.query_y)
    assert distributed.shard_seed(0, 0) != distributed.shard_seed(0, 1)


def test_buckets_follow_reverse_order_dtype_and_cap():
    from llama_fast.meta.distributed import _make_buckets

    params = [torch.zeros(10, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
              torch.zeros(4, dtype=torch.float32), torch.zeros(5, dtype=torch.float64)]
    buckets = _make_buckets(params, cap_bytes=12 * 8)
    # Reverse order; a new bucket at a dtype change or when the cap would be exceeded.
    assert [[p.numel() for p in b.params] for b in buckets] == [[5], [4], [3], [10]]
    assert [b.buffer.dtype for b in buckets] == [torch.float64, torch.float32, torch.float64, torch.float64]
    assert [len(b.params) for b in _make_buckets(params[:2], cap_bytes=2**20)] == [2]
    model, _ = dist_worker.make_model_and_optimizer()
    assert len(_make_buckets(list(model.parameters()), dist_worker.BUCKET_BYTES["llama"])) == 3


def test_single_process_context_and_errors(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init_from_env(timeout=5)
    assert (ctx.rank, ctx.world_size, ctx.group) == (0, 1, None) and ctx.is_main
    assert distributed.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        distributed.init_from_env(timeout=5)
    with pytest.raises(ValueError, match="timeout"):
        distributed.init_from_env(timeout=0)


def test_helpers_are_single_process_no_ops_without_a_process_group(monkeypatch):
    """Without torch.distributed initialised, a script written for torchrun runs as one
    process: broadcast and barrier do nothing, gather returns [obj], and a GradientSync leaves
    the step exactly as without one (the batch's own means as global_means)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, opt = dist_worker.make_model_and_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    distributed.broadcast_parameters(model, None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    distributed.barrier(None, "nothing")
    assert distributed.gather_to_main({"a": 1}, None, "nothing") == [{"a": 1}]
    twin, twin_opt = dist_worker.make_model_and_optimizer()
    twin.load_state_dict(model.state_dict())
    sync = distributed.GradientSync(model, None)
    for step in range(2):
        batch = dist_worker.sinusoid_tasks(step, 3)
        out = lf.meta_step(model, batch, opt, grad_sync=sync, **dist_worker.SETTINGS["llama"])
        ref = lf.meta_step(twin, batch, twin_opt, **dist_worker.SETTINGS["llama"])
        assert out.global_means.keys() == ref.global_means.keys()
        assert all(torch.equal(out.global_means[k], ref.global_means[k]) for k in ref.global_means)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_helpers_refuse_a_torchrun_process_that_has_not_joined(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model, _ = dist_worker.make_model_and_optimizer()
    for call in (lambda: distributed.broadcast_parameters(model, None),
                 lambda: distributed.GradientSync(model, None),
                 lambda: distributed.gather_to_main(1, None, "x")):
        with pytest.raises(RuntimeError, match="init_from_env"):
            call()


def test_latest_step_works_stay_referenced_until_the_next_step():
    """The Work handles of a step's collectives stay referenced from Python after meta_step
    returns (llama_fast.meta.distributed._latest_works), so that gloo's worker thread never frees
    one (and with it the tensors Python shares) while the interpreter exits: that release
    took the GIL from a non-main thread during finalization and aborted 2 of 40 finished
    two-rank jobs. A one-rank gloo group in this process."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        model, opt = dist_worker.make_model_and_optimizer()
        group = torch.distributed.group.WORLD
        buckets = len(distributed._make_buckets(list(model.parameters()), distributed.DEFAULT_BUCKET_BYTES))
        sync = distributed.GradientSync(model, group)
        lf.meta_step(model, dist_worker.sinusoid_tasks(0, 3), opt, grad_sync=sync,
                     **dist_worker.SETTINGS["llama"])
        first = list(distributed._latest_works)
        assert len(first) == 1 + buckets   # the metrics all-reduce and one per bucket
        assert all(isinstance(w, torch.distributed.Work) and w.is_completed() for w in first)
        lf.meta_step(model, dist_worker.sinusoid_tasks(1, 3), opt, grad_sync=sync,
                     **dist_worker.SETTINGS["llama"])
        second = distributed._latest_works
        assert len(second) == len(first) and not any(a is b for a in first for b in second)
    finally:
        torch.distributed.destroy_process_group()
        distributed._latest_works.clear()
