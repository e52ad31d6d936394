"""Task samplers: sinusoid (Finn et al.), Omniglot N-way K-shot, Lake's one-shot runs.

The Omniglot tests read the two small background zips from the shared data folder
(``$LLAMA_FAST_DATA`` or ``<repo>/../shared/data/omniglot``) and skip when they are absent.
"""

import math
import os
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from llama_fast.experiments import data
from llama_fast.experiments.data import OmniglotTasks, SinusoidTasks

REPO = Path(__file__).resolve().parents[2]
SMALL = ("images_background_small1.zip", "images_background_small2.zip")


def omniglot_dir() -> Path | None:
    for candidate in (os.environ.get("LLAMA_FAST_DATA"), REPO.parent / "shared" / "data" / "omniglot"):
        if candidate and all((Path(candidate) / name).is_file() for name in SMALL):
            return Path(candidate)
    return None


OMNIGLOT = omniglot_dir()
needs_omniglot = pytest.mark.skipif(
    OMNIGLOT is None,
    reason="Omniglot small zips not found (set LLAMA_FAST_DATA to a folder holding "
    "images_background_small1.zip and images_background_small2.zip)",
)


# ----------------------------------------------------------------------------- sinusoid


def test_sinusoid_shapes_and_function():
    batch = SinusoidTasks(shots=5, query_shots=7, meta_batch=3, seed=1).sample()
    assert batch.support_x.shape == (3, 5, 1) and batch.support_y.shape == (3, 5, 1)
    assert batch.query_x.shape == (3, 7, 1) and batch.query_y.shape == (3, 7, 1)
    assert batch.amplitude.shape == batch.phase.shape == (3,)
    assert batch.support_x.dtype == torch.float32
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        expected = batch.amplitude[:, None, None] * torch.sin(x - batch.phase[:, None, None])
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_sinusoid_distributions_are_finn_uniforms():
    batch = SinusoidTasks(shots=10, query_shots=10, meta_batch=4000, seed=2).sample()
    amplitude, phase, x = batch.amplitude.double(), batch.phase.double(), batch.support_x.double()
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    assert -5.0 <= x.min() and x.max() <= 5.0
    # Kolmogorov-Smirnov against the exact uniforms: a wrong range or scale fails at p << 1e-6.
    for values, low, high in ((amplitude, 0.1, 5.0), (phase, 0.0, math.pi), (x.flatten(), -5.0, 5.0)):
        assert stats.kstest(values.numpy(), stats.uniform(low, high - low).cdf).pvalue > 1e-6


def test_sinusoid_reproducible_from_seed():
    a, b, c = (SinusoidTasks(meta_batch=4, seed=s) for s in (7, 7, 8))
    for _ in range(3):
        batch_a, batch_b, batch_c = a.sample(), b.sample(), c.sample()
        for u, v in zip(batch_a, batch_b):
            assert torch.equal(u, v)
        assert not torch.equal(batch_a.support_x, batch_c.support_x)


def test_sinusoid_ranks_never_share_a_stream():
    base = SinusoidTasks(meta_batch=8, seed=3)
    ranks = [base.shard(r, 4).sample().amplitude for r in range(4)]
    assert len({tuple(a.tolist()) for a in ranks}) == 4
    assert torch.equal(ranks[0], SinusoidTasks(meta_batch=8, seed=3).sample().amplitude)
    # seed + rank would collide: (seed 0, rank 1) must differ from (seed 1, rank 0).
    assert data.derive_seed(0, 1) != data.derive_seed(1, 0)
    assert len({data.derive_seed(s, r) for s in range(10) for r in range(10)}) == 100
    with pytest.raises(ValueError, match="rank"):
        base.shard(4, 4)


def test_sinusoid_state_dict_resumes_stream():
    sampler = SinusoidTasks(meta_batch=2, seed=4)
    sampler.sample()
    state = sampler.state_dict()
    expected = sampler.sample()
    fresh = SinusoidTasks(meta_batch=2, seed=999)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.sample().query_y, expected.query_y)


def test_sinusoid_dtype_and_meta_batch_override():
    batch = SinusoidTasks(meta_batch=2, seed=0, dtype=torch.float64).sample(meta_batch=5)
    assert batch.support_x.dtype == torch.float64 and batch.support_x.shape[0] == 5


@pytest.mark.parametrize("kwargs", [{"shots": 0}, {"query_shots": -1}, {"meta_batch": 1.5}])
def test_sinusoid_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SinusoidTasks(**kwargs)


# ----------------------------------------------------------------------------- decoding


def test_decode_image_inverts_and_resizes(tmp_path):
    picture = np.full((105, 105), 255, np.uint8)  # white page
    picture[:, :53] = 0  # black ink on the left half
    Image.fromarray(picture).convert("1").save(tmp_path / "a.png")
    image = data.decode_image(tmp_path / "a.png")
    assert image.shape == (28, 28) and image.dtype == np.uint8
    assert (image[:, :12] == 255).all() and (image[:, 17:] == 0).all()  # strokes 255 (Finn)
    floats = data.to_float_images(torch.from_numpy(image))
    assert floats.shape == (1, 28, 28) and floats.max() == 1.0 and floats.min() == 0.0


# ----------------------------------------------------------------------------- Omniglot splits


@pytest.fixture(scope="module")
def splits(request, tmp_path_factory):
    # Decoded images are cached in pytest's cache folder (.pytest_cache, git-ignored): the first
    # run decodes (~6 s), later ones load. A stale cache cannot hide a decoding change:
    # test_unpacked_folder_matches_zip_and_disk_cache compares a fresh decode against it.
    # With the cache plugin off (-p no:cacheprovider) a temporary folder serves.
    pytest_cache = getattr(request.config, "cache", None)
    cache = (pytest_cache.mkdir("llama_fast_omniglot") if pytest_cache is not None
             else tmp_path_factory.mktemp("llama_fast_omniglot"))
    return data.omniglot_splits(OMNIGLOT, layout="small", cache_dir=cache)


@needs_omniglot
def test_small_split_is_by_alphabet(splits):
    assert splits.train.alphabets == ["Balinese", "Greek", "Korean", "Latin"]
    assert splits.val.alphabets == ["Early_Aramaic"]
    assert splits.test.alphabets == ["Japanese_(katakana)", "Sanskrit", "Tagalog"]
    assert (splits.train.num_characters, splits.val.num_characters, splits.test.num_characters) == (114, 22, 106)
    names = [set(splits[s].alphabets) for s in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert splits.train.images.shape == (114, 20, 28, 28) and splits.train.images.dtype == torch.uint8
    assert "456 classes" in splits.summary()


@needs_omniglot
def test_images_are_white_strokes_on_black(splits):
    images = splits.test.images.float() / 255
    assert images.mean() < 0.25  # mostly background
    assert (images[..., 0, 0] == 0).float().mean() > 0.95  # corners are background
    assert (images.amax(dim=(-2, -1)) > 0.9).all()  # every drawing has a stroke


@needs_omniglot
def test_auto_layout_and_val_alphabets(tmp_path):
    custom = data.omniglot_splits(OMNIGLOT, val_alphabets=["Korean", "Latin"], cache_dir=tmp_path)
    assert custom.train.alphabets == ["Balinese", "Early_Aramaic", "Greek"]
    with pytest.raises(ValueError, match="Klingon"):
        data.omniglot_splits(OMNIGLOT, val_alphabets=["Klingon"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="images_background.zip"):
        data.omniglot_splits(OMNIGLOT, layout="full", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="layout"):
        data.omniglot_splits(OMNIGLOT, layout="medium", cache_dir=tmp_path)


def _unpack_alphabet(zip_name: str, alphabet: str, target: Path) -> Path:
    with zipfile.ZipFile(OMNIGLOT / zip_name) as archive:
        members = [n for n in archive.namelist() if f"/{alphabet}/" in n]
        archive.extractall(target, members)
    return target / Path(zip_name).stem


@needs_omniglot
def test_unpacked_folder_matches_zip_and_disk_cache(tmp_path, splits):
    folder = _unpack_alphabet(SMALL[1], "Tagalog", tmp_path / "unpacked")
    from_folder = data.load_characters(folder, cache_dir=tmp_path / "cache")
    expected = splits.test.select(["Tagalog"])
    assert from_folder.names == expected.names
    assert torch.equal(from_folder.images, expected.images)
    cached = list((tmp_path / "cache").glob("*.pt"))
    assert len(cached) == 1
    data._MEMORY_CACHE.clear()  # force the disk path
    assert torch.equal(data.load_characters(folder, cache_dir=tmp_path / "cache").images, expected.images)
    cached[0].write_bytes(b"truncated")  # a broken cache is rebuilt, not fatal
    data._MEMORY_CACHE.clear()
    assert torch.equal(data.load_characters(folder, cache_dir=tmp_path / "cache").images, expected.images)
    # Editing a drawing deep inside the folder invalidates both caches.
    first = sorted(folder.rglob("*.png"))[0]
    Image.new("L", (105, 105), 0).save(first)  # all ink
    changed = data.load_characters(folder, cache_dir=tmp_path / "cache")
    assert changed.images[0, 0].min() == 255 and torch.equal(changed.images[1:], expected.images[1:])


def test_missing_empty_and_wrong_data_dirs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.omniglot_splits(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="images_background_small1.zip"):
        data.omniglot_splits(tmp_path)  # empty folder
    (tmp_path / "images_background_small1.zip").write_text("not a zip")
    with pytest.raises(ValueError, match="not a zip"):
        data.omniglot_splits(tmp_path)
    empty = tmp_path / "images_background_small1"
    empty.mkdir()  # the folder is preferred over the zip: an empty one is an error
    with pytest.raises(ValueError, match="no PNG images"):
        data.load_characters(empty, cache_dir=False)
    (empty / "stray.png").write_bytes(b"")
    with pytest.raises(ValueError, match="alphabet/character"):
        data.load_characters(empty, cache_dir=False)
    (empty / "stray.png").unlink()
    (empty / "Alpha" / "c1").mkdir(parents=True)
    (empty / "Alpha" / "c1" / "1.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="1.png is not a readable image"):
        data.load_characters(empty, cache_dir=False)


def _fake_release(root: Path, split: str, alphabets, characters=2, drawings=3) -> None:
    """A tiny unpacked release folder: each character's drawings carry a distinct ink bar."""
    for a, alphabet in enumerate(alphabets):
        for c in range(characters):
            folder = root / split / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(drawings):
                picture = np.full((105, 105), 255, np.uint8)
                picture[10 * c: 10 * c + 8, 5 * d: 5 * d + 30] = 0
                Image.fromarray(picture).save(folder / f"{a:02d}{c:02d}_{d + 1:02d}.png")


def test_full_release_layout_is_split_by_alphabet(tmp_path):
    _fake_release(tmp_path, "images_background", [f"Bg{i}" for i in range(1, 8)])
    _fake_release(tmp_path, "images_evaluation", ["Ev1", "Ev2"])
    splits = data.omniglot_splits(tmp_path, cache_dir=False)  # auto: the full files are present
    assert splits.val.alphabets == ["Bg2"]  # every sixth sorted alphabet from the second
    assert splits.train.alphabets == ["Bg1", "Bg3", "Bg4", "Bg5", "Bg6", "Bg7"]
    assert splits.test.alphabets == ["Ev1", "Ev2"] and splits.test.images.shape == (4, 3, 28, 28)
    assert not torch.equal(splits.test.images[0, 0], splits.test.images[1, 0])
    with pytest.raises(ValueError, match="ways=9 but the split has only 8 classes"):
        OmniglotTasks(splits.val, ways=9)
    batch = OmniglotTasks(splits.val, ways=8, shots=1, query_shots=2, meta_batch=2, seed=0).sample()
    assert sorted(batch.classes[0].tolist()) == list(range(8))


def test_uneven_drawings_are_rejected(tmp_path):
    white = Image.new("L", (105, 105), 255)
    for character, count in (("c1", 2), ("c2", 3)):
        folder = tmp_path / "split" / "Alpha" / character
        folder.mkdir(parents=True)
        for i in range(count):
            white.save(folder / f"{i}.png")
    with pytest.raises(ValueError, match="different numbers of drawings"):
        data.load_characters(tmp_path / "split", cache_dir=False)


# ----------------------------------------------------------------------------- Omniglot tasks


def _rotated_drawings(splits_part, class_id: int) -> torch.Tensor:
    character, rotation = divmod(class_id, data.ROTATIONS)
    return torch.rot90(splits_part.images[character], rotation, dims=(-2, -1)).float() / 255


@needs_omniglot
def test_task_shapes_labels_and_contents(splits):
    N, K, Q, T = 5, 2, 3, 4
    sampler = OmniglotTasks(splits.train, ways=N, shots=K, query_shots=Q, meta_batch=T, seed=0)
    batch = sampler.sample()
    assert batch.support_x.shape == (T, N * K, 1, 28, 28) and batch.query_x.shape == (T, N * Q, 1, 28, 28)
    assert batch.support_y.shape == (T, N * K) and batch.support_y.dtype == torch.int64
    assert batch.support_x.dtype == torch.float32 and 0 <= batch.support_x.min() and batch.support_x.max() <= 1
    for t in range(T):
        assert torch.equal(batch.support_y[t].bincount(minlength=N), torch.full((N,), K))
        assert torch.equal(batch.query_y[t].bincount(minlength=N), torch.full((N,), Q))
        assert len(set(batch.classes[t].tolist())) == N
        for n in range(N):
            drawings = _rotated_drawings(splits.train, int(batch.classes[t, n]))  # [20, 28, 28]
            support = batch.support_x[t, batch.support_y[t] == n, 0]
            query = batch.query_x[t, batch.query_y[t] == n, 0]
            index_of = lambda img: int(((drawings - img).abs().sum((-2, -1)) == 0).nonzero()[0])  # noqa: E731
            used = [index_of(img) for img in torch.cat([support, query])]  # raises if not a drawing
            assert len(set(used)) == K + Q  # distinct drawings, none shared by support and query


@needs_omniglot
def test_tasks_shuffle_classes_and_use_all_rotations(splits):
    batch = OmniglotTasks(splits.val, ways=5, shots=1, query_shots=1, meta_batch=200, seed=1).sample()
    assert set((batch.classes % 4).flatten().tolist()) == {0, 1, 2, 3}
    sorted_fraction = (batch.classes.diff(dim=1) > 0).all(dim=1).float().mean()
    assert sorted_fraction < 0.1  # labels are not assigned in class-id order (1/120 if random)
    assert (batch.support_y[:, 0] != 0).any()  # examples are shuffled within the support set
    no_rotation = OmniglotTasks(splits.val, ways=5, meta_batch=50, rotations=False, seed=1).sample()
    assert (no_rotation.classes < 22).all()


@needs_omniglot
def test_tasks_reproducible_and_resumable(splits):
    a = OmniglotTasks(splits.test, ways=5, meta_batch=3, seed=5)
    b = OmniglotTasks(splits.test, ways=5, meta_batch=3, generator=torch.Generator().manual_seed(data.derive_seed(5)))
    assert torch.equal(a.sample().support_x, b.sample().support_x)
    state = a.state_dict()
    expected = a.sample()
    a.load_state_dict(state)
    assert torch.equal(a.sample().query_x, expected.query_x)
    first = OmniglotTasks(splits.test, ways=5, meta_batch=3, seed=5).sample()
    assert torch.equal(a.shard(0, 2).sample().support_x, first.support_x)
    assert not torch.equal(a.shard(1, 2).sample().support_x, first.support_x)
    with pytest.raises(ValueError, match="seed"):
        b.shard(1, 2)


@needs_omniglot
def test_tasks_are_the_same_on_every_device(splits, device):
    on_cpu = OmniglotTasks(splits.val, ways=5, shots=2, query_shots=3, meta_batch=4, seed=2).sample()
    on_device = OmniglotTasks(splits.val, ways=5, shots=2, query_shots=3, meta_batch=4, seed=2,
                              device=device).sample()
    for a, b in zip(on_cpu, on_device):
        assert b.device.type == device.type and torch.equal(a, b.cpu())
    sinusoid_cpu = SinusoidTasks(meta_batch=3, seed=2).sample()
    sinusoid_device = SinusoidTasks(meta_batch=3, seed=2, device=device).sample()
    assert torch.equal(sinusoid_cpu.query_y, sinusoid_device.query_y.cpu())


@needs_omniglot
def test_task_size_errors(splits):
    with pytest.raises(ValueError, match="ways=89 but the split has only 88 classes"):
        OmniglotTasks(splits.val, ways=89)
    with pytest.raises(ValueError, match="only 20 drawings"):
        OmniglotTasks(splits.val, ways=5, shots=10, query_shots=11)
    with pytest.raises(ValueError, match="ways"):
        OmniglotTasks(splits.val, ways=0)


# ----------------------------------------------------------------------------- one-shot runs


def _make_runs(root: Path, runs: int = 2, ways: int = 20, seed: int = 0) -> dict:
    """Lake's all_runs layout from small2 PNGs; returns {run: [(item, class, character)]}."""
    rng = random.Random(seed)
    truth = {}
    with zipfile.ZipFile(OMNIGLOT / SMALL[1]) as archive:
        pngs = sorted(n for n in archive.namelist() if n.endswith(".png"))
        by_character = {}
        for name in pngs:
            parts = name.split("/")
            if parts[1] in ("Sanskrit", "Japanese_(katakana)"):
                by_character.setdefault((parts[1], parts[2]), []).append(name)
        for r in range(1, runs + 1):
            alphabet = ("Sanskrit", "Japanese_(katakana)")[r % 2]
            characters = rng.sample(sorted(c for c in by_character if c[0] == alphabet), ways)
            run = root / f"run{r:02d}"
            (run / "training").mkdir(parents=True)
            (run / "test").mkdir()
            class_of_item = list(range(1, ways + 1))
            rng.shuffle(class_of_item)
            lines, truth[run.name] = [], []
            for item, cls in enumerate(class_of_item, start=1):
                train_png, test_png = rng.sample(by_character[characters[cls - 1]], 2)
                (run / "training" / f"class{cls:02d}.png").write_bytes(archive.read(train_png))
                (run / "test" / f"item{item:02d}.png").write_bytes(archive.read(test_png))
                lines.append(f"{run.name}/test/item{item:02d}.png {run.name}/training/class{cls:02d}.png")
                truth[run.name].append((item, cls, test_png))
            (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
    return truth


@needs_omniglot
def test_oneshot_runs_reader(tmp_path):
    truth = _make_runs(tmp_path / "all_runs")
    runs = data.load_oneshot_runs(tmp_path / "all_runs")
    assert [r.name for r in runs] == ["run01", "run02"]
    for run in runs:
        assert run.support_x.shape == (20, 1, 28, 28) and run.query_x.shape == (20, 1, 28, 28)
        assert torch.equal(run.support_y, torch.arange(20))
        for item, cls, _ in truth[run.name]:
            assert run.query_y[item - 1] == cls - 1  # classNN sorted -> label NN-1
            expected = data.decode_image(tmp_path / "all_runs" / run.name / "test" / f"item{item:02d}.png")
            assert torch.equal(run.query_x[item - 1, 0], torch.from_numpy(expected).float() / 255)
        expected = data.decode_image(tmp_path / "all_runs" / run.name / "training" / "class07.png")
        assert torch.equal(run.support_x[6, 0], torch.from_numpy(expected).float() / 255)
    support_x, support_y, query_x, query_y = data.stack_runs(runs)
    assert support_x.shape == (2, 20, 1, 28, 28) and query_y.shape == (2, 20)
    # Paths relative to the run folder (some copies of the data) read the same.
    labels = tmp_path / "all_runs" / "run02" / "class_labels.txt"
    labels.write_text(labels.read_text().replace("run02/", ""))
    again = data.load_oneshot_runs(tmp_path / "all_runs")[1]
    assert torch.equal(again.query_y, runs[1].query_y) and torch.equal(again.query_x, runs[1].query_x)


def test_oneshot_runs_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.load_oneshot_runs(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no run folders"):
        data.load_oneshot_runs(tmp_path)
    run = tmp_path / "run01"
    run.mkdir()
    with pytest.raises(ValueError, match="class_labels.txt missing"):
        data.load_oneshot_runs(tmp_path)
    (run / "class_labels.txt").write_text("just-one-column\n")
    with pytest.raises(ValueError, match="expected lines"):
        data.load_oneshot_runs(tmp_path)
    (run / "class_labels.txt").write_text("run01/test/item01.png run01/training/class01.png\n")
    with pytest.raises(ValueError, match="class01.png not found"):
        data.load_oneshot_runs(tmp_path)
