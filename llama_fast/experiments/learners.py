"""The learners and task samplers of an experiment: one model and optimizer per algorithm
(identical initial weights), and the train / validation / test samplers of a run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import meta
from ..meta import distributed
from . import data

VAL_TASKS = {"sinusoid": 100, "omniglot": 32}

# Disjoint seeds for the non-training streams (ranks of data.derive_seed).
VAL_RANK, TEST_RANK, SAMPLE_RANK, PLOT_RANK = 1001, 1002, 1003, 1004


@dataclass
class Learner:
    """One algorithm's model and optimizer."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    # --learn-damping (LLAMA): log delta per K-FAC layer [L], meta-learned beside the model's
    # parameters by the same optimizer (meta_step's evidence_prior); None: delta is not learned.
    log_damping: torch.Tensor | None = None

    def learned_damping(self) -> tuple | None:
        """The learned per-layer deltas (floats), or None."""
        if self.log_damping is None:
            return None
        return tuple(float(x) for x in self.log_damping.detach().exp())


def loss_name(config) -> str:
    return "mse" if config.task == "sinusoid" else "cross_entropy"


def build_model(config) -> torch.nn.Module:
    if config.task == "sinusoid":
        return meta.models.mlp(1, (40, 40), 1)
    return meta.models.conv4(in_channels=1, ways=config.ways, hidden=64, image_size=data.IMAGE_SIZE)


def build_learners(config, device) -> list[Learner]:
    """Identical initial weights for every algorithm (seeded once, then copied)."""
    torch.manual_seed(config.seed)
    template = build_model(config).to(device)
    learners = []
    for name in config.algorithm:
        model = build_model(config).to(device)
        model.load_state_dict(template.state_dict())
        groups, log_damping = [{"params": list(model.parameters())}], None
        if config.learn_damping and name == "llama":
            # Starts at the training delta of 1 (log 0) for every layer, with its own step size:
            # at the weights' 1e-3 Adam moves log delta by at most ~0.4 in 400 iterations.
            layers = len(meta.functional.inspect_model(model).layers)
            log_damping = torch.zeros(layers, device=device, requires_grad=True)
            groups.append({"params": [log_damping], "lr": config.damping_lr})
        learners.append(Learner(name, model, torch.optim.Adam(groups, lr=config.meta_lr), log_damping))
    return learners


class Tasks:
    """The task samplers of a run: train (checkpointed), and fresh ones for val and test.

    Distributed, the train sampler is this rank's: its share of the global meta-batch
    (``shard_sizes``) from its own random stream (``.shard(rank, world_size)``).
    """

    def __init__(self, config, device, rank=0, world_size=1):
        self.config, self.device = config, device
        self.splits = None
        if config.task == "omniglot":
            self.splits = data.omniglot_splits(config.data)
        seed = data.derive_seed(config.seed)
        if world_size == 1:
            self.train = self._sampler("train", config.shots, config.query_shots, config.meta_batch, seed)
        else:
            share = distributed.shard_sizes(config.meta_batch, world_size)[rank]
            self.train = self._sampler("train", config.shots, config.query_shots, share, seed,
                                       sharded=True).shard(rank, world_size)

    def _sampler(self, split, shots, query_shots, meta_batch, seed, sharded=False):
        c = self.config
        if c.task == "sinusoid":
            return data.SinusoidTasks(shots, query_shots, meta_batch, seed=seed, device=self.device)
        if sharded:   # .shard() needs a sampler built from a seed
            return data.OmniglotTasks(self.splits[split], c.ways, shots, query_shots, meta_batch,
                                      seed=seed, device=self.device)
        # Single-process runs keep this stream (a generator seeded directly), as before.
        return data.OmniglotTasks(self.splits[split], c.ways, shots, query_shots, meta_batch,
                                  generator=torch.Generator().manual_seed(seed), device=self.device)

    def fixed(self, split, shots, query_shots, tasks, rank):
        """A fresh sampler with a fixed seed: the same tasks every time it is built."""
        return self._sampler(split, shots, query_shots, tasks, data.derive_seed(self.config.seed, rank))


def task_batch(sample) -> meta.TaskBatch:
    return meta.TaskBatch(*sample[:4])
