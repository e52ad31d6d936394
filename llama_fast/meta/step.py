"""The meta-training API: TaskBatch and meta_step (MAML, first-order MAML and LLAMA).

All T tasks of a batch are adapted at once: ``torch.func.vmap`` over tasks of a function that
runs the inner loop with ``torch.func.grad`` and ``functional_call``, evaluates the query loss
and, for LLAMA, captures each K-FAC layer's inputs and output gradients at the adapted
parameters (llama_fast.meta.functional). The batched ops (``kfac_factors``, ``kron_logdet``) run
outside vmap on the returned rows, and ordinary autograd carries the meta-gradient back
through all of it: the log-det, A and G (activations and back-propagated g's) and the inner
loop (second order unless first order is asked for).

Meta-objective per task (docs/ops.md, "Conventions")::

    J_i = mean_loss(phi_i, D^Q) + eta * log det H_i(phi_i) / P [+ delta/2 ||phi_i - theta||^2]

(``evidence_prior``: ``eta / P * (log det H_i + sum_l delta_l ||phi_i,l - theta_l||^2 - P_l log
delta_l)``, the Laplace evidence's prior and Occam terms, through which delta can be learned)

with P the number of K-FAC parameters (``logdet_norm="parameters"``; ``"none"``: P = 1).
    H_i = s * (G (x) A) + delta * I  per K-FAC layer, on D^S (curvature_on="support") or D^Q

and the meta-loss is the mean of J_i over tasks (MAML: the mean query loss).

torch.compile: the ops have fake registrations, so the curvature part (``curvature_logdet``)
compiles with fullgraph=True, and ``meta_objective`` compiles with graph breaks (dynamo traces
the vmapped torch.func inner loop and capture; registering the forward hooks is not traceable,
so fullgraph=True fails); gradients equal eager's (tests/meta/test_meta_compile.py). A double
backward through a compiled region (create_graph=True on the meta-loss) is not supported by
aot_autograd, and kron_logdet's backward raises on double backward anyway.
"""

import math
import time

import torch

from ..ops.curvature import damping_tensor
from .checks import (ALGORITHMS, BACKENDS, CURVATURE_SETS, check_damping, check_targets, choice, count,
                     nonnegative)
from .factors import curvature_factors, curvature_logdet, mc_noise
from .functional import FISHERS, LOSSES, Capture, FunctionalNet, functional_mode, inspect_model, task_loss
from .tasks import call_tasks, resolve_task_chunk, split_params, task_spans
from .types import MetaStepResult, TaskBatch, local_means

__all__ = ["meta_step", "meta_objective"]


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


LOGDET_NORMS = ("parameters", "none")


def _settings(algorithm, loss, inner_lr, inner_steps, eta, damping, scale, fisher,
              curvature_on, first_order, prior_term, backend, mc_samples, tasks, logdet_norm, evidence_prior):
    """Validated settings of one step."""
    choice(algorithm, ALGORITHMS, "algorithm")
    choice(loss, LOSSES, "loss")
    choice(fisher, FISHERS, "fisher")
    choice(curvature_on, CURVATURE_SETS, "curvature_on")
    choice(backend, BACKENDS, "backend")
    choice(logdet_norm, LOGDET_NORMS, "logdet_norm")
    if inner_lr is None:
        raise ValueError("inner_lr is required")
    inner_steps = count(inner_steps, "inner_steps")
    llama = algorithm == "llama"
    if int(mc_samples) < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    cfg = dict(algorithm=algorithm, loss=loss, inner_lr=nonnegative(inner_lr, "inner_lr"),
               inner_steps=inner_steps, fisher=fisher, curvature_on=curvature_on,
               first_order=bool(first_order) or algorithm == "fomaml", backend=backend,
               mc_samples=int(mc_samples), llama=llama, eta=0.0, damping=None, scale=1.0,
               logdet_norm=logdet_norm, evidence_prior=bool(evidence_prior))
    if evidence_prior and not llama:
        raise ValueError("evidence_prior completes LLAMA's log-det term: it needs algorithm='llama'")
    if evidence_prior and prior_term:
        raise ValueError("evidence_prior already holds delta ||phi - theta||^2: leave prior_term False")
    if llama:
        if eta is None:
            raise ValueError("eta (the weight of the log-det term, >= 0) is required for algorithm='llama'")
        cfg["eta"] = nonnegative(eta, "eta")
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
        sq_dist = _layer_sq_dist(net.spec, phi, theta) if prior_term else q_loss.new_zeros(())
        return q_loss, accuracy, a, g, sq_dist
    return one_task


def _layer_sq_dist(spec, phi, theta):
    """||phi_l - theta_l||^2 per K-FAC layer (weight and bias), [L]."""
    return torch.stack([sum(((phi[k] - theta[k]) ** 2).sum() for k in (layer.weight, layer.bias) if k is not None)
                        for layer in spec.layers])


def _layer_deltas(damping, sq_dist):
    """delta per task and K-FAC layer, ``[T, L]`` (``[T, 1]`` where one delta serves every
    layer), in the dtype and device of ``sq_dist [T, L]``."""
    T, L = sq_dist.shape
    damping = damping.to(sq_dist) if isinstance(damping, torch.Tensor) else damping
    delta = damping_tensor(damping, T, L, sq_dist, check=False)
    return delta if delta.dim() == 2 else delta[:, None]


def _evidence_prior(spec, theta, damping, sq_dist):
    """``sum_l delta_l ||phi_l - theta_l||^2 - P_l log delta_l`` per task, [T]: with log det H_i,
    -2 times the Laplace evidence's prior and Occam terms (the likelihood aside), so that the
    meta-gradient reaches a damping tensor that requires grad. delta -> 0 does not minimise it
    (-P_l log delta_l outgrows the log-det's fall) nor delta -> inf (the distance term)."""
    delta = _layer_deltas(damping, sq_dist)
    counts = sq_dist.new_tensor(_layer_sizes(spec, theta))
    return (delta * sq_dist - counts * torch.log(delta)).sum(-1)


def _layer_sizes(spec, theta) -> list:
    """P_l, the parameters of each K-FAC layer (weight and bias)."""
    return [sum(theta[k].numel() for k in (layer.weight, layer.bias) if k is not None) for layer in spec.layers]


def _logdet_divisor(spec, theta, cfg) -> int:
    """P, the number of K-FAC parameters, under logdet_norm="parameters" (else 1): eta then
    weighs the mean log-eigenvalue of H_i, which does not grow with the network: eta = 1 suits
    the sinusoid MLP (1.7k parameters) and Conv-4 at 5 and 20 ways (~112k) (the sweep in
    docs/experiments.md)."""
    if cfg["logdet_norm"] == "none":
        return 1
    return sum(_layer_sizes(spec, theta))


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
                   clock=None, logdet_norm="parameters", evidence_prior=False):
    """The differentiable meta-loss of one batch (meta_step without backward and step).

    Takes meta_step's arguments, plus ``params``: an optional dict that replaces the model's
    parameters by name (for gradient checks). Returns ``(meta_loss, MetaStepResult)``.
    """
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"batch must be a llama_fast.TaskBatch, got {type(batch).__name__}")
    cfg = _settings(algorithm, loss, inner_lr, inner_steps, eta, damping, scale, fisher,
                    curvature_on, first_order, prior_term, backend, mc_samples, batch.tasks, logdet_norm,
                    evidence_prior)
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
        one_task = _task_function(net, theta, rest, cfg, layer_shapes, prior_term or cfg["evidence_prior"])
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
    objective = q_loss
    if logdet is not None:
        terms = logdet + _evidence_prior(spec, theta, cfg["damping"], sq_dist) if cfg["evidence_prior"] else logdet
        objective = q_loss + cfg["eta"] * terms / _logdet_divisor(spec, theta, cfg)
    if prior_term:
        objective = objective + 0.5 * (_layer_deltas(cfg["damping"], sq_dist) * sq_dist).sum(-1)
    meta_loss = objective.mean()
    result = MetaStepResult(
        meta_loss=meta_loss.detach(), query_loss=q_loss.detach(),
        logdet=None if logdet is None else logdet.detach(),
        query_accuracy=accuracy.detach() if loss == "cross_entropy" else None)
    return meta_loss, result


def meta_step(model, batch, optimizer, *, algorithm="llama", loss="cross_entropy", inner_lr=None,
              inner_steps=1, eta=None, damping=None, scale=1.0, fisher="exact",
              curvature_on="support", first_order=False, prior_term=False, backend="kernels",
              mc_samples=1, generator=None, task_chunk="auto", timings=False, grad_sync=None,
              logdet_norm="parameters", evidence_prior=False):
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
            nll (see llama_fast.meta.functional).
        inner_lr, inner_steps: the inner loop ``phi <- phi - inner_lr * grad mean_loss``.
        eta: weight of the log-det term (>= 0), LLAMA only.
        logdet_norm: "parameters" (default): the term is ``eta * log det H_i / P``, P the number
            of K-FAC parameters, so one eta serves networks of any size (the mean log-eigenvalue
            of H_i); "none": ``eta * log det H_i``, the paper's form.
        damping: prior precision delta > 0, LLAMA and prior_term: a float or a tensor [T], or
            per K-FAC layer a sequence of L floats or a tensor [T, L].
        scale: likelihood scale s of ``H = s * G (x) A + delta * I``.
        fisher: "exact" (GGN), "mc" (``mc_samples`` sampled labels, drawn with ``generator``)
            or "empirical".
        curvature_on: "support" (Algorithm 2) or "query" (the paper's variant; the capture
            then shares the query forward pass).
        first_order: drop the inner loop's second-order terms (LLAMA or MAML).
        prior_term: add ``delta/2 ||phi_i - theta||^2`` to each task's objective.
        evidence_prior: LLAMA: the log-det term becomes the Laplace evidence's prior and Occam
            terms, ``eta / P * (log det H_i + sum_l delta_l ||phi_i,l - theta_l||^2 - P_l log
            delta_l)`` (P_l: layer l's K-FAC parameters): pass ``damping`` as a positive tensor
            that requires grad (e.g. ``log_delta.exp().expand(T, L)`` with ``log_delta`` [L] in
            the optimizer) to learn the prior precision with theta. Without the two prior terms
            the meta-gradient would drive delta to 0.
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
        grad_sync: None (single process), or the gradient synchronisation of data-parallel
            meta-training, built once by the caller the way DDP wraps a model:
            ``llama_fast.distributed.GradientSync(model, group)``. ``batch`` is then this rank's
            shard and the global meta-batch the union of the ranks' shards (sizes may differ,
            each >= 1 task). The meta-gradient of the mean objective over all tasks is formed by
            a task-weighted, bucketed all-reduce overlapped with the backward where autograd
            allows, so every rank takes the identical optimizer step; the metrics in
            ``global_means`` and ``meta_loss`` are global. Per-rank randomness (the mc Fisher's
            ``generator``, the task sampler) must be seeded per rank (``distributed.shard_seed``).
            Any object with ``start(result, local_tasks)``, ``abort()`` and ``finish(result)``
            serves.

    A meta-loss or meta-gradient that is not finite (NaN or Inf) is not applied: the optimizer
    step is skipped and the result says so (``step_skipped``, ``nonfinite_grads``); the
    gradients stay in ``p.grad`` for inspection.

    Returns:
        :class:`MetaStepResult`.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    clock = _Clock(bool(timings), batch.device if isinstance(batch, TaskBatch) else torch.device("cpu"))
    optimizer.zero_grad(set_to_none=True)
    meta_loss, result = meta_objective(
        model, batch, algorithm=algorithm, loss=loss, inner_lr=inner_lr, inner_steps=inner_steps,
        eta=eta, damping=damping, scale=scale, fisher=fisher, curvature_on=curvature_on,
        first_order=first_order, prior_term=prior_term, backend=backend, mc_samples=mc_samples,
        generator=generator, task_chunk=task_chunk, clock=clock, logdet_norm=logdet_norm,
        evidence_prior=evidence_prior)
    if grad_sync is None:
        meta_loss.backward()
        result.global_means = local_means(result, batch.tasks)
    else:
        grad_sync.start(result, batch.tasks)
        try:
            meta_loss.backward()
        except BaseException:
            grad_sync.abort()
            raise
        grad_sync.finish(result)
    clock.lap("backward")
    result.nonfinite_grads = _nonfinite_grads(model, result.meta_loss)
    result.step_skipped = result.nonfinite_grads > 0
    if not result.step_skipped:
        optimizer.step()
    clock.lap("step")
    result.timings = clock.result()
    return result


def _nonfinite_grads(model, meta_loss) -> int:
    """How many parameter tensors got a NaN or Inf gradient (all of them when the meta-loss
    itself is not finite), with one host sync. Under a GradientSync the gradients and the
    meta-loss are the global ones, so every rank counts the same and skips alike."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flags = torch.stack([torch.isfinite(meta_loss).all()] + [torch.isfinite(g).all() for g in grads]).tolist()
    if not flags[0]:
        return max(len(grads), 1)
    return flags[1:].count(False)
