"""Meta-learning task samplers: sinusoid regression and Omniglot N-way K-shot classification.

Every sampler returns a batch of T tasks as tensors with a leading task dim, whose first four
fields are ``support_x, support_y, query_x, query_y`` (so ``lf.TaskBatch(*batch[:4])`` works),
and draws all of its randomness from its own ``torch.Generator`` on the CPU: a sampler is
reproducible from its seed on any device, its state can be checkpointed
(``state_dict``/``load_state_dict``), and distributed ranks get disjoint streams through
``derive_seed(seed, rank)``.

Omniglot conventions (Finn et al. 2017, after Vinyals et al. 2016 and Santoro et al. 2016):
images resized 105x105 -> 28x28 with PIL's LANCZOS filter, float in [0, 1], one channel, and
*inverted*: strokes are 1.0 on a 0.0 background (the PNGs are black strokes on white; Finn's
``data_generator.py`` does ``1.0 - image``). Each character rotated by 0/90/180/270 degrees is
a class of its own. Splits are by alphabet, so meta-test characters come from alphabets never
seen in meta-training.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ..meta.distributed import derive_seed

IMAGE_SIZE = 28
ROTATIONS = 4  # 0, 90, 180, 270 degrees
_CACHE_VERSION = 1  # bump when the decoding (size, filter, inversion) changes


# ----------------------------------------------------------------------------- seeding


def _make_generator(seed: int, rank: int, world_size: int) -> torch.Generator:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return torch.Generator().manual_seed(derive_seed(seed, rank))


class _SeededSampler:
    """Shared seeding and checkpoint state of the task samplers."""

    generator: torch.Generator

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------- sinusoid


class SinusoidBatch(NamedTuple):
    support_x: torch.Tensor  # [T, K, 1]
    support_y: torch.Tensor  # [T, K, 1]
    query_x: torch.Tensor  # [T, Q, 1]
    query_y: torch.Tensor  # [T, Q, 1]
    amplitude: torch.Tensor  # [T]
    phase: torch.Tensor  # [T]


def sinusoid(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """y = A sin(x - phase), broadcasting per-task [T] parameters over x [T, ...]."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return amplitude.reshape(shape) * torch.sin(x - phase.reshape(shape))


class SinusoidTasks(_SeededSampler):
    """Sinusoid regression tasks exactly as Finn et al. (2017), section 5.1.

    Amplitude ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5], y = A sin(x - phase), noiseless.
    Support and query points of a task are drawn independently from the same x range.
    """

    def __init__(self, shots: int = 10, query_shots: int = 10, meta_batch: int = 25, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 amplitude=(0.1, 5.0), phase=(0.0, math.pi), x_range=(-5.0, 5.0),
                 device="cpu", dtype=torch.float32):
        for name, value in (("shots", shots), ("query_shots", query_shots), ("meta_batch", meta_batch)):
            if int(value) != value or value < 1:
                raise ValueError(f"SinusoidTasks: {name} must be a positive integer, got {value!r}")
        self.shots, self.query_shots, self.meta_batch = shots, query_shots, meta_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.amplitude_range, self.phase_range, self.x_range = amplitude, phase, x_range
        self.device, self.dtype = torch.device(device), dtype
        self.generator = _make_generator(seed, rank, world_size)

    def shard(self, rank: int, world_size: int) -> "SinusoidTasks":
        """The same sampler for distributed rank ``rank``: a disjoint random stream."""
        return SinusoidTasks(self.shots, self.query_shots, self.meta_batch, seed=self.seed,
                             rank=rank, world_size=world_size, amplitude=self.amplitude_range,
                             phase=self.phase_range, x_range=self.x_range, device=self.device,
                             dtype=self.dtype)

    def _uniform(self, shape, bounds) -> torch.Tensor:
        low, high = bounds
        u = torch.rand(shape, generator=self.generator, dtype=torch.float64)
        return low + (high - low) * u

    def sample(self, meta_batch: int | None = None) -> SinusoidBatch:
        """A batch of ``meta_batch`` tasks (default: the sampler's)."""
        T = self.meta_batch if meta_batch is None else meta_batch
        K, Q = self.shots, self.query_shots
        amplitude = self._uniform((T,), self.amplitude_range)
        phase = self._uniform((T,), self.phase_range)
        x = self._uniform((T, K + Q, 1), self.x_range)
        y = sinusoid(x, amplitude, phase)
        # Drawn in float64 on the CPU, then cast: the same seed gives the same tasks anywhere.
        cast = lambda t: t.to(device=self.device, dtype=self.dtype)  # noqa: E731
        return SinusoidBatch(cast(x[:, :K]), cast(y[:, :K]), cast(x[:, K:]), cast(y[:, K:]),
                             cast(amplitude), cast(phase))

    def __iter__(self):
        while True:
            yield self.sample()


# ----------------------------------------------------------------------------- image decoding


def decode_image(data: bytes | str | Path) -> np.ndarray:
    """One Omniglot PNG -> uint8 [28, 28], strokes 255 on a 0 background (Finn's inversion)."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as image:
        small = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    return 255 - np.asarray(small, dtype=np.uint8)


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 28, 28] -> float32 [..., 1, 28, 28] in [0, 1]."""
    return (images.to(torch.float32) / 255.0).unsqueeze(-3)


# ----------------------------------------------------------------------------- Omniglot sources

_LAYOUT = ("<split>.zip holding <split>/<alphabet>/<character>/*.png, or an unpacked "
           "<alphabet>/<character>/*.png folder (the Omniglot release layout)")


@dataclass
class OmniglotCharacters:
    """Decoded characters of one or more alphabets.

    images: uint8 [C, D, 28, 28] (C characters x D drawings, strokes 255);
    names: "alphabet/character" per character; the class count with rotations is 4C.
    """

    images: torch.Tensor
    names: list[str]
    source: str = ""

    @property
    def alphabets(self) -> list[str]:
        return sorted({name.split("/")[0] for name in self.names})

    @property
    def num_characters(self) -> int:
        return len(self.names)

    def select(self, alphabets) -> "OmniglotCharacters":
        """The characters of the given alphabets only (order kept)."""
        keep = set(alphabets)
        index = [i for i, name in enumerate(self.names) if name.split("/")[0] in keep]
        return OmniglotCharacters(self.images[index], [self.names[i] for i in index], self.source)


def _png_members_of_zip(path: Path) -> dict[str, list[str]]:
    """Zip members grouped by 'alphabet/character' (the last two folders above each PNG)."""
    with zipfile.ZipFile(path) as archive:
        pngs = [n for n in archive.namelist() if n.lower().endswith(".png")]
    return _group_by_character(pngs, path)


def _png_files_of_folder(path: Path) -> dict[str, list[str]]:
    pngs = [str(p.relative_to(path)) for p in path.rglob("*.png")]
    return _group_by_character(pngs, path)


def _group_by_character(pngs: list[str], source: Path) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in sorted(pngs):
        parts = Path(name).parts
        if len(parts) < 3:
            raise ValueError(f"{source}: {name} is not inside an alphabet/character folder; "
                             f"expected {_LAYOUT}")
        groups.setdefault(f"{parts[-3]}/{parts[-2]}", []).append(name)
    if not groups:
        raise ValueError(f"{source}: no PNG images found; expected {_LAYOUT}")
    return groups


def _decode_groups(groups: dict[str, list[str]], source: Path, read) -> torch.Tensor:
    counts = {len(files) for files in groups.values()}
    if len(counts) != 1:
        fewest = min(groups, key=lambda k: len(groups[k]))
        raise ValueError(f"{source}: characters have different numbers of drawings "
                         f"({sorted(counts)}; e.g. {fewest} has {len(groups[fewest])})")
    images = np.stack([np.stack([_decode_member(read, f, source) for f in files])
                       for files in groups.values()])
    return torch.from_numpy(images)


def _decode_member(read, name: str, source: Path) -> np.ndarray:
    try:
        return decode_image(read(name))
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{source}: {name} is not a readable image ({err})") from None


def default_cache_dir() -> Path:
    """$LLAMA_FAST_CACHE, else $XDG_CACHE_HOME/llama_fast, else ~/.cache/llama_fast."""
    if os.environ.get("LLAMA_FAST_CACHE"):
        return Path(os.environ["LLAMA_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama_fast"


def _fingerprint(source: Path) -> tuple:
    """Identity of a source's contents: a zip's size and mtime; for a folder, its PNGs' count,
    total size and newest mtime (a folder's own mtime misses edits deeper down)."""
    if source.is_file():
        stat = source.stat()
        return (str(source.resolve()), stat.st_size, stat.st_mtime_ns)
    stats = [p.stat() for p in source.rglob("*.png")]
    return (str(source.resolve()), len(stats), sum(s.st_size for s in stats),
            max((s.st_mtime_ns for s in stats), default=0))


def _cache_file(source: Path, cache_dir: Path) -> Path:
    key = "|".join(map(str, (*_fingerprint(source), _CACHE_VERSION, IMAGE_SIZE)))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"omniglot-{source.stem}-{digest}.pt"


def _write_cache(path: Path, characters: OmniglotCharacters) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"images": characters.images, "names": characters.names}, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_MEMORY_CACHE: dict[tuple, OmniglotCharacters] = {}


def load_characters(source, cache_dir=None) -> OmniglotCharacters:
    """Decode every character of an Omniglot zip or unpacked folder, once.

    Decoded images are kept in memory for the process and, unless ``cache_dir=False``, in a
    ``.pt`` file under ``cache_dir`` (default ``default_cache_dir()``) keyed by the source's
    path, size and modification time (``_fingerprint``): decoding the full release (32k PNGs)
    takes 10-20 s on one core, reading the cache well under one.
    """
    source = Path(source)
    if not source.exists():
        raise ValueError(f"{source}: no such Omniglot file or folder; expected {_LAYOUT}")
    if source.is_file() and not zipfile.is_zipfile(source):
        raise ValueError(f"{source}: not a zip file; expected {_LAYOUT}")
    memory_key = _fingerprint(source)
    if memory_key in _MEMORY_CACHE:
        return _MEMORY_CACHE[memory_key]
    cache_path = None if cache_dir is False else _cache_file(source, Path(cache_dir or default_cache_dir()))
    characters = _read_cache(cache_path, source) if cache_path else None
    if characters is None:
        characters = _decode_source(source)
        if cache_path is not None:
            _write_cache(cache_path, characters)
    _MEMORY_CACHE[memory_key] = characters
    return characters


def _read_cache(path: Path, source: Path) -> OmniglotCharacters | None:
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, weights_only=True)
        images, names = cached["images"], list(cached["names"])
    except Exception:  # a stale or truncated cache is rebuilt, never fatal
        return None
    shape_ok = images.dtype == torch.uint8 and images.dim() == 4 and images.shape[0] == len(names)
    return OmniglotCharacters(images, names, str(source)) if shape_ok else None


def _decode_source(source: Path) -> OmniglotCharacters:
    if source.is_dir():
        groups = _png_files_of_folder(source)
        images = _decode_groups(groups, source, lambda f: source / f)
    else:
        groups = _png_members_of_zip(source)
        with zipfile.ZipFile(source) as archive:
            images = _decode_groups(groups, source, archive.read)
    return OmniglotCharacters(images, list(groups), str(source))


def find_source(data_dir, split: str) -> Path:
    """``<data_dir>/<split>.zip`` or the unpacked ``<data_dir>/<split>/`` folder."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir}: Omniglot data folder does not exist; expected it to hold "
                         f"{split}.zip or {split}/<alphabet>/<character>/*.png")
    for candidate in (data_dir / split, data_dir / f"{split}.zip"):
        if candidate.exists():
            return candidate
    raise ValueError(f"{data_dir}: neither {split}.zip nor {split}/ found; expected the Omniglot "
                     f"release files (images_background[_small1/2].zip, images_evaluation.zip)")


# ----------------------------------------------------------------------------- splits

# Which release files make the meta-train/val pool and which the meta-test pool.
SPLIT_LAYOUTS = {
    "small": ("images_background_small1", "images_background_small2"),
    "full": ("images_background", "images_evaluation"),
}


@dataclass
class OmniglotSplits:
    train: OmniglotCharacters
    val: OmniglotCharacters
    test: OmniglotCharacters

    def __getitem__(self, name: str) -> OmniglotCharacters:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
        return getattr(self, name)

    def summary(self) -> str:
        rows = []
        for name in ("train", "val", "test"):
            chars = self[name]
            rows.append(f"{name}: {len(chars.alphabets)} alphabets, {chars.num_characters} characters, "
                        f"{ROTATIONS * chars.num_characters} classes ({', '.join(chars.alphabets)})")
        return "\n".join(rows)


def default_val_alphabets(alphabets) -> list[str]:
    """Every sixth alphabet in sorted order, from the second: 1 of small1's 5, 5 of the 30."""
    return sorted(alphabets)[1::6]


def omniglot_splits(data_dir, layout: str = "auto", val_alphabets=None, cache_dir=None) -> OmniglotSplits:
    """Meta-train / meta-validation / meta-test characters, split by alphabet.

    The meta-train pool is the first release file of ``layout`` and the meta-test pool the
    second; test alphabets that also occur in the train pool (Greek and Latin are in both small
    background sets) are dropped from the test split so no test alphabet was ever trained on.
    ``val_alphabets`` (default: ``default_val_alphabets``) are held out of the train pool for
    choosing hyper-parameters. ``layout="auto"`` takes "full" when its files are present.
    """
    layout = _resolve_layout(data_dir, layout)
    train_name, test_name = SPLIT_LAYOUTS[layout]
    pool = load_characters(find_source(data_dir, train_name), cache_dir)
    test_pool = load_characters(find_source(data_dir, test_name), cache_dir)
    val = default_val_alphabets(pool.alphabets) if val_alphabets is None else list(val_alphabets)
    unknown = sorted(set(val) - set(pool.alphabets))
    if unknown:
        raise ValueError(f"val_alphabets {unknown} are not in {train_name} "
                         f"(its alphabets: {', '.join(pool.alphabets)})")
    train = [a for a in pool.alphabets if a not in val]
    test = [a for a in test_pool.alphabets if a not in pool.alphabets]
    if not train or not test:
        raise ValueError(f"{data_dir}: the {layout} split leaves no {'train' if not train else 'test'} "
                         "alphabets")
    return OmniglotSplits(pool.select(train), pool.select(val), test_pool.select(test))


def _resolve_layout(data_dir, layout: str) -> str:
    if layout == "auto":
        full = SPLIT_LAYOUTS["full"]
        present = all((Path(data_dir) / n).exists() or (Path(data_dir) / f"{n}.zip").exists() for n in full)
        return "full" if present else "small"
    if layout not in SPLIT_LAYOUTS:
        raise ValueError(f"layout must be 'auto', 'small' or 'full', got {layout!r}")
    return layout


# ----------------------------------------------------------------------------- Omniglot tasks


class OmniglotBatch(NamedTuple):
    support_x: torch.Tensor  # [T, N*K, 1, 28, 28] float in [0, 1]
    support_y: torch.Tensor  # [T, N*K] int64 in 0..N-1
    query_x: torch.Tensor  # [T, N*Q, 1, 28, 28]
    query_y: torch.Tensor  # [T, N*Q]
    classes: torch.Tensor  # [T, N] global class ids: 4 * character + rotation (label n -> classes[:, n])


def rotate_classes(images: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate images [..., 28, 28] by rotation[...] * 90 degrees counter-clockwise (exact)."""
    out = images.clone()
    for k in range(1, ROTATIONS):
        mask = rotation == k
        if mask.any():
            out[mask] = torch.rot90(images[mask], k, dims=(-2, -1))
    return out


class OmniglotTasks(_SeededSampler):
    """N-way K-shot Omniglot tasks from one split (``OmniglotSplits.train``, ``.val``, ``.test``).

    A task draws N distinct classes (a class is a character at one of 4 rotations, unless
    ``rotations=False``), assigns them labels 0..N-1 in random order, and draws K + Q distinct
    drawings of each: K for the support set, Q for the query set. Examples are shuffled within
    each set so labels are not in blocks.
    """

    def __init__(self, split: OmniglotCharacters, ways: int = 5, shots: int = 1, query_shots: int = 1,
                 meta_batch: int = 32, generator: torch.Generator | None = None, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, rotations: bool = True, device="cpu"):
        self.characters = split
        self.rotations = ROTATIONS if rotations else 1
        self.num_classes = self.rotations * split.num_characters
        self.drawings = split.images.shape[1]
        for name, value in (("ways", ways), ("shots", shots), ("query_shots", query_shots),
                            ("meta_batch", meta_batch)):
            if int(value) != value or value < 1:
                raise ValueError(f"OmniglotTasks: {name} must be a positive integer, got {value!r}")
        if ways > self.num_classes:
            raise ValueError(f"OmniglotTasks: ways={ways} but the split has only {self.num_classes} "
                             f"classes ({split.num_characters} characters x {self.rotations} rotations)")
        if shots + query_shots > self.drawings:
            raise ValueError(f"OmniglotTasks: shots + query_shots = {shots + query_shots} but each class "
                             f"has only {self.drawings} drawings")
        self.ways, self.shots, self.query_shots, self.meta_batch = ways, shots, query_shots, meta_batch
        self.device = torch.device(device)
        # uint8 images live on the sampling device (a few MB): a batch is gathered and rotated
        # there, and only indices cross from the CPU generator.
        self._images = split.images.to(self.device)
        self.seed = None if generator is not None else seed
        self.generator = generator if generator is not None else _make_generator(seed, rank, world_size)

    def shard(self, rank: int, world_size: int) -> "OmniglotTasks":
        """The same sampler for distributed rank ``rank``: a disjoint random stream."""
        if self.seed is None:
            raise ValueError("OmniglotTasks.shard needs a sampler built from a seed, not a generator")
        return OmniglotTasks(self.characters, self.ways, self.shots, self.query_shots, self.meta_batch,
                             seed=self.seed, rank=rank, world_size=world_size,
                             rotations=self.rotations > 1, device=self.device)

    def _random_subsets(self, shape, population: int, size: int) -> torch.Tensor:
        """``size`` distinct indices out of ``population`` per leading index (random order)."""
        keys = torch.rand(*shape, population, generator=self.generator)
        return keys.argsort(dim=-1)[..., :size]

    def sample(self, meta_batch: int | None = None) -> OmniglotBatch:
        T = self.meta_batch if meta_batch is None else meta_batch
        N, K, Q = self.ways, self.shots, self.query_shots
        classes = self._random_subsets((T,), self.num_classes, N)  # label n is classes[:, n]
        drawings = self._random_subsets((T, N), self.drawings, K + Q)  # [T, N, K+Q]
        character, rotation = classes // self.rotations, classes % self.rotations
        support_order = self._orders(T, N * K)  # shuffles examples within each set
        query_order = self._orders(T, N * Q)
        to_device = lambda t: t.to(self.device)  # noqa: E731
        character, rotation, drawings = map(to_device, (character, rotation, drawings))
        images = self._images[character.unsqueeze(-1), drawings]  # [T, N, K+Q, 28, 28] uint8
        images = rotate_classes(images, rotation.unsqueeze(-1).expand(T, N, K + Q))
        labels = torch.arange(N, device=self.device).view(1, N, 1).expand(T, N, K + Q)
        support = _reorder(images[:, :, :K], labels[:, :, :K], to_device(support_order))
        query = _reorder(images[:, :, K:], labels[:, :, K:], to_device(query_order))
        return OmniglotBatch(*support, *query, to_device(classes))

    def _orders(self, tasks: int, size: int) -> torch.Tensor:
        return torch.rand(tasks, size, generator=self.generator).argsort(dim=-1)

    def __iter__(self):
        while True:
            yield self.sample()


def _reorder(images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor):
    """[T, N, M, 28, 28] images and labels -> [T, N*M, 1, 28, 28] floats in ``order``."""
    T = images.shape[0]
    images, labels = images.reshape(T, -1, IMAGE_SIZE, IMAGE_SIZE), labels.reshape(T, -1)
    rows = torch.arange(T, device=order.device).unsqueeze(-1)
    return to_float_images(images[rows, order]), labels[rows, order]


# ----------------------------------------------------------------------------- one-shot runs


class OneShotRun(NamedTuple):
    """One run of Lake et al.'s 20-way within-alphabet one-shot task.

    support_x [20, 1, 28, 28] (the training images classNN.png in sorted order; support_y =
    0..19), query_x [20, 1, 28, 28] (test/itemNN.png in sorted order) with query_y the index
    of each item's true training class.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    name: str


_RUNS_LAYOUT = ("runNN/ folders each holding class_labels.txt, training/classNN.png and "
                "test/itemNN.png (Lake et al.'s all_runs layout)")


def load_oneshot_runs(root) -> list[OneShotRun]:
    """Every ``runNN`` of an Omniglot one-shot classification folder (``all_runs``)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: one-shot runs folder does not exist; expected {_RUNS_LAYOUT}")
    runs = sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"run\d+", p.name))
    if not runs:
        raise ValueError(f"{root}: no run folders found; expected {_RUNS_LAYOUT}")
    return [_load_run(root, run) for run in runs]


def _load_run(root: Path, run: Path) -> OneShotRun:
    labels_file = run / "class_labels.txt"
    if not labels_file.is_file():
        raise ValueError(f"{run}: class_labels.txt missing; expected {_RUNS_LAYOUT}")
    pairs = [line.split() for line in labels_file.read_text().splitlines() if line.strip()]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"{labels_file}: expected lines 'runNN/test/itemNN.png runNN/training/classNN.png'")
    training = sorted({pair[1] for pair in pairs})
    if len(training) != len(pairs):
        raise ValueError(f"{labels_file}: {len(pairs)} test items but {len(training)} distinct "
                         "training classes; a run pairs each item with its own class")
    tests = sorted(pairs)  # sorted by item path, as Lake's demo does
    support = torch.from_numpy(np.stack([decode_image(_run_file(root, run, f)) for f in training]))
    query = torch.from_numpy(np.stack([decode_image(_run_file(root, run, item)) for item, _ in tests]))
    query_y = torch.tensor([training.index(cls) for _, cls in tests])
    return OneShotRun(to_float_images(support), torch.arange(len(training)), to_float_images(query),
                      query_y, run.name)


def _run_file(root: Path, run: Path, name: str) -> Path:
    """Paths in class_labels.txt are relative to the runs folder (``run01/test/...``)."""
    for candidate in (root / name, run / name, run.parent / name):
        if candidate.is_file():
            return candidate
    raise ValueError(f"{run / 'class_labels.txt'}: {name} not found under {root}")


def stack_runs(runs: list[OneShotRun]):
    """Runs as one batch of tasks: (support_x, support_y, query_x, query_y) with T = #runs."""
    return tuple(torch.stack([getattr(r, f) for r in runs])
                 for f in ("support_x", "support_y", "query_x", "query_y"))


# ----------------------------------------------------------------------------- data folder


def default_data_dir() -> Path | None:
    """$LLAMA_FAST_DATA, if set (the Omniglot folder holding the release zips)."""
    value = os.environ.get("LLAMA_FAST_DATA")
    return Path(value) if value else None
