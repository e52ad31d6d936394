"""Per-task Laplace posteriors for new tasks: adapt, kron_laplace and TaskPosterior.

``adapt`` runs the MAML inner loop on every task's support set (vmapped over tasks, as in
meta_step), then builds each task's K-FAC curvature at its adapted parameters:
``N(phi_i, H_i^-1)`` with ``H_i = s * G (x) A + delta * I`` per K-FAC layer (docs/ops.md,
"Conventions"); for a Gaussian likelihood with noise sigma the curvature's scale is
``s / sigma^2``. ``kron_laplace`` is the same posterior around given parameters on one data set
(T = 1, zero inner steps). BatchNorm parameters are not part of the posterior: they stay at
their point estimate in samples, and the linearised predictive treats their batch statistics
as constants.

Predictives (``TaskPosterior.predict``): "glm", the linearised network's
``N(f(x; phi), J H^-1 J^T)`` in function space (llama_fast.meta.predictive; the default, as
laplace-torch's), "nn", the average over weight samples run through the network (LLAMA's
paper), and "point", the adapted parameters alone.
"""

import copy
import math

import torch
from torch.func import functional_call

from ..ops import reference
from ..ops.curvature import KronCurvature
from . import predictive
from .checks import BACKENDS, check_damping, check_targets, choice, nonnegative
from .factors import curvature_factors, mc_noise
from .functional import (FISHERS, LOSSES, Capture, FunctionalNet, constant_batch_statistics, functional_mode,
                         inspect_model)
from .tasks import call_tasks, resolve_task_chunk, split_params, task_spans
from .types import TaskBatch

__all__ = ["TaskPosterior", "adapt", "kron_laplace"]

# The linearised predictive projects the Jacobian rows of this many bytes of coordinates
# ([T, m, K, o, i'] over all layers) at a time: Conv-4's 577-wide layers give ~0.75 MB per
# (task, input, output), so a few hundred inputs of a 5-way task fill it.
GLM_CHUNK_BYTES = 1 << 28


class TaskPosterior:
    """The Laplace posteriors ``N(phi_i, H_i^-1)`` of T tasks over a network's K-FAC layers.

    Attributes:
        params: adapted ("fast") parameters by name, each ``[T, *shape]``.
        fixed: the other tensors functional_call needs (BatchNorm parameters, buffers),
            unbatched: the point estimate shared by all tasks.
        A, G: per-layer Kronecker factors ``[T, i', i']`` and ``[T, o, o]``; a factor built
            from fewer support rows than its width is a :class:`~llama_fast.LowRankFactor`
            (``.dense()`` materialises it).
        curvature: the :class:`~llama_fast.KronCurvature` (cached eigendecompositions), with
            scale ``scale / noise**2`` for "mse".
        loss: "cross_entropy" (classification) or "mse" (Gaussian regression).
        noise: the Gaussian observation noise sigma of "mse" (1 for classification): the
            curvature and the predictive use the same one (:meth:`with_noise`).
    """

    def __init__(self, model, spec, loss, params, fixed, A, G, damping, scale, backend, layer_shapes,
                 out_shape, noise=1.0):
        self.model, self.spec, self.loss = model, spec, loss
        self.layer_shapes = layer_shapes   # per-example K-FAC layer outputs (sizes predict's chunks)
        self.out_shape = out_shape         # per-example network output
        self.params, self.fixed = params, fixed
        self.A, self.G = A, G
        self.damping, self.scale, self.backend = damping, scale, backend
        self.noise = _check_noise(noise) if loss == "mse" else 1.0
        self.curvature = KronCurvature(A, G, damping=damping, scale=self.curvature_scale)

    @property
    def curvature_scale(self) -> float:
        """The curvature's ``s``: ``scale / noise**2`` (the Gaussian likelihood's precision)."""
        return self.scale / self.noise ** 2

    @property
    def tasks(self) -> int:
        return self.A[0].shape[0]

    def logdet(self) -> torch.Tensor:
        """``log det H_i`` per task, ``[T]`` (summed over the K-FAC layers)."""
        if self.backend == "reference":
            return reference.kron_logdet(self.A, self.G, damping=self.damping, scale=self.curvature_scale)
        return self.curvature.logdet()

    def with_noise(self, noise) -> "TaskPosterior":
        """The same posteriors for Gaussian observation noise ``noise`` (sigma): the curvature's
        scale becomes ``scale / sigma^2`` (its eigenbases are shared, nothing is redone) and
        the predictive adds ``sigma^2``. Classification has no noise parameter."""
        if self.loss != "mse":
            raise ValueError("with_noise applies to loss='mse' (Gaussian likelihood) only")
        other = copy.copy(self)
        other.noise = _check_noise(noise)
        other.curvature = self.curvature.with_scale(other.curvature_scale)
        return other

    def with_damping(self, damping) -> "TaskPosterior":
        """The same posteriors with prior precision ``damping`` (a float, ``[T]``, or per K-FAC
        layer L floats or ``[T, L]``): the adapted parameters, factors and eigendecompositions
        are shared (no new adaptation or eigendecomposition; :meth:`KronCurvature.with_damping`),
        so a grid of deltas costs one :func:`adapt`."""
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

    @torch.no_grad()
    def outputs(self, x):
        """The network's outputs at the adapted parameters phi_i on ``x [T, M, ...]``,
        ``[T, M, ...]`` (logits for classification): the mean of the GLM predictive."""
        self._check_inputs(x)
        return self._outputs(self.params, x)

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

    def _jacobian_rows(self, x, span):
        """For the tasks in ``span`` (start, stop), per layer the rows ``a [t, M, R, i']``
        (bias column included) and ``g [t, M, K, R, o]`` of the network's Jacobian at phi on
        x (BatchNorm statistics constant)."""
        spec, fixed = self.spec, self.fixed

        def one_task(p, xi):
            _, a, g = net.jacobian_rows(p, fixed, xi, self.layer_shapes)
            return a, g

        with functional_mode(self.model), constant_batch_statistics(self.model), Capture(spec) as capture:
            net = FunctionalNet(self.model, spec, capture, self.loss)
            a, g = call_tasks(one_task, (0, 0), (self.params, x), span)
        a = [torch.cat([x_l, x_l.new_ones(*x_l.shape[:-1], 1)], dim=-1) if layer.has_bias else x_l
             for layer, x_l in zip(spec.layers, a)]
        return a, g

    @torch.no_grad()
    def functional_covariance(self, x, damping_grid=None):
        """``J H^-1 J^T``: the covariance of the linearised network's K (flattened) outputs at
        each input, ``[T, M, K, K]`` (``[D, T, M, K, K]`` for a ``damping_grid`` of D
        dampings, as :meth:`KronCurvature.functional_covariance`; the Jacobians are computed
        once). BatchNorm normalises with x's batch statistics, held constant in the Jacobian:
        rows are per-example, while the outputs stay transductive, as the point estimate's.
        Tasks and inputs are taken in chunks that keep the rows and coordinates within
        GLM_CHUNK_BYTES. A NaN or Inf in x (or in the parameters) gives NaN covariances where
        it reaches, as it gives NaN outputs: the rows are not scanned for it."""
        self._check_inputs(x)
        parts = []
        for span in task_spans(self.tasks, self._glm_task_chunk(x)):
            a, g = self._jacobian_rows(x, span)
            step = self._input_chunk(a, g)
            M = g[0].shape[1]
            parts.append(torch.cat([
                self.curvature.functional_covariance([x_l[:, i:i + step] for x_l in a], [x_l[:, i:i + step] for x_l in g],
                                                     damping_grid=damping_grid, tasks=slice(*span), check_finite=False)
                for i in range(0, M, step)], dim=-3))
        return torch.cat(parts, dim=-4)

    def _glm_task_chunk(self, x):
        """Tasks per Jacobian pass: the CPU's forward-pass chunk, and at most as many tasks as
        keep the output-gradient rows ``[t, M, K, R, o]`` within GLM_CHUNK_BYTES."""
        per_task = x.shape[1] * math.prod(self.out_shape) * sum(math.prod(s) for s in self.layer_shapes) * x.element_size()
        chunk = max(1, GLM_CHUNK_BYTES // max(1, per_task))
        auto = self._task_chunk(x)
        return min(chunk, auto if auto is not None else self.tasks)

    def _input_chunk(self, a, g):
        """Inputs per projection: the coordinates ``[t, m, K, o, i']`` of all layers within
        GLM_CHUNK_BYTES."""
        T, M, K = g[0].shape[:3]
        per_input = T * K * sum(x.shape[-1] * y.shape[-1] + x.shape[-2] * y.shape[-1]
                                for x, y in zip(a, g)) * g[0].element_size()
        return max(1, min(M, GLM_CHUNK_BYTES // max(1, per_input)))

    @torch.no_grad()
    def predict(self, x, pred_type="glm", link_approx="probit", num_samples=100, generator=None, noise=None):
        """Posterior predictive on inputs ``x [T, M, ...]``.

        Args:
            pred_type: "glm" (default): the linearised network, ``N(f(x; phi_i), J H^-1 J^T)``
                in function space (:meth:`functional_covariance`); "nn": the average over
                ``num_samples`` weight samples run through the network (LLAMA's paper);
                "point": the adapted parameters phi_i alone.
            link_approx: classification under "glm": "probit" (default) or "mc"
                (``num_samples`` function-space draws).
            num_samples: draws for "nn" and for "glm" with "mc".
            generator: a ``torch.Generator`` for those draws.
            noise: "mse" only: the observation noise sigma; default the posterior's
                (:meth:`with_noise`, which another value goes through: the curvature is
                rescaled to match).

        BatchNorm normalises with x's batch statistics (transductive, as in training).

        Returns:
            cross_entropy: class probabilities ``[T, M, C]``.
            mse: ``(mean, std)`` of the predictive, each ``[T, M, D]``; "nn" moment-matches
            the samples, ``std = sqrt(var_s f + sigma**2)``; "glm" has ``std = sqrt(diag(J
            H^-1 J^T) + sigma**2)``.
        """
        choice(pred_type, predictive.PRED_TYPES, "pred_type")
        choice(link_approx, predictive.LINKS, "link_approx")
        if noise is not None and _check_noise(noise) != self.noise and self.loss == "mse":
            return self.with_noise(noise).predict(x, pred_type, link_approx, num_samples, generator)
        self._check_inputs(x)
        sampled = pred_type == "nn" or (pred_type == "glm" and link_approx == "mc" and self.loss != "mse")
        if sampled:
            num_samples = predictive.check_samples(num_samples)
        if pred_type == "nn":
            f = self.sample_outputs(self.sample(num_samples, generator), x)   # [S, T, M, ...]
            if self.loss == "cross_entropy":
                return torch.softmax(f, dim=-1).mean(0)
            return f.mean(0), torch.sqrt(f.var(0, unbiased=False) + self.noise ** 2)
        f = self._outputs(self.params, x)
        if pred_type == "point":
            if self.loss == "cross_entropy":
                return torch.softmax(f, dim=-1)
            return f, torch.full_like(f, self.noise)
        f_cov = self.functional_covariance(x)
        flat = f.reshape(*f.shape[:2], -1)
        if self.loss == "mse":
            mean, std = predictive.gaussian_predictive(flat, f_cov, self.noise)
            return mean.view(f.shape), std.view(f.shape)
        if link_approx == "probit":
            return predictive.probit_softmax(f, f_cov)
        return predictive.mc_softmax(f, f_cov, num_samples, generator)


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
          fisher="exact", backend="kernels", mc_samples=1, generator=None, noise=1.0) -> TaskPosterior:
    """Adapt ``model`` to T new tasks and return their Laplace posteriors.

    Args:
        support_x, support_y: ``[T, N, ...]`` inputs and ``[T, N]`` labels / ``[T, N, ...]``
            float targets.
        loss, inner_lr, inner_steps, damping, scale, fisher, backend, mc_samples, generator:
            as for :func:`llama_fast.meta_step` (the curvature is on the support set).
        noise: "mse" only: the Gaussian observation noise sigma; the curvature is that of the
            Gaussian likelihood, ``scale / sigma^2`` times the squared error's, and the
            predictive adds ``sigma^2`` (:meth:`TaskPosterior.with_noise` changes it later).

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
    noise = _check_noise(noise)
    spec = inspect_model(model)
    theta, fixed = split_params(model, spec)
    theta = {k: v.detach() for k, v in theta.items()}
    fixed = {k: v.detach() for k, v in fixed.items()}
    with functional_mode(model), Capture(spec) as capture:
        net = FunctionalNet(model, spec, capture, loss)
        with torch.no_grad():
            layer_shapes, out_shape = net.output_shapes(theta, fixed, support_x[0])
        check_targets(support_y, out_shape, loss, "support_y")
        draws = None
        if fisher == "mc":
            draws = mc_noise(loss, int(mc_samples), T, support_x.shape[1], out_shape, support_x, generator)

        def one_task(x, y, draws):
            phi = net.inner_loop(theta, fixed, x, y, inner_lr, inner_steps, True)
            _, a, g = net.capture_rows(phi, fixed, x, y, fisher, layer_shapes, draws)
            return phi, a, g

        phi, a, g = torch.func.vmap(one_task, in_dims=(0, 0, None if draws is None else 0))(
            support_x, support_y, draws)
    A, G = curvature_factors(a, g, [layer.has_bias for layer in spec.layers], backend)
    return TaskPosterior(model, spec, loss, phi, fixed, A, G, damping, scale, backend, layer_shapes, out_shape, noise)


def kron_laplace(model, x, y, *, loss, damping, scale=1.0, fisher="exact", backend="kernels",
                 mc_samples=1, generator=None, noise=1.0) -> TaskPosterior:
    """The K-FAC Laplace posterior around ``model``'s parameters on one data set (T = 1).

    ``x [N, ...]``, ``y [N]`` (labels) or ``[N, ...]`` (float targets); ``noise``: the
    Gaussian sigma of "mse" (laplace-torch's ``sigma_noise``). For bias-free
    networks its ``logdet()`` equals laplace-torch's ``KronLaplace(model, likelihood,
    prior_precision=damping, temperature=1/scale, backend=CurvlinopsGGN)`` fitted on one batch
    holding the whole data set: ``log_det_posterior_precision`` (README, "laplace-torch").
    """
    for value, name in ((x, "x"), (y, "y")):
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            raise ValueError(f"{name} must be a tensor with an example dim [N, ...]")
    return adapt(model, x.unsqueeze(0), y.unsqueeze(0), loss=loss, inner_lr=0.0, inner_steps=0,
                 damping=damping, scale=scale, fisher=fisher, backend=backend,
                 mc_samples=mc_samples, generator=generator, noise=noise)
