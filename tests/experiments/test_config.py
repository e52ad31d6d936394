"""ExperimentConfig: task defaults, TOML precedence and round trip, one-line validation errors."""

import pytest
import torch

from llama_fast.experiments.config import TASK_DEFAULTS, ConfigError, ExperimentConfig


def finalized(**values):
    return ExperimentConfig.from_dict(values).finalize()


def test_sinusoid_defaults_are_finn_et_al():
    config = finalized(task="sinusoid")
    assert (config.iterations, config.meta_batch, config.inner_lr, config.inner_steps) == (70000, 25, 0.01, 1)
    assert (config.shots, config.query_shots, config.ways) == (10, 10, None)
    assert config.algorithm == ("maml", "llama") and config.damping == "auto" and config.eval_tasks == 600
    assert config.noise == "auto"
    assert config.output == "runs/sinusoid-seed0"


def test_omniglot_defaults_and_data_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_FAST_DATA", str(tmp_path))
    config = finalized(task="omniglot", shots=5)
    assert (config.ways, config.shots, config.query_shots, config.inner_lr) == (5, 5, 5, 0.4)
    assert config.data == str(tmp_path)
    monkeypatch.delenv("LLAMA_FAST_DATA")
    with pytest.raises(ConfigError, match="omniglot needs --data"):
        finalized(task="omniglot")
    with pytest.raises(ConfigError, match="is not a directory"):
        finalized(task="omniglot", data=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="only 20 drawings"):
        finalized(task="omniglot", data=str(tmp_path), shots=10, query_shots=11)


def test_toml_precedence_and_round_trip(tmp_path):
    (tmp_path / "base.toml").write_text('task = "sinusoid"\nseed = 3\neta = 0.5\nalgorithm = "llama"\n'
                                        'damping = 0.01\nnoise = 0.05\n')
    config = ExperimentConfig.from_sources(tmp_path / "base.toml", {"seed": 4, "inner_steps": 5, "eta": None})
    assert (config.seed, config.eta, config.inner_steps, config.damping) == (4, 0.5, 5, 0.01)
    assert config.algorithm == ("llama",) and config.noise == 0.05
    path = config.save(tmp_path / "run" / "config.toml")
    assert ExperimentConfig.from_sources(path) == config
    assert "ways" not in path.read_text()  # None values are left out (TOML has no null)


def test_toml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ExperimentConfig.from_sources(tmp_path / "absent.toml")
    (tmp_path / "bad.toml").write_text("seed = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        ExperimentConfig.from_sources(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text("learning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key.*learning_rate"):
        ExperimentConfig.from_sources(tmp_path / "typo.toml")


BAD_VALUES = [
    ("task", "mnist", "must be one of sinusoid, omniglot"),
    ("algorithm", "reptile", "must be one of maml, llama"),
    ("algorithm", [], "at least one"),
    ("algorithm", "maml,maml", "listed twice"),
    ("device", "gpu", "auto, cpu, cuda or cuda:N"),
    ("device", "meta", "auto, cpu, cuda or cuda:N"),
    ("seed", -1, ">= 0"),
    ("seed", 1.5, "must be an integer"),
    ("seed", True, "must be an integer"),
    ("iterations", 0, ">= 1"),
    ("meta_batch", 0, ">= 1"),
    ("meta_lr", 0.0, "> 0"),
    ("inner_lr", -0.1, "> 0"),
    ("inner_lr", float("nan"), "finite"),
    ("inner_steps", 0, ">= 1"),
    ("first_order", "yes", "true or false"),
    ("eta", -1e-3, ">= 0"),
    ("eta", "big", "finite number"),
    ("damping", 0, "> 0"),
    ("damping", "manual", "positive number or 'auto'"),
    ("damping", float("inf"), "finite"),
    ("noise", 0, "> 0"),
    ("noise", -0.1, "> 0"),
    ("noise", "fitted", "positive number .*or 'auto'"),
    ("noise", float("nan"), "finite"),
    ("fisher", "diag", "exact, mc, empirical"),
    ("shots", 0, ">= 1"),
    ("query_shots", 0, ">= 1"),
    ("eval_tasks", 0, ">= 1"),
    ("samples", 0, ">= 1"),
    ("log_every", 0, ">= 1"),
    ("eval_every", -1, ">= 0"),
    ("checkpoint_every", -1, ">= 0"),
    ("output", "", "must be a path"),
    ("oneshot_runs", "/nonexistent/runs", "is not a directory"),
    ("resume", 1, "true or false"),
]


@pytest.mark.parametrize("field,value,message", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_every_field_is_validated(field, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        finalized(task="sinusoid" if field != "task" else value, **({} if field == "task" else {field: value}))
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_omniglot_only_fields(tmp_path):
    with pytest.raises(ConfigError, match="ways: applies to omniglot only"):
        finalized(task="sinusoid", ways=5)
    with pytest.raises(ConfigError, match="ways: must be >= 2"):
        finalized(task="omniglot", data=str(tmp_path), ways=1)
    assert set(TASK_DEFAULTS["omniglot"]) >= {"ways", "shots", "inner_lr"}


def test_device_resolution():
    assert finalized(device="cpu").resolved_device() == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert finalized(device="auto").resolved_device().type == expected
    with pytest.raises(ConfigError, match="CUDA device"):
        finalized(device=f"cuda:{torch.cuda.device_count()}").resolved_device()
