"""The paired benchmark helper (benchmarks/lf_workloads.py) and the speed-up table's reading of
it (benchmarks/conftest.py), with a stand-in for pytest-benchmark's fixture."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lf_workloads():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield _load("lf_workloads")
    finally:
        sys.path.remove(str(BENCHMARKS))


class FakeBenchmark:
    """pytest-benchmark's pedantic(): setup before every round, its (args, kwargs) to target."""

    def __init__(self):
        self.extra_info, self.rounds = {}, None

    def pedantic(self, target, setup, rounds, iterations):
        assert iterations == 1
        self.rounds = rounds
        for _ in range(rounds):
            args, kwargs = setup()
            target(*args, **kwargs)


def test_one_round_without_warmup(lf_workloads):
    """The smoke-run form: exactly one reference call then one kernels call, recorded."""
    calls = []
    bench = FakeBenchmark()
    lf_workloads.paired_benchmark(bench, lambda: calls.append("k"), lambda: calls.append("r"), "cpu",
                                  rounds=1, warmup=False)
    assert calls == ["r", "k"] and bench.rounds == 1
    assert bench.extra_info["reference_rounds"] == 1
    with pytest.raises(ValueError, match="sizes the rounds from the warm-up"):
        lf_workloads.alternate(FakeBenchmark(), lambda: None, lambda: None, warmup=False)


def test_paired_benchmark_alternates_and_records_the_reference(lf_workloads, monkeypatch):
    monkeypatch.setattr(lf_workloads, "PAIRED_SECONDS", 0.05)
    calls = []
    bench = FakeBenchmark()
    lf_workloads.paired_benchmark(bench, lambda x: calls.append(("k", x)),
                                  lambda x: calls.append(("r", x)), "cpu", 7)
    assert all(arg == 7 for _, arg in calls)
    order = "".join(name for name, _ in calls)
    warmup = len(order) - 2 * bench.rounds
    assert warmup >= 2 and order[:warmup] == "kr" * (warmup // 2)      # warm-up pairs
    assert order[warmup:] == "rk" * bench.rounds                        # then reference, kernels, ...
    low, high = lf_workloads.PAIRED_ROUNDS
    assert low <= bench.rounds <= high
    assert bench.extra_info["impl"] == "kernels"
    assert bench.extra_info["reference_rounds"] == bench.rounds
    assert bench.extra_info["reference_median"] >= 0


def test_speed_up_table_reads_paired_reference(lf_workloads):
    conftest = _load("conftest")

    def bench(group, impl, median, **extra):
        return SimpleNamespace(group=group, extra_info={"impl": impl, **extra},
                               stats=SimpleNamespace(median=median))
    session = SimpleNamespace(benchmarks=[
        bench("op a", "kernels", 1.0, reference_median=3.0, reference_rounds=5),
        bench("op b", "kernels", 2.0), bench("op b", "reference", 4.0)])
    groups = conftest._medians_by_group(session)
    assert groups == {"op a (paired)": {"kernels": 1.0, "reference": 3.0},
                      "op b": {"kernels": 2.0, "reference": 4.0}}


def test_meta_table_ratios_use_the_paired_maml_median(lf_workloads):
    conftest = _load("conftest")

    def bench(algorithm, median, **extra):
        return SimpleNamespace(group="meta_step w T=4 cpu", stats=SimpleNamespace(median=median),
                               extra_info={"algorithm": algorithm, "tasks": 4, **extra})
    session = SimpleNamespace(benchmarks=[
        bench("maml", 2.0), bench("llama", 3.0, maml_median=1.0), bench("fomaml", 1.0),
        bench("loop-maml", 4.0, maml_median=2.0)])
    lines = []
    reporter = SimpleNamespace(section=lambda *a, **k: None, write_line=lines.append)
    conftest._meta_table(reporter, session)
    ratio = {line.split()[4]: line.split()[7] for line in lines[1:] if "speed-up" not in line}
    assert ratio == {"maml": "1.00", "llama": "3.00", "fomaml": "0.50", "loop-maml": "2.00"}
    assert lines[-1].endswith("speed-up over the loop: 2.00x")


@pytest.mark.integration
def test_peak_memory_probe_ignores_a_large_parent(lf_workloads):
    """meta_workloads' CPU probe reports the child's own peak: ru_maxrss would carry the
    parent's resident size over fork and exec (a 400 MB parent, a ~20 MB sinusoid step)."""
    import os
    import subprocess

    import torch
    held = torch.ones(100_000_000)   # 400 MB resident in this (parent) process
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCHMARKS.parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(BENCHMARKS / "meta_workloads.py"), "sinusoid", "4", "maml", "cpu"],
                         capture_output=True, text=True, env=env, cwd=BENCHMARKS, timeout=120)
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.strip().splitlines()[-1])
    assert 0 < peak < 150 * 2**20 and held.numel() == 100_000_000
