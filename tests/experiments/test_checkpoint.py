"""Checkpoints: atomic saves, clear errors on bad files, and bit-exact resumption."""

import collections
import random

import numpy as np
import pytest
import torch

from llama_fast.experiments import checkpoint as ckpt
from llama_fast.experiments.checkpoint import CheckpointError
from llama_fast.experiments.data import SinusoidTasks

from corrupt import flip_bit_in_tensor_bytes   # tests/helpers


def test_round_trip_and_overwrite(tmp_path):
    model = torch.nn.Linear(3, 2)
    state = {"model": model.state_dict(), "iteration": 7, "name": "llama", "history": [0.5, 0.25],
             "nested": {"t": torch.arange(4), "none": None, "pair": (1, 2.0)}}
    path = ckpt.save_checkpoint(tmp_path / "run" / "checkpoint.pt", state)
    loaded = ckpt.load_checkpoint(path)
    assert loaded["iteration"] == 7 and loaded["name"] == "llama" and loaded["history"] == [0.5, 0.25]
    assert torch.equal(loaded["model"]["weight"], model.weight.detach())
    assert loaded["nested"]["none"] is None and loaded["nested"]["pair"] == (1, 2.0)
    ckpt.save_checkpoint(path, {"iteration": 8})
    assert ckpt.load_checkpoint(path) == {"iteration": 8}
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp files left


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "checkpoint.pt", {"iteration": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path) == {"iteration": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def _assert_clean_error(path, match):
    with pytest.raises(CheckpointError, match=match) as err:
        ckpt.load_checkpoint(path)
    assert isinstance(err.value, ValueError) and str(path) in str(err.value)
    chained = err.value.__cause__ or (None if err.value.__suppress_context__ else err.value.__context__)
    assert chained is None  # no torch traceback attached
    assert "\n" not in str(err.value)
    return err.value


class Foreign:
    pass


def test_missing_corrupt_and_foreign_files(tmp_path):
    _assert_clean_error(tmp_path / "absent.pt", "no such checkpoint file")
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    _assert_clean_error(tmp_path / "noise.pt", "not a readable checkpoint")
    good = ckpt.save_checkpoint(tmp_path / "good.pt", {"w": torch.randn(100, 100)})
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _assert_clean_error(tmp_path / "truncated.pt", "not a readable checkpoint")
    torch.save({"weight": torch.ones(2)}, tmp_path / "foreign.pt")
    _assert_clean_error(tmp_path / "foreign.pt", "not a llama_fast checkpoint")
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    _assert_clean_error(tmp_path / "tensor.pt", "not a llama_fast checkpoint")
    torch.save({"format": ckpt.FORMAT, "version": 99, "state": {}}, tmp_path / "future.pt")
    _assert_clean_error(tmp_path / "future.pt", "version 99")
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "state": Foreign()}, tmp_path / "code.pt")
    _assert_clean_error(tmp_path / "code.pt", "not a readable checkpoint")  # weights_only refuses
    torch.save(collections.OrderedDict(format=ckpt.FORMAT, version=ckpt.VERSION, state=[1]), tmp_path / "list.pt")
    _assert_clean_error(tmp_path / "list.pt", "no state dict")
    (tmp_path / "folder.pt").mkdir()
    _assert_clean_error(tmp_path / "folder.pt", "no such checkpoint file")


def _draw_everything(generator):
    return (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)],
            torch.rand(3, generator=generator), np.random.randn(1))


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(1)
    np.random.randn()  # leave numpy with a cached gaussian (has_gauss = 1)
    ckpt.save_checkpoint(tmp_path / "rng.pt", {"rng": ckpt.capture_rng_state({"tasks": generator})})
    expected = _draw_everything(generator)
    torch.manual_seed(123), np.random.seed(123), random.seed(123), generator.manual_seed(123)
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "rng.pt")["rng"], {"tasks": generator})
    for got, want in zip(_draw_everything(generator), expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="other"):
        ckpt.restore_rng_state(ckpt.capture_rng_state(), {"other": generator})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_rng_state_round_trip():
    torch.cuda.init()
    state = ckpt.capture_rng_state()
    assert "cuda" in state
    expected = torch.rand(5, device="cuda")
    torch.cuda.manual_seed_all(99)
    ckpt.restore_rng_state(state)
    assert torch.equal(torch.rand(5, device="cuda"), expected)


# ----------------------------------------------------------------------------- resumption


class Run:
    """A tiny training loop drawing from every RNG a real run uses."""

    def __init__(self, init_seed: int):
        torch.manual_seed(init_seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                         torch.nn.Linear(8, 1))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.tasks = SinusoidTasks(shots=5, meta_batch=4, seed=init_seed)
        self.iteration = 0

    def step(self):
        batch = self.tasks.sample()  # the sampler's generator
        x = batch.support_x + 0.01 * torch.randn(batch.support_x.shape)  # torch's global RNG
        scale = 1.0 + 0.1 * np.random.rand()  # numpy's
        keep = random.sample(range(5), 4)  # python's
        loss = scale * ((self.model(x[:, keep]) - batch.support_y[:, keep]) ** 2).mean()  # dropout
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.iteration += 1

    def state(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "iteration": self.iteration,
                "rng": ckpt.capture_rng_state({"tasks": self.tasks.generator})}

    def load(self, state, restore_rng=True):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = state["iteration"]
        if restore_rng:
            ckpt.restore_rng_state(state["rng"], {"tasks": self.tasks.generator})


def _start(seed=0):
    random.seed(seed), np.random.seed(seed)
    return Run(init_seed=seed)


def _resumed(tmp_path, total, stop_at, restore_rng=True):
    run = _start()
    while run.iteration < stop_at:
        run.step()
    ckpt.save_checkpoint(tmp_path / "checkpoint.pt", run.state())
    del run  # the "kill"
    torch.manual_seed(999), np.random.seed(999), random.seed(999)  # a fresh process's RNGs
    fresh = Run(init_seed=5)  # fresh objects, other initial weights and sampler seed
    fresh.load(ckpt.load_checkpoint(tmp_path / "checkpoint.pt"), restore_rng=restore_rng)
    while fresh.iteration < total:
        fresh.step()
    return fresh.model


def test_resumed_run_matches_uninterrupted_bit_exactly(tmp_path):
    straight = _start()
    for _ in range(12):
        straight.step()
    resumed = _resumed(tmp_path, total=12, stop_at=5)
    for a, b in zip(straight.model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    # Control: without the RNG states the continuation differs, so the test can fail.
    unrestored = _resumed(tmp_path, total=12, stop_at=5, restore_rng=False)
    assert not all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), unrestored.parameters()))


# ----------------------------------------------------------------------------- checksum


def test_a_flipped_bit_in_a_tensor_is_a_clear_error(tmp_path):
    weight = torch.randn(64, 64)
    path = ckpt.save_checkpoint(tmp_path / "checkpoint.pt", {"models": {"w": weight}, "iteration": 3})
    flip_bit_in_tensor_bytes(path)
    # Without the checksum this loads: the flipped bit changes one weight, silently.
    payload = torch.load(path, weights_only=True)
    assert not torch.equal(payload["state"]["models"]["w"], weight)
    error = _assert_clean_error(path, "corrupt checkpoint: its content does not match the checksum")
    assert "sha256" in str(error)


def test_the_checksum_covers_every_kind_of_value(tmp_path):
    """Changing any one value of a state, however small, changes its digest; a round trip through
    the file does not (so a real training state, optimizer and RNG included, verifies)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"models": {"llama": model.state_dict()}, "optimizers": {"llama": optimizer.state_dict()},
             "rng": ckpt.capture_rng_state({"tasks": torch.Generator().manual_seed(1)}),
             "iteration": 7, "damping": 0.5, "flag": True, "none": None, "pair": (1, 2.0)}
    path = ckpt.save_checkpoint(tmp_path / "checkpoint.pt", state)
    assert ckpt.state_digest(ckpt.load_checkpoint(path)) == ckpt.state_digest(state)
    base = ckpt.state_digest({"a": [1, 2], "b": torch.zeros(2), "c": 0.5})
    for changed in ({"a": [1, 3], "b": torch.zeros(2), "c": 0.5}, {"a": (1, 2), "b": torch.zeros(2), "c": 0.5},
                    {"a": [1, 2], "b": torch.zeros(2, 1), "c": 0.5},
                    {"a": [1, 2], "b": torch.zeros(2, dtype=torch.float64), "c": 0.5},
                    {"a": [1, 2], "b": torch.tensor([0.0, -0.0]), "c": 0.5},
                    {"a": [1, 2], "b": torch.zeros(2), "c": 0.5000000000000001},
                    {"a": [[1], 2], "b": torch.zeros(2), "c": 0.5}, {"a": [1, 2], "B": torch.zeros(2), "c": 0.5}):
        assert ckpt.state_digest(changed) != base, changed


def test_a_checkpoint_without_its_checksum_is_refused(tmp_path):
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "state": {"iteration": 1}}, tmp_path / "bare.pt")
    _assert_clean_error(tmp_path / "bare.pt", "no checksum")
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "sha256": "0" * 64, "state": {"iteration": 1}},
               tmp_path / "wrong.pt")
    _assert_clean_error(tmp_path / "wrong.pt", "does not match the checksum")


def test_a_version_1_checkpoint_loads_with_a_warning(tmp_path):
    """Checkpoints written before the checksum (version 1) still resume, unverified, and say so."""
    state = {"iteration": 4, "w": torch.ones(3)}
    torch.save({"format": ckpt.FORMAT, "version": 1, "state": state}, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="without a checksum: loaded unverified"):
        loaded = ckpt.load_checkpoint(tmp_path / "old.pt")
    assert loaded["iteration"] == 4 and torch.equal(loaded["w"], state["w"])
