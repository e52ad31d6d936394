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
