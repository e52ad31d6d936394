"""The meta-training API: TaskBatch and meta_step (MAML, first-order MAML and LLAMA).

All T tasks of a batch are adapted at once: ``torch.func.vmap`` over tasks of a function that
runs the inner loop with ``torch.func.grad`` and ``functional_call``, evaluates the query loss
and, for LLAMA, captures each K-FAC layer's inputs and output gradients at the adapted
parameters (llama_fast.functional). The batched ops (``kfac_factors``, ``kron_logdet``) run
outside vmap on the returned rows, and ordinary autograd carries the meta-gradient back
through all of it: the log-det, A and G (activations and back-propagated g's) and the inner
loop (second order unless first order is asked for).

Meta-objective per task (DESIGN.md section 1)::

    J_i = mean_loss(phi_i, D^Q) + eta * log det H_i(phi_i) [+ delta/2 ||phi_i - theta||^2]
    H_i = s * (G (x) A) + delta * I  per K-FAC layer, on D^S (curvature_on="support") or D^Q

and the meta-loss is the mean of J_i over tasks (MAML: the mean query loss).

torch.compile: the ops have fake registrations, so the curvature part (``curvature_logdet``)
compiles with fullgraph=True, and ``meta_objective`` compiles with graph breaks (dynamo traces
the vmapped torch.func inner loop and capture; registering the forward hooks is not traceable,
so fullgraph=True fails); gradients equal eager's (tests/test_meta_compile.py). A double
backward through a compiled region (create_graph=True on the meta-loss) is not supported by
aot_autograd, and kron_logdet's backward raises on double backward anyway.
"""

import math
import numbers
import time
from dataclasses import dataclass

import torch

from . import reference
from .functional import FISHERS, LOSSES, Capture, FunctionalNet, functional_mode, inspect_model, task_loss
from .kfac import kfac_factors
from .logdet import kron_logdet
from .lowrank import LowRankFactor

__all__ = ["TaskBatch", "MetaStepResult", "meta_step", "meta_objective"]

ALGORITHMS = ("llama", "maml", "fomaml")
BACKENDS = ("kernels", "reference")
CURVATURE_SETS = ("support", "query")


@dataclass
class TaskBatch:
    """A batch of T few-shot tasks: support and query sets with a leading task dim.

    Args:
        support_x: ``[T, N, ...]`` float inputs.
        support_y: ``[T, N]`` integer class labels, or ``[T, N, ...]`` float targets.
        query_x: ``[T, M, ...]`` inputs (same per-example shape as support_x).
        query_y: ``[T, M]`` / ``[T, M, ...]`` like support_y.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self):
        names = ("support_x", "support_y", "query_x", "query_y")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"TaskBatch.{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() < 2:
                raise ValueError(f"TaskBatch.{name} needs a leading task dim and an example dim "
                                 f"([T, N, ...]), got shape {tuple(value.shape)}")
        T = self.support_x.shape[0]
        for name in names[1:]:
            if getattr(self, name).shape[0] != T:
                raise ValueError(f"TaskBatch.{name} has T={getattr(self, name).shape[0]} tasks "
                                 f"but support_x has T={T}")
        for x, y, xn, yn in ((self.support_x, self.support_y, *names[:2]),
                             (self.query_x, self.query_y, *names[2:])):
            if y.shape[1] != x.shape[1]:
                raise ValueError(f"TaskBatch.{yn} has {y.shape[1]} examples per task but {xn} "
                                 f"has {x.shape[1]}")
            if not x.dtype.is_floating_point:
                raise ValueError(f"TaskBatch.{xn} must be a floating-point tensor, got {x.dtype}")
            if y.dtype.is_floating_point:
                if y.dtype != x.dtype:
                    raise ValueError(f"TaskBatch.{yn} has dtype {y.dtype} but {xn} has {x.dtype}")
            elif y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
                raise ValueError(f"TaskBatch.{yn} must hold integer class labels or float targets, "
                                 f"got {y.dtype}")
        if self.query_x.shape[2:] != self.support_x.shape[2:]:
            raise ValueError(f"TaskBatch.query_x examples have shape {tuple(self.query_x.shape[2:])} "
                             f"but support_x examples have {tuple(self.support_x.shape[2:])}")
        if self.query_y.dtype != self.support_y.dtype or self.query_y.shape[2:] != self.support_y.shape[2:]:
            raise ValueError("TaskBatch.query_y must have support_y's dtype and per-example shape, got "
                             f"{self.query_y.dtype} {tuple(self.query_y.shape[2:])} vs "
                             f"{self.support_y.dtype} {tuple(self.support_y.shape[2:])}")
        devices = {t.device for t in (self.support_x, self.support_y, self.query_x, self.query_y)}
        if len(devices) > 1:
            raise ValueError(f"TaskBatch tensors must share one device, got {sorted(map(str, devices))}")
        # Integer labels index the classes: int64 is what cross_entropy and one_hot take.
        if not self.support_y.dtype.is_floating_point:
            self.support_y, self.query_y = self.support_y.long(), self.query_y.long()

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.support_x.device

    def to(self, *args, **kwargs) -> "TaskBatch":
        """A copy moved with ``Tensor.to`` (labels keep their integer dtype)."""
        device = torch.empty(0).to(*args, **kwargs).device

        def move(t):
            return t.to(*args, **kwargs) if t.dtype.is_floating_point else t.to(device)
        return TaskBatch(*(move(t) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))


@dataclass
class MetaStepResult:
    """What one meta_step computed (all detached).

    Attributes:
        meta_loss: the scalar that was back-propagated.
        query_loss: ``[T]`` mean query loss per task at the adapted parameters.
        logdet: ``[T]`` ``log det H_i`` per task (LLAMA), else None.
        query_accuracy: ``[T]`` query accuracy per task (cross_entropy), else None.
        timings: seconds per phase when ``timings=True`` ("forward": inner loop, query loss
            and capture; "curvature": factors and log-det; "backward"; "step"; "total").
        global_means: set by meta_step: ``{"tasks": T, "meta_loss": ..., "query_loss": ...,
            "query_accuracy": ..., "logdet": ...}`` (0-dim float64 tensors, so that no value
            forces a host sync; accuracy and log-det only where computed), the means over the
            whole meta-batch. With ``process_group`` these are
            all-reduced over the ranks (identical everywhere) and ``meta_loss`` is the global
            meta-loss, while the per-task tensors hold this rank's shard only.
    """

    meta_loss: torch.Tensor
    query_loss: torch.Tensor
    logdet: torch.Tensor | None = None
    query_accuracy: torch.Tensor | None = None
    timings: dict | None = None
    global_means: dict | None = None


def _local_means(result, tasks):
    """global_means of a single-process step: the means over this batch."""
    f64 = dict(dtype=torch.float64, device=result.meta_loss.device)
    means = {"tasks": torch.tensor(float(tasks), **f64), "meta_loss": result.meta_loss.to(**f64)}
    for name in ("query_loss", "query_accuracy", "logdet"):
        value = getattr(result, name)
        if value is not None:
            means[name] = value.to(**f64).mean()
    return means


def _choice(value, options, name):
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _nonnegative(value, name):
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def check_damping(damping, tasks):
    """damping > 0: a float, or a tensor [T] (or 0-dim) of positive values."""
    if damping is None:
        raise ValueError("damping (the prior precision delta > 0) is required for the curvature")
    if isinstance(damping, torch.Tensor):
        if damping.dim() == 0:
            damping = damping.expand(tasks)
        if damping.shape != (tasks,):
            raise ValueError(f"damping must be a float or a tensor of shape [T={tasks}], got {tuple(damping.shape)}")
        if not bool(((damping > 0) & torch.isfinite(damping)).all()):
            raise ValueError("damping must be positive and finite")
        return damping
    value = float(damping)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"damping must be positive and finite, got {value}")
    return value


def check_targets(y, out_shape, loss, name):
    """Targets that fit the network output: class labels in [0, C) for cross_entropy, float
    targets of the output's per-example shape for mse."""
    if loss == "cross_entropy":
        if len(out_shape) != 1 or out_shape[0] < 2:
            raise ValueError(f"loss='cross_entropy' needs network outputs of shape [N, C] with C >= 2 "
                             f"classes, got per-example shape {out_shape}; use loss='mse' for regression")
        if y.dtype.is_floating_point or y.dim() != 2:
            raise ValueError(f"loss='cross_entropy' needs integer class labels {name} of shape [T, N], "
                             f"got {y.dtype} {tuple(y.shape)}")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= out_shape[0]:
            raise ValueError(f"{name} holds labels in [{low}, {high}] but the network has "
                             f"{out_shape[0]} classes (labels must be in [0, {out_shape[0] - 1}])")
        return
    if not y.dtype.is_floating_point:
        raise ValueError(f"loss='mse' needs float targets {name}, got {y.dtype}; "
                         "use loss='cross_entropy' for class labels")
    if tuple(y.shape[2:]) != tuple(out_shape):
        raise ValueError(f"loss='mse': {name} has per-example shape {tuple(y.shape[2:])} but the network "
                         f"outputs {tuple(out_shape)}")


# task_chunk="auto" on the CPU: tasks per vmap call such that one chunk's largest capture
# activation (support rows x the widest K-FAC layer output) stays within this many bytes.
# Measured (2-core EPYC, best of interleaved runs, Conv-4 5-way 1-shot, 1 MB per task), step
# time in ms for chunks of 1 / 4 or 8 / all tasks: T=4 MAML 350 / - / 501, LLAMA 645 / - / 794;
# T=32 MAML 2807 / 3865 / 4697, LLAMA 5550 / 5777 / 7649. Under vmap the CPU pays for the
# batch: convolutions become grouped ones (Conv-4's first, one input channel per group, is
# slow in oneDNN), BatchNorm folds tasks into channels through copies, and tensors past glibc's
# 32 MB mmap threshold are page-faulted in afresh on every allocation. The sinusoid MLP's
# 1.6 KB tasks stay in one call: there a chunk costs more in Python overhead than it saves.
# A chunk of one task is since called without vmap at all (call_tasks), which removes the
# batching rules' copies as well: T=4 MAML 349 -> 279 ms, LLAMA 611 -> 503 ms (medians of 8).
AUTO_CHUNK_BYTES = 1 << 20


def resolve_task_chunk(task_chunk, tasks, device, rows, layer_shapes, element_size):
    """Tasks per vmap call (None: all in one). `task_chunk`: None, "auto" or an int >= 1."""
    if task_chunk is None:
        return None
    if isinstance(task_chunk, str):
        if task_chunk != "auto":
            raise ValueError(f"task_chunk must be None, 'auto' or an int >= 1, got {task_chunk!r}")
        if device.type != "cpu":   # a GPU wants the whole batch in one launch
            return None
        widest = max(math.prod(shape) for shape in layer_shapes)
        task_chunk = max(1, AUTO_CHUNK_BYTES // max(1, rows * widest * element_size))
    elif isinstance(task_chunk, bool) or not isinstance(task_chunk, numbers.Integral) or task_chunk < 1:
        raise ValueError(f"task_chunk must be None, 'auto' or an int >= 1, got {task_chunk!r}")
    return None if task_chunk >= tasks else int(task_chunk)


def split_params(model, spec, params=None):
    """(theta_fast, rest): the adapted parameters and everything else functional_call needs
    (BatchNorm parameters and buffers); `params` overrides the model's tensors by name."""
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    if params is not None:
        unknown = set(params) - set(tensors)
        if unknown:
            raise ValueError(f"params has names the model does not: {sorted(unknown)}")
        tensors.update(params)
    fast = {k: tensors.pop(k) for k in spec.fast}
    return fast, tensors


def curvature_factors(a, g, biases, backend):
    """Per-layer (A, G) lists from the captured rows: one batched call for all layers. A factor
    built from fewer rows than its width (the sinusoid's 40-wide G's from 10 support points,
    Conv-4's 577-wide A's from 45 or 245 patch rows) comes as a LowRankFactor whose dual Gram
    matrix the same launch computes (backend "kernels"; "reference" is dense)."""
    if backend == "kernels":
        return kfac_factors(a, g, bias=biases, low_rank=True)
    return reference.kfac_factors(a, g, bias=biases)


def _cat_factor(parts):
    """One layer's factor of all tasks from its per-call parts (tensors or LowRankFactors)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if not isinstance(first, LowRankFactor):
        return torch.cat(parts)
    return LowRankFactor(torch.cat([x.rows for x in parts]), first.bias, first.scale,
                         dual=torch.cat([x.dual() for x in parts]))


def curvature_logdet(factors, damping, scale, backend):
    """Per-task log det H of all T tasks from the per-call factor lists, in one kron_logdet:
    its eigendecompositions then run over a batch of matrices (the CPU kernel runs one matrix
    per thread, which beats LAPACK's own threading on one 577 x 577 matrix at a time)."""
    A = [_cat_factor(parts) for parts in zip(*(A for A, _ in factors))]
    G = [_cat_factor(parts) for parts in zip(*(G for _, G in factors))]
    if backend == "kernels":
        return kron_logdet(A, G, damping=damping, scale=scale)
    return reference.kron_logdet(A, G, damping=damping, scale=scale)


def mc_noise(loss, samples, tasks, rows, out_shape, like, generator):
    """[T, m, N, C] noise that the mc Fisher turns into sampled labels (Gumbel for CE, normal
    for the Gaussian), drawn outside vmap so that `generator` governs it."""
    shape = (tasks, samples, rows, *out_shape)
    if loss == "mse":
        return torch.randn(shape, dtype=like.dtype, device=like.device, generator=generator)
    u = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
    tiny = torch.finfo(like.dtype).tiny
    exponential = -torch.log(u.clamp_min(tiny))
    return -torch.log(exponential.clamp_min(tiny))


class _Clock:
    """Wall-clock phases (CUDA work is synchronised first); a no-op when not asked for."""

    def __init__(self, enabled, device):
        self.enabled = enabled
        self.cuda = enabled and device.type == "cuda"
        self.times = {}
        self.start = self.last = self._now() if enabled else 0.0

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name):
        if self.enabled:
            now = self._now()
            self.times[name] = self.times.get(name, 0.0) + now - self.last
            self.last = now

    def result(self):
        if not self.enabled:
            return None
        return {**self.times, "total": self.last - self.start}


def _settings(algorithm, loss, inner_lr, inner_steps, eta, damping, scale, fisher,
              curvature_on, first_order, prior_term, backend, mc_samples, tasks):
    """Validated settings of one step."""
    _choice(algorithm, ALGORITHMS, "algorithm")
    _choice(loss, LOSSES, "loss")
    _choice(fisher, FISHERS, "fisher")
    _choice(curvature_on, CURVATURE_SETS, "curvature_on")
    _choice(backend, BACKENDS, "backend")
    if inner_lr is None:
        raise ValueError("inner_lr is required")
    inner_steps = int(inner_steps)
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    llama = algorithm == "llama"
    if int(mc_samples) < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    cfg = dict(algorithm=algorithm, loss=loss, inner_lr=_nonnegative(inner_lr, "inner_lr"),
               inner_steps=inner_steps, fisher=fisher, curvature_on=curvature_on,
               first_order=bool(first_order) or algorithm == "fomaml", backend=backend,
               mc_samples=int(mc_samples), llama=llama, eta=0.0, damping=None, scale=1.0)
    if llama:
        if eta is None:
            raise ValueError("eta (the weight of the log-det term, >= 0) is required for algorithm='llama'")
        cfg["eta"] = _nonnegative(eta, "eta")
        cfg["damping"] = check_damping(damping, tasks)
        cfg["scale"] = float(scale)
        if not (math.isfinite(cfg["scale"]) and cfg["scale"] > 0):
            raise ValueError(f"scale must be positive and finite, got {scale}")
    elif prior_term:
        cfg["damping"] = check_damping(damping, tasks)   # the prior precision delta
    return cfg


def _task_function(net, theta, rest, cfg, layer_shapes, prior_term):
    """The per-task computation vmapped over the batch: inner loop, query loss and accuracy,
    (LLAMA) the captured K-FAC rows, (prior_term) ||phi - theta||^2."""
    def one_task(sx, sy, qx, qy, noise):
        phi = net.inner_loop(theta, rest, sx, sy, cfg["inner_lr"], cfg["inner_steps"], cfg["first_order"])
        a, g = [], []
        if cfg["llama"]:
            on_query = cfg["curvature_on"] == "query"
            if on_query:
                q_out, a, g = net.capture_rows(phi, rest, qx, qy, cfg["fisher"], layer_shapes, noise)
            elif net.spec.per_example:   # the query rides along in the support's capture pass
                out, a, g = net.capture_rows(phi, rest, sx, sy, cfg["fisher"], layer_shapes, noise, extra_x=qx)
                q_out = out[sx.shape[0]:]
            else:
                _, a, g = net.capture_rows(phi, rest, sx, sy, cfg["fisher"], layer_shapes, noise)
                q_out = net.forward(phi, rest, qx)
        else:
            q_out = net.forward(phi, rest, qx)
        q_loss = task_loss(q_out, qy, cfg["loss"])
        if cfg["loss"] == "cross_entropy":
            accuracy = (q_out.detach().argmax(-1) == qy).to(q_out.dtype).mean()
        else:
            accuracy = q_loss.new_zeros(())
        sq_dist = sum(((phi[k] - theta[k]) ** 2).sum() for k in phi) if prior_term else q_loss.new_zeros(())
        return q_loss, accuracy, a, g, sq_dist
    return one_task


def task_spans(tasks, chunk):
    """The [start, stop) task ranges of the vmapped calls: all T in one, or `chunk` per call."""
    step = chunk or tasks
    return [(start, min(start + step, tasks)) for start in range(0, tasks, step)]


def call_tasks(one_task, in_dims, inputs, span):
    """one_task's outputs for the tasks in `span`, each with a leading task dim: vmapped, or,
    for a single task (the CPU's default chunk for Conv-4), one plain call. Under vmap a batch
    of one still pays for the batching rules: BatchNorm folds the task dim into its channels
    through copies, and a convolution's bias and grouped weights are rearranged, on every
    forward and backward pass. Inputs and outputs are tensors, or tuples, lists and dicts of
    them (an input may be None)."""
    start, stop = span
    if stop - start == 1:
        part = [x if dim is None else _take(x, start) for x, dim in zip(inputs, in_dims)]
        return _add_task_dim(one_task(*part))
    part = [x if dim is None else _take(x, slice(start, stop)) for x, dim in zip(inputs, in_dims)]
    return torch.func.vmap(one_task, in_dims=in_dims)(*part)


def _take(x, index):
    """x[index] of a tensor, or of every tensor in a dict; None stays None."""
    if isinstance(x, dict):
        return {k: v[index] for k, v in x.items()}
    return None if x is None else x[index]


def _add_task_dim(out):
    """A leading task dim of size 1 on every tensor of a (nested) tuple, list or dict."""
    if isinstance(out, torch.Tensor):
        return out.unsqueeze(0)
    if isinstance(out, dict):
        return {k: _add_task_dim(v) for k, v in out.items()}
    return type(out)(_add_task_dim(v) for v in out)


def _call_chunk(one_task, in_dims, inputs, span, cfg, biases, clock):
    """(q_loss, accuracy, factors or None, sq_dist) of the tasks in `span`, by one call_tasks.
    LLAMA's K-FAC factors are formed per call, from that call's captured rows:
    concatenated over all T tasks, the rows were the step's largest tensors (Conv-4 5-shot,
    T=4: 80 MB of first-layer g's), past glibc's 32 MB mmap threshold, so each of them and its
    gradient was page-faulted in afresh on every step (~100k faults per step there), and held
    twice. The factors themselves are small and are concatenated (curvature_logdet)."""
    q_loss, accuracy, a, g, sq_dist = call_tasks(one_task, in_dims, inputs, span)
    clock.lap("forward")
    factors = None
    if cfg["llama"]:
        factors = curvature_factors(a, g, biases, cfg["backend"])
        clock.lap("curvature")
    return q_loss, accuracy, factors, sq_dist


def meta_objective(model, batch, *, algorithm="llama", loss="cross_entropy", inner_lr=None,
                   inner_steps=1, eta=None, damping=None, scale=1.0, fisher="exact",
                   curvature_on="support", first_order=False, prior_term=False,
                   backend="kernels", mc_samples=1, generator=None, task_chunk="auto", params=None,
                   clock=None):
    """The differentiable meta-loss of one batch (meta_step without backward and step).

    Takes meta_step's arguments, plus ``params``: an optional dict that replaces the model's
    parameters by name (for gradient checks). Returns ``(meta_loss, MetaStepResult)``.
    """
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"batch must be a llama_fast.TaskBatch, got {type(batch).__name__}")
    cfg = _settings(algorithm, loss, inner_lr, inner_steps, eta, damping, scale, fisher,
                    curvature_on, first_order, prior_term, backend, mc_samples, batch.tasks)
    clock = clock or _Clock(False, batch.device)
    spec = inspect_model(model)
    theta, rest = split_params(model, spec, params)
    with functional_mode(model), Capture(spec) as capture:
        net = FunctionalNet(model, spec, capture, loss)
        on_query = cfg["curvature_on"] == "query" and cfg["llama"]
        cx, cy = (batch.query_x, batch.query_y) if on_query else (batch.support_x, batch.support_y)
        with torch.no_grad():   # shape pass on one task: validates targets, sizes the probes
            layer_shapes, out_shape = net.output_shapes(theta, rest, cx[0])
        check_targets(batch.support_y, out_shape, loss, "support_y")
        check_targets(batch.query_y, out_shape, loss, "query_y")
        noise = None
        if cfg["llama"] and cfg["fisher"] == "mc":
            noise = mc_noise(loss, cfg["mc_samples"], batch.tasks, cx.shape[1], out_shape,
                             batch.support_x, generator)
        one_task = _task_function(net, theta, rest, cfg, layer_shapes, prior_term)
        in_dims = (0, 0, 0, 0, None if noise is None else 0)
        chunk = resolve_task_chunk(task_chunk, batch.tasks, batch.device, cx.shape[1], layer_shapes,
                                   batch.support_x.element_size())
        inputs = (batch.support_x, batch.support_y, batch.query_x, batch.query_y, noise)
        biases = [layer.has_bias for layer in spec.layers]
        calls = [_call_chunk(one_task, in_dims, inputs, span, cfg, biases, clock)
                 for span in task_spans(batch.tasks, chunk)]
    q_loss, accuracy, factors, sq_dist = zip(*calls)
    q_loss, accuracy, sq_dist = torch.cat(q_loss), torch.cat(accuracy), torch.cat(sq_dist)
    logdet = None
    if cfg["llama"]:
        logdet = curvature_logdet(factors, cfg["damping"], cfg["scale"], cfg["backend"])
        clock.lap("curvature")
    objective = q_loss if logdet is None else q_loss + cfg["eta"] * logdet
    if prior_term:
        objective = objective + 0.5 * cfg["damping"] * sq_dist
    meta_loss = objective.mean()
    result = MetaStepResult(
        meta_loss=meta_loss.detach(), query_loss=q_loss.detach(),
        logdet=None if logdet is None else logdet.detach(),
        query_accuracy=accuracy.detach() if loss == "cross_entropy" else None)
    return meta_loss, result


def meta_step(model, batch, optimizer, *, algorithm="llama", loss="cross_entropy", inner_lr=None,
              inner_steps=1, eta=None, damping=None, scale=1.0, fisher="exact",
              curvature_on="support", first_order=False, prior_term=False, backend="kernels",
              mc_samples=1, generator=None, task_chunk="auto", timings=False, process_group=None):
    """One meta-training step on a TaskBatch: adapt all tasks, meta-loss, backward, step.

    Args:
        model: an nn.Module built from nn.Linear / nn.Conv2d (adapted, K-FAC), BatchNorm (not
            adapted, batch statistics), parameter-free layers (activations, pooling, Flatten;
            Dropout is switched off).
        batch: a :class:`TaskBatch`.
        optimizer: a torch optimizer over the model's parameters (zero_grad, backward, step).
        algorithm: "llama" (query loss + eta * log det H_i), "maml", or "fomaml" (MAML with
            first-order meta-gradients). "maml" does no curvature work at all.
        loss: "cross_entropy" (integer labels) or "mse" (float targets, Gaussian sigma = 1 for
            the curvature). Training losses are mean-reduced; the curvature uses the summed
            nll (see llama_fast.functional).
        inner_lr, inner_steps: the inner loop ``phi <- phi - inner_lr * grad mean_loss``.
        eta: weight of the log-det term (>= 0), LLAMA only.
        damping: prior precision delta > 0 (float or [T] tensor), LLAMA and prior_term.
        scale: likelihood scale s of ``H = s * G (x) A + delta * I``.
        fisher: "exact" (GGN), "mc" (``mc_samples`` sampled labels, drawn with ``generator``)
            or "empirical".
        curvature_on: "support" (Algorithm 2) or "query" (the paper's variant; the capture
            then shares the query forward pass).
        first_order: drop the inner loop's second-order terms (LLAMA or MAML).
        prior_term: add ``delta/2 ||phi_i - theta||^2`` to each task's objective.
        backend: "kernels" (llama_fast ops; low-rank A where cheaper) or "reference"
            (llama_fast.reference, dense): same math, for comparisons.
        task_chunk: tasks per vmapped call: None (all T in one), an int, or "auto" (the
            default): all T on a GPU; on the CPU, chunks whose largest capture activation
            stays within 1 MB (Conv-4 28x28 1-shot: one task per call; the sinusoid MLP: all
            in one). LLAMA's K-FAC factors are formed per chunk, from that chunk's rows,
            and one kron_logdet takes all T tasks' factors. Results
            and gradients do not depend on it (one autograd graph over the chunks); memory
            and, on the CPU, time do (Conv-4 T=32 on 2 threads: MAML 4.7 -> 2.8 s, LLAMA 7.6
            -> 5.6 s against one call for all 32 tasks).
        timings: record wall-clock seconds per phase in the result.
        process_group: None (single process), or a torch.distributed process group (e.g.
            ``torch.distributed.group.WORLD``, or ``init_from_env().group``) for data-parallel
            meta-training: ``batch`` is this rank's shard and the global meta-batch is the union
            of the ranks' shards (sizes may differ, each >= 1 task). The meta-gradient of the
            mean objective over all tasks is formed by a task-weighted, bucketed all-reduce
            overlapped with the backward where autograd allows (llama_fast.distributed), so
            every rank takes the identical optimizer step; the metrics in ``global_means``
            and ``meta_loss`` are global. Per-rank randomness (the mc Fisher's ``generator``,
            the task sampler) must be seeded per rank (``distributed.shard_seed``).

    Returns:
        :class:`MetaStepResult`.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    clock = _Clock(bool(timings), batch.device if isinstance(batch, TaskBatch) else torch.device("cpu"))
    sync = None
    if process_group is not None:
        from .distributed import GradientSync
        sync = GradientSync(model, process_group)
    optimizer.zero_grad(set_to_none=True)
    meta_loss, result = meta_objective(
        model, batch, algorithm=algorithm, loss=loss, inner_lr=inner_lr, inner_steps=inner_steps,
        eta=eta, damping=damping, scale=scale, fisher=fisher, curvature_on=curvature_on,
        first_order=first_order, prior_term=prior_term, backend=backend, mc_samples=mc_samples,
        generator=generator, task_chunk=task_chunk, clock=clock)
    if sync is None:
        meta_loss.backward()
        result.global_means = _local_means(result, batch.tasks)
    else:
        sync.start(result, batch.tasks)
        try:
            meta_loss.backward()
        except BaseException:
            sync.abort()
            raise
        sync.finish(result)
    clock.lap("backward")
    optimizer.step()
    clock.lap("step")
    result.timings = clock.result()
    return result
