"""Per-task Laplace posteriors for new tasks: adapt, kron_laplace and TaskPosterior.

``adapt`` runs the MAML inner loop on every task's support set (vmapped over tasks, as in
meta_step), then builds each task's K-FAC curvature at its adapted parameters:
``N(phi_i, H_i^-1)`` with ``H_i = s * G (x) A + delta * I`` per K-FAC layer (docs/ops.md,
"Conventions"). ``kron_laplace`` is the same posterior around given parameters on one data set
(T = 1, zero inner steps). BatchNorm parameters are not part of the posterior: they stay at
their point estimate in samples.
"""

import copy
import math

import torch
from torch.func import functional_call

from ..ops import reference
from ..ops.curvature import KronCurvature
from .checks import BACKENDS, check_damping, check_targets, choice, nonnegative
from .factors import curvature_factors, mc_noise
from .functional import FISHERS, LOSSES, Capture, FunctionalNet, functional_mode, inspect_model
from .tasks import call_tasks, resolve_task_chunk, split_params, task_spans
from .types import TaskBatch

__all__ = ["TaskPosterior", "adapt", "kron_laplace"]


class TaskPosterior:
    """The Laplace posteriors ``N(phi_i, H_i^-1)`` of T tasks over a network's K-FAC layers.

    Attributes:
        params: adapted ("fast") parameters by name, each ``[T, *shape]``.
        fixed: the other tensors functional_call needs (BatchNorm parameters, buffers),
            unbatched: the point estimate shared by all tasks.
        A, G: per-layer Kronecker factors ``[T, i', i']`` and ``[T, o, o]``; a factor built
            from fewer support rows than its width is a :class:`~llama_fast.LowRankFactor`
            (``.dense()`` materialises it).
        curvature: the :class:`~llama_fast.KronCurvature` (cached eigendecompositions).
        loss: "cross_entropy" (classification) or "mse" (Gaussian regression; the observation
            noise sigma is a ``predict`` argument, 1 by default).
    """

    def __init__(self, model, spec, loss, params, fixed, A, G, damping, scale, backend, layer_shapes):
        self.model, self.spec, self.loss = model, spec, loss
        self.layer_shapes = layer_shapes   # per-example K-FAC layer outputs (sizes predict's chunks)
        self.params, self.fixed = params, fixed
        self.A, self.G = A, G
        self.damping, self.scale, self.backend = damping, scale, backend
        self.curvature = KronCurvature(A, G, damping=damping, scale=scale)

    @property
    def tasks(self) -> int:
        return self.A[0].shape[0]

    def logdet(self) -> torch.Tensor:
        """``log det H_i`` per task, ``[T]`` (summed over the K-FAC layers)."""
        if self.backend == "reference":
            return reference.kron_logdet(self.A, self.G, damping=self.damping, scale=self.scale)
        return self.curvature.logdet()

    def with_damping(self, damping) -> "TaskPosterior":
        """The same posteriors with prior precision ``damping`` (float or ``[T]``): the adapted
        parameters, factors and eigendecompositions are shared (no new adaptation or
        eigendecomposition; :meth:`KronCurvature.with_damping`), so a grid of deltas costs one
        :func:`adapt`."""
        other = copy.copy(self)
        other.damping = check_damping(damping, self.tasks)
        other.curvature = self.curvature.with_damping(other.damping)
        return other

    def mean(self) -> list:
        """Per-layer homogeneous means ``[T, o, i']`` (``[W.reshape(o, -1), b]``)."""
        means = []
        for layer in self.spec.layers:
            W = self.params[layer.weight]
            W = W.reshape(W.shape[0], W.shape[1], -1)
            if layer.has_bias:
                W = torch.cat([W, self.params[layer.bias].unsqueeze(-1)], dim=-1)
            means.append(W)
        return means

    def sample(self, num_samples: int = 1, generator=None) -> dict:
        """Posterior samples by parameter name, each ``[S, T, *shape]``; parameters outside the
        K-FAC layers (BatchNorm) repeat their point estimate."""
        num_samples = int(num_samples)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        drawn = self.curvature.sample(self.mean(), num_samples=num_samples, generator=generator)
        out = {}
        for layer, E in zip(self.spec.layers, drawn):
            shape = self.params[layer.weight].shape
            if layer.has_bias:
                out[layer.bias] = E[..., -1]
                E = E[..., :-1]
            out[layer.weight] = E.reshape(num_samples, *shape)
        for name in self.spec.slow:
            out[name] = self.fixed[name].expand(num_samples, self.tasks, *self.fixed[name].shape)
        return out

    def _outputs(self, fast, x):
        """Network outputs ``[T, M, ...]`` with per-task parameters ``fast`` ([T, ...]): vmapped
        over tasks, or, on the CPU where a task's activations are large (meta_step's
        ``task_chunk="auto"`` rule), in chunks, a chunk of one task as one plain call. Under
        vmap each task's weights make the convolutions grouped ones and BatchNorm folds tasks
        into channels, which on the CPU costs several times the plain forward passes."""
        def one_task(p, xi):
            return functional_call(self.model, {**self.fixed, **p}, (xi,), strict=False)
        with functional_mode(self.model):
            return torch.cat([call_tasks(one_task, (0, 0), (fast, x), span)
                              for span in task_spans(self.tasks, self._task_chunk(x))])

    def _check_inputs(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != self.tasks:
            raise ValueError(f"x must be a tensor [T={self.tasks}, M, ...], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")

    def _check_samples(self, samples):
        """The adapted entries of `samples`, each [S, T, *shape] with one S."""
        if not isinstance(samples, dict):
            raise TypeError(f"samples must be a dict of tensors by parameter name (sample()'s), "
                            f"got {type(samples).__name__}")
        missing = [k for k in self.spec.fast if k not in samples]
        if missing:
            raise ValueError(f"samples lacks the adapted parameters {missing}")
        fast = {k: samples[k] for k in self.spec.fast}
        S = None
        for k, v in fast.items():
            want = (self.tasks, *self.params[k].shape[1:])
            if not isinstance(v, torch.Tensor) or v.dim() != len(want) + 1 or tuple(v.shape[1:]) != want:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"samples[{k!r}] must have shape [S, T={self.tasks}, "
                                 f"{', '.join(map(str, want[1:]))}], got {got}")
            if S is not None and v.shape[0] != S:
                raise ValueError(f"samples[{k!r}] has S={v.shape[0]} samples but others have S={S}")
            S = v.shape[0]
        return fast

    def _task_chunk(self, x):
        return resolve_task_chunk("auto", self.tasks, x.device, x.shape[1], self.layer_shapes,
                                  x.element_size())

    def sample_outputs(self, samples, x):
        """Network outputs ``[S, T, M, ...]`` of posterior samples (``sample``'s dict, or its
        adapted entries: each ``[S, T, *shape]``) on inputs ``x [T, M, ...]``; one pass per
        sample where ``_outputs`` takes the tasks in chunks, else vmapped over the samples."""
        self._check_inputs(x)
        fast = self._check_samples(samples)
        if self._task_chunk(x) is None:
            return torch.func.vmap(lambda p: self._outputs(p, x))(fast)
        S = next(iter(fast.values())).shape[0]
        return torch.stack([self._outputs({k: v[s] for k, v in fast.items()}, x) for s in range(S)])

    @torch.no_grad()
    def predict(self, x, num_samples: int = 0, generator=None, noise: float = 1.0):
        """Posterior predictive on inputs ``x [T, M, ...]``.

        ``num_samples=0``: the adapted point estimate. Otherwise the average over
        ``num_samples`` posterior samples. BatchNorm normalises with x's batch statistics
        (transductive, as in training).

        ``noise``: the Gaussian observation noise sigma (> 0, finite) of "mse" regression;
        classification ignores it (its likelihood has no noise parameter). The posterior
        itself does not depend on it: the curvature is that of the training loss, the MSE,
        i.e. sigma = 1 (laplace-torch's ``sigma_noise`` fitted on held-out data plays this
        role).

        Returns:
            cross_entropy: class probabilities ``[T, M, C]``.
            mse: ``(mean, std)`` of the predictive, each ``[T, M, D]``, moment-matched over the
            samples; ``std = sqrt(var_s f + noise**2)``.
        """
        noise = _check_noise(noise)
        self._check_inputs(x)
        num_samples = int(num_samples)
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if num_samples == 0:
            f = self._outputs(self.params, x).unsqueeze(0)
        else:
            f = self.sample_outputs(self.sample(num_samples, generator), x)   # [S, T, M, ...]
        if self.loss == "cross_entropy":
            return torch.softmax(f, dim=-1).mean(0)
        mean = f.mean(0)
        return mean, torch.sqrt(f.var(0, unbiased=False) + noise ** 2)


def _check_noise(noise) -> float:
    """The observation noise sigma as a float; a one-line ValueError naming ``noise``."""
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise <= 0:
        raise ValueError(f"noise must be a finite number > 0 (the observation noise sigma), got {noise!r}")
    return float(noise)


def _check_inputs(support_x, support_y):
    for value, name in ((support_x, "support_x"), (support_y, "support_y")):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    # TaskBatch's checks (T, N, dtypes, device) with the support set standing in for both.
    batch = TaskBatch(support_x, support_y, support_x, support_y)
    return batch.support_x, batch.support_y


def adapt(model, support_x, support_y, *, loss, inner_lr, inner_steps=1, damping, scale=1.0,
          fisher="exact", backend="kernels", mc_samples=1, generator=None) -> TaskPosterior:
    """Adapt ``model`` to T new tasks and return their Laplace posteriors.

    Args:
        support_x, support_y: ``[T, N, ...]`` inputs and ``[T, N]`` labels / ``[T, N, ...]``
            float targets.
        loss, inner_lr, inner_steps, damping, scale, fisher, backend, mc_samples, generator:
            as for :func:`llama_fast.meta_step` (the curvature is on the support set).

    Returns:
        :class:`TaskPosterior` (detached from the model's parameters).
    """
    choice(loss, LOSSES, "loss")
    choice(fisher, FISHERS, "fisher")
    choice(backend, BACKENDS, "backend")
    inner_lr = nonnegative(inner_lr, "inner_lr")
    inner_steps = int(inner_steps)
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    support_x, support_y = _check_inputs(support_x, support_y)
    T = support_x.shape[0]
    damping = check_damping(damping, T)
    scale = nonnegative(scale, "scale")
    if scale == 0:
        raise ValueError("scale must be positive")
    spec = inspect_model(model)
    theta, fixed = split_params(model, spec)
    theta = {k: v.detach() for k, v in theta.items()}
    fixed = {k: v.detach() for k, v in fixed.items()}
    with functional_mode(model), Capture(spec) as capture:
        net = FunctionalNet(model, spec, capture, loss)
        with torch.no_grad():
            layer_shapes, out_shape = net.output_shapes(theta, fixed, support_x[0])
        check_targets(support_y, out_shape, loss, "support_y")
        noise = None
        if fisher == "mc":
            noise = mc_noise(loss, int(mc_samples), T, support_x.shape[1], out_shape, support_x, generator)

        def one_task(x, y, noise):
            phi = net.inner_loop(theta, fixed, x, y, inner_lr, inner_steps, True)
            _, a, g = net.capture_rows(phi, fixed, x, y, fisher, layer_shapes, noise)
            return phi, a, g

        phi, a, g = torch.func.vmap(one_task, in_dims=(0, 0, None if noise is None else 0))(
            support_x, support_y, noise)
    A, G = curvature_factors(a, g, [layer.has_bias for layer in spec.layers], backend)
    return TaskPosterior(model, spec, loss, phi, fixed, A, G, damping, scale, backend, layer_shapes)


def kron_laplace(model, x, y, *, loss, damping, scale=1.0, fisher="exact", backend="kernels",
                 mc_samples=1, generator=None) -> TaskPosterior:
    """The K-FAC Laplace posterior around ``model``'s parameters on one data set (T = 1).

    ``x [N, ...]``, ``y [N]`` (labels) or ``[N, ...]`` (float targets). For bias-free
    networks its ``logdet()`` equals laplace-torch's ``KronLaplace(model, likelihood,
    prior_precision=damping, temperature=1/scale, backend=CurvlinopsGGN)`` fitted on one batch
    holding the whole data set: ``log_det_posterior_precision`` (README, "laplace-torch").
    """
    for value, name in ((x, "x"), (y, "y")):
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            raise ValueError(f"{name} must be a tensor with an example dim [N, ...]")
    return adapt(model, x.unsqueeze(0), y.unsqueeze(0), loss=loss, inner_lr=0.0, inner_steps=0,
                 damping=damping, scale=scale, fisher=fisher, backend=backend,
                 mc_samples=mc_samples, generator=generator)
