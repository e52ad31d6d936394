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


def _meta_rows(session):
    """(group, {algorithm: (median s, tasks, peak bytes, paired MAML median s or None)}) of
    the meta_step benchmarks."""
    groups = {}
    for bench in getattr(session, "benchmarks", []):
        algorithm = bench.extra_info.get("algorithm")
        if algorithm is None or bench.stats is None:
            continue
        groups.setdefault(bench.group, {})[algorithm] = (
            bench.stats.median, bench.extra_info["tasks"], bench.extra_info.get("peak_bytes"),
            bench.extra_info.get("maml_median"))
    return sorted(groups.items())


def _meta_table(tr, session):
    rows = _meta_rows(session)
    if not rows:
        return
    tr.section("llama_fast meta_step (tasks/s; ratios to vmapped MAML, interleaved where paired; "
               "loop = Python loop over tasks)")
    tr.write_line(f"{'workload':<40} {'algorithm':<10} {'median':>10} {'tasks/s':>9} {'x MAML':>7} "
                  f"{'peak MB':>8} {'mem x MAML':>10}")
    for group, algs in rows:
        maml_time, _, maml_peak, _ = algs.get("maml", (None, None, None, None))
        for algorithm in ("maml", "fomaml", "llama", "loop-maml"):
            if algorithm not in algs:
                continue
            median, tasks, peak, paired_maml = algs[algorithm]
            reference = paired_maml or maml_time
            ratio = f"{median / reference:.2f}" if reference else "-"
            mem = f"{peak / 2**20:.1f}" if peak else "-"
            mem_ratio = f"{peak / maml_peak:.2f}" if peak and maml_peak else "-"
            tr.write_line(f"{group:<40} {algorithm:<10} {median * 1e3:>8.1f}ms {tasks / median:>9.1f} "
                          f"{ratio:>7} {mem:>8} {mem_ratio:>10}")
        if "loop-maml" in algs:
            loop_time, _, _, paired_maml = algs["loop-maml"]
            reference = paired_maml or maml_time
            if reference:
                tr.write_line(f"{group:<40} vmapped MAML speed-up over the loop: {loop_time / reference:.2f}x")


def _medians_by_group(session):
    """{group: {"kernels": median s, "reference": median s}}; a paired benchmark
    (lf_workloads.paired_benchmark) brings its interleaved reference median along, and its
    group is marked "(paired)"."""
    groups = {}
    for bench in getattr(session, "benchmarks", []):
        impl = bench.extra_info.get("impl")
        if impl is None or bench.stats is None:
            continue
        paired = bench.extra_info.get("reference_median")
        group = groups.setdefault(bench.group + (" (paired)" if paired is not None else ""), {})
        group[impl] = bench.stats.median
        if paired is not None:
            group["reference"] = paired
    return groups


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return
    _meta_table(terminalreporter, session)
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
