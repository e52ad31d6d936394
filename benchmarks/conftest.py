"""Benchmark fixtures (devices) and the speed-up table.

Every benchmark sets ``benchmark.group`` to the workload and ``benchmark.extra_info["impl"]``
to "kernels" or "reference"; at the end of the run a table of reference/kernels median ratios
per group is printed (the figures that go into RESULTS.md).
"""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _medians_by_group(session):
    groups = {}
    for bench in getattr(session, "benchmarks", []):
        impl = bench.extra_info.get("impl")
        if impl is None or bench.stats is None:
            continue
        groups.setdefault(bench.group, {})[impl] = bench.stats.median
    return groups


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return
    groups = _medians_by_group(session)
    rows = [(g, v["reference"], v["kernels"]) for g, v in sorted(groups.items())
            if "reference" in v and "kernels" in v]
    if not rows:
        return
    tr = terminalreporter
    tr.section("llama_fast speed-up (median reference time / median kernels time)")
    tr.write_line(f"{'workload':<58} {'reference':>12} {'kernels':>12} {'speed-up':>9}")
    for group, ref, ker in rows:
        tr.write_line(f"{group:<58} {ref * 1e3:>10.3f}ms {ker * 1e3:>10.3f}ms {ref / ker:>8.2f}x")
