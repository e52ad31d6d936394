"""Root pytest configuration: `pytest` runs the tests, `pytest --benchmark` the benchmarks."""

from pathlib import Path

ROOT = Path(__file__).parent


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the pytest-benchmark suites under benchmarks/ instead of the tests",
    )


def pytest_ignore_collect(collection_path, config):
    benchmarks = ROOT / "benchmarks"
    in_benchmarks = collection_path == benchmarks or benchmarks in collection_path.parents
    if config.getoption("--benchmark"):
        tests = ROOT / "tests"
        return True if (collection_path == tests or tests in collection_path.parents) else None
    return True if in_benchmarks else None


def pytest_configure(config):
    # Benchmarks warm up (pytest-benchmark's own warm-up phase, up to --benchmark-max-time)
    # unless --benchmark-warmup is given: the first calls of a sub-millisecond op pay one-off
    # costs (glibc's malloc moves its mmap threshold up only after the first large frees,
    # so early allocations page-fault) that would otherwise land on whichever
    # implementation runs first.
    warmup_given = any(a.startswith("--benchmark-warmup") for a in config.invocation_params.args)
    if config.getoption("--benchmark") and not warmup_given and hasattr(config.option, "benchmark_warmup"):
        config.option.benchmark_warmup = True
