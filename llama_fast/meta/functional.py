"""The functional machinery shared by meta_step, adapt and kron_laplace.

A network runs per task with ``torch.func.functional_call`` inside ``vmap``; its K-FAC layers
(``nn.Linear``, ``nn.Conv2d``) carry forward hooks that, during a *capture* pass, record each
layer's input and add a zero "probe" to its output. ``torch.func.vjp`` with respect to the
probes then gives, for any cotangent on the network output, the gradient with respect to every
layer's pre-activation output. The cotangents encode the Fisher type (docs/ops.md, "Conventions"):

- exact (type-2 / GGN): softmax-CE, C - 1 vectors whose outer products sum to
  ``diag(p) - p p^T`` (equivalent to one per class, ``sqrt(p_c) * (p - e_c)``; see
  softmax_ggn_roots);
  Gaussian (sigma = 1), one per output dim c: ``e_c``;
- mc: ``m`` labels sampled from the model's predictive, each cotangent scaled by
  ``1/sqrt(m)`` so that G is their average;
- empirical: the gradient of the per-example nll at the true labels.

Reductions (why A is a mean and G a sum): G is the curvature of the *summed* nll
``sum_n nll_n`` (per example: CE, or ``||f - y||^2 / 2``), so every g is the gradient of one
example's nll, unscaled, and ``G = sum_{n,r,c} g g^T`` over examples n, output positions r and
cotangents c. A is the *mean* of ``abar abar^T`` over examples and positions, so that
``G (x) A`` approximates the summed-nll GGN. The training losses (inner loop and query) are
instead mean-reduced, as in the MAML papers: CE averaged over examples, MSE averaged over
examples and output dims. With batch-statistics BatchNorm the examples interact, so a
probe's gradient then is that of the summed nll (the usual K-FAC practice), not of one
example's term alone.

Networks: K-FAC layers are adapted in the inner loop and enter the curvature; BatchNorm
parameters are neither (LLAMA's choice) and BatchNorm always normalises with the current
batch's statistics, without running-stat updates; Dropout is off. Any other module that owns
parameters is rejected.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import backprop

LOSSES = ("cross_entropy", "mse")
FISHERS = ("exact", "mc", "empirical")
KFAC_TYPES = backprop.KFAC_TYPES
NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
DROPOUT_TYPES = (nn.modules.dropout._DropoutNd,)
# Modules that treat every example on its own (nothing mixes rows of the batch): a network
# made of these alone may run several sets of examples in one pass. User-defined modules
# (their forward could mix the batch) and BatchNorm (batch statistics) are not among them.
PER_EXAMPLE_TYPES = (
    nn.Sequential, nn.Identity, nn.Flatten, nn.Unflatten, *KFAC_TYPES, *DROPOUT_TYPES,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LogSigmoid, nn.Tanhshrink,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)


@dataclass(frozen=True)
class KfacLayer:
    """One K-FAC layer: its module path and the names of its parameters."""

    name: str
    module: nn.Module
    weight: str
    bias: str | None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None


@dataclass(frozen=True)
class NetworkSpec:
    """The K-FAC layers of a network, its adapted ("fast") and fixed ("slow") parameters,
    whether every module is known to treat each example on its own (PER_EXAMPLE_TYPES), and,
    for a nested nn.Sequential of known leaves, those leaves in execution order (the capture
    then runs backprop.py's written-out reverse pass for all cotangents at once)."""

    layers: tuple
    fast: tuple
    slow: tuple
    per_example: bool = False
    leaves: tuple | None = None


def _conv_padding(module: nn.Conv2d, name: str):
    """The conv's zero padding as an int pair (F.unfold needs numbers, not 'same')."""
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        pads = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError(f"layer {name!r}: padding='same' with an even kernel pads "
                                 "asymmetrically, which K-FAC's unfold does not support")
            pads.append(total // 2)
        return tuple(pads)
    return tuple(module.padding)


def inspect_model(model: nn.Module) -> NetworkSpec:
    """The NetworkSpec of `model`; raises ValueError naming any unsupported layer."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers, fast, slow = [], [], []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = [p for p, _ in module.named_parameters(recurse=False)]
        if isinstance(module, KFAC_TYPES):
            if isinstance(module, nn.Conv2d):
                if module.groups != 1:
                    raise ValueError(f"layer {name!r} (Conv2d) has groups={module.groups}; "
                                     "K-FAC supports groups=1 only")
                if module.padding_mode != "zeros":
                    raise ValueError(f"layer {name!r} (Conv2d) has padding_mode="
                                     f"{module.padding_mode!r}; K-FAC supports 'zeros' only")
                _conv_padding(module, name)
            frozen = [p for p, param in module.named_parameters(recurse=False) if not param.requires_grad]
            if frozen:
                # Adapting them would change weights the user froze, and leaving them out would
                # take part of the layer out of its K-FAC block: neither is silent.
                raise ValueError(f"layer {name!r} ({type(module).__name__}) has frozen parameters "
                                 f"{frozen} (requires_grad=False): llama_fast adapts every parameter "
                                 "of a K-FAC layer and puts it in the curvature; unfreeze them, or "
                                 "pass a model of the trainable part only")
            bias = prefix + "bias" if module.bias is not None else None
            layers.append(KfacLayer(name, module, prefix + "weight", bias))
            fast += [prefix + p for p in own]
        elif isinstance(module, NORM_TYPES):
            slow += [prefix + p for p in own]
        elif own:
            raise ValueError(
                f"unsupported layer {name!r} ({type(module).__name__}) has parameters "
                f"{own}: llama_fast adapts nn.Linear and nn.Conv2d (K-FAC layers) and keeps "
                "BatchNorm fixed; other layers must be parameter-free")
    if not layers:
        raise ValueError("model has no nn.Linear or nn.Conv2d layer: nothing to adapt")
    per_example = all(_is_per_example(m) for m in model.modules())
    leaves = backprop.sequential_leaves(model, [l.name for l in layers], PER_EXAMPLE_TYPES)
    return NetworkSpec(tuple(layers), tuple(fast), tuple(slow), per_example, leaves)


def _is_per_example(module: nn.Module) -> bool:
    """A torch.nn module of a PER_EXAMPLE_TYPES class (a user's subclass may override forward)."""
    return isinstance(module, PER_EXAMPLE_TYPES) and backprop.is_torch_nn_module(module)


@contextmanager
def functional_mode(model: nn.Module):
    """BatchNorm on batch statistics without running-stat updates (vmap-safe: no in-place
    buffer writes), Dropout off; the modules' flags are restored afterwards."""
    saved = []
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            saved.append((module, module.training, module.track_running_stats))
            module.training, module.track_running_stats = True, False
        elif isinstance(module, DROPOUT_TYPES):
            saved.append((module, module.training, None))
            module.training = False
    try:
        yield
    finally:
        for module, training, track in saved:
            module.training = training
            if track is not None:
                module.track_running_stats = track


@contextmanager
def constant_batch_statistics(model: nn.Module):
    """Inside functional_mode: BatchNorm normalises with its batch's statistics held constant
    (detached), so that each output depends on its own input alone and a Jacobian's rows are
    per-example (the linearised predictive's). The values are those of the batch-statistics
    forward pass; only the derivatives through the mean and variance are dropped."""
    handles = [m.register_forward_hook(_constant_statistics_hook)
               for m in model.modules() if isinstance(m, NORM_TYPES)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _constant_statistics_hook(module, args, output):
    x = args[0]
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True).detach()
    var = x.var(dims, unbiased=False, keepdim=True).detach()
    y = (x - mean) * torch.rsqrt(var + module.eps)
    if module.affine:
        shape = (1, -1, *([1] * (x.dim() - 2)))
        y = y * module.weight.view(shape) + module.bias.view(shape)
    return y


class Capture:
    """Forward hooks on the K-FAC layers: while active, record each layer's input and add its
    probe to the output. Inactive (the inner loop), they do nothing."""

    def __init__(self, spec: NetworkSpec):
        self.spec = spec
        self.active = False
        self.inputs = []
        self.probes = None
        self.out_shapes = None
        self.handles = []

    def _hook(self, index):
        def hook(module, args, output):
            if not self.active:
                return None
            if self.inputs[index] is not None:
                raise RuntimeError(f"K-FAC layer {self.spec.layers[index].name!r} ran twice in one "
                                   "forward pass; shared layers are not supported")
            self.inputs[index] = args[0]
            if self.out_shapes is not None:
                self.out_shapes[index] = tuple(output.shape[1:])
            if self.probes is not None:
                return output + self.probes[index]
            return None
        return hook

    def __enter__(self):
        self.handles = [layer.module.register_forward_hook(self._hook(i))
                        for i, layer in enumerate(self.spec.layers)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def start(self, probes=None, shapes=False):
        self.active, self.probes = True, probes
        self.inputs = [None] * len(self.spec.layers)
        self.out_shapes = [None] * len(self.spec.layers) if shapes else None

    def abort(self):
        self.active, self.probes, self.inputs = False, None, []

    def stop(self):
        missing = [l.name for l, x in zip(self.spec.layers, self.inputs) if x is None]
        self.active, self.probes = False, None
        if missing:
            raise RuntimeError(f"K-FAC layers {missing} did not run in the forward pass")
        inputs, self.inputs = self.inputs, []
        return inputs


def task_loss(out, y, loss):
    """Mean-reduced training loss of one task (MAML convention)."""
    if loss == "cross_entropy":
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def softmax_ggn_roots(log_p):
    """[C-1, N, C] cotangents u_c with sum_c u_c u_c^T = diag(p) - p p^T per example.

    The per-class vectors sqrt(p_c) (e_c - p) are C vectors in a (C-1)-dim space; C-1 suffice,
    which saves one vector-Jacobian product per class count. With q = sqrt(p) (a unit vector)
    ``diag(p) - p p^T = D (I - q q^T) D``, D = diag(q), and the Householder reflection H with
    ``v = q + e_C`` maps q to -e_C, so ``I - q q^T = H (I - e_C e_C^T) H`` and the columns
    ``c < C`` of ``D H`` are the u_c: ``u_c = q * (e_c - v q_c / (1 + q_C))``. The denominator
    is >= 1, so the vectors are smooth in p (differentiable for the meta-gradient).
    """
    q = torch.exp(0.5 * log_p)              # sqrt(p): finite gradient even where p underflows
    classes = q.shape[-1]
    v = torch.cat([q[:, :-1], q[:, -1:] + 1.0], dim=-1)                       # [N, C]
    coeff = (q[:, :-1] / (1.0 + q[:, -1:])).transpose(0, 1).unsqueeze(-1)    # [C-1, N, 1]
    eye = torch.eye(classes, dtype=q.dtype, device=q.device)[:-1].unsqueeze(1)  # [C-1, 1, C]
    return q.unsqueeze(0) * (eye - coeff * v.unsqueeze(0))


def cotangents(out, y, loss, fisher, noise=None):
    """[K, N, C] cotangents on the output whose VJPs are the g's of the chosen Fisher.

    `noise` ([m, N, C]) drives the mc labels: Gumbel noise for CE, standard normal for MSE.
    """
    if loss == "cross_entropy":
        log_p = torch.log_softmax(out, dim=-1)
        p = log_p.exp()
        if fisher == "exact":
            return softmax_ggn_roots(log_p)
        if fisher == "empirical":
            return (p - F.one_hot(y, out.shape[-1]).to(p.dtype)).unsqueeze(0)
        labels = (log_p.detach().unsqueeze(0) + noise).argmax(-1)          # Gumbel-max sampling
        return (p.unsqueeze(0) - F.one_hot(labels, out.shape[-1]).to(p.dtype)) / math.sqrt(noise.shape[0])
    if fisher == "exact":
        eye = torch.eye(out.shape[-1], dtype=out.dtype, device=out.device)
        return eye.unsqueeze(1).expand(-1, out.shape[0], -1)               # sigma = 1
    if fisher == "empirical":
        return (out - y).unsqueeze(0)
    # y~ = f + eps, so d nll / d f = f - y~ = -eps.
    return -noise / math.sqrt(noise.shape[0])


def layer_rows(layer: KfacLayer, a, g):
    """(a rows [N*R, i], g rows [K*N*R, o]) of one layer for one task from its input a
    [N, ...] and output gradients g [K*N, ...]: convolutions unfold their input patches (K-FAC
    expand); Linear layers treat extra middle dims as positions."""
    module = layer.module
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(a, module.kernel_size, dilation=module.dilation,
                           padding=_conv_padding(module, layer.name), stride=module.stride)
        a_rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        g_rows = g.movedim(1, -1).reshape(-1, g.shape[1])
        return a_rows, g_rows
    return a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])


def example_rows(layer: KfacLayer, a, g):
    """Per-example rows of one layer: (a [M, R, i], g [M, K, R, o]) from its input a [M, ...]
    and the gradients g [K, M, ...] of K outputs at its output (R positions: a convolution's
    patches, a Linear layer's extra middle dims)."""
    module = layer.module
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(a, module.kernel_size, dilation=module.dilation,
                           padding=_conv_padding(module, layer.name), stride=module.stride)
        return patches.transpose(1, 2), g.flatten(3).transpose(0, 1).transpose(-1, -2)
    M = a.shape[0]
    return a.reshape(M, -1, a.shape[-1]), g.reshape(g.shape[0], M, -1, g.shape[-1]).transpose(0, 1)


class FunctionalNet:
    """`model` run functionally per task: forward passes, the MAML inner loop and the
    capture of K-FAC inputs and output gradients. Use inside ``with functional_mode(model),
    Capture(spec)``."""

    def __init__(self, model, spec: NetworkSpec, capture: Capture, loss: str):
        self.model, self.spec, self.capture, self.loss = model, spec, capture, loss
        self.paddings = {l.name: _conv_padding(l.module, l.name) for l in spec.layers
                         if isinstance(l.module, nn.Conv2d)}

    def forward(self, fast, rest, x):
        return functional_call(self.model, {**rest, **fast}, (x,), strict=False)

    def support_loss(self, fast, rest, x, y):
        return task_loss(self.forward(fast, rest, x), y, self.loss)

    def inner_loop(self, fast, rest, x, y, lr, steps, first_order):
        """phi <- phi - lr * grad mean_loss(phi, D^S), `steps` times."""
        grad_fn = torch.func.grad(self.support_loss)
        for _ in range(steps):
            grads = grad_fn(fast, rest, x, y)
            if first_order:
                grads = {k: v.detach() for k, v in grads.items()}
            fast = {k: fast[k] - lr * grads[k] for k in fast}
        return fast

    def output_shapes(self, fast, rest, x):
        """Per-example output shape of every K-FAC layer and of the network (shape pass)."""
        self.capture.start(shapes=True)
        try:
            out = self.forward(fast, rest, x)
        except BaseException:
            self.capture.abort()
            raise
        shapes = self.capture.out_shapes
        self.capture.stop()
        return shapes, tuple(out.shape[1:])

    def capture_rows(self, fast, rest, x, y, fisher, layer_shapes, noise=None, extra_x=None):
        """(out, a rows, g rows) of one task at `fast`: the network output on x (differentiable)
        and, per K-FAC layer, the rows that build A (mean) and G (sum).

        `extra_x` (per-example networks only: ``spec.per_example``) rides along in the same
        pass without entering the rows; `out` then covers x and extra_x, in that order. It
        saves meta_step a second forward pass (the query's) where call overheads dominate.
        """
        if self.spec.leaves is not None:
            return self._capture_rows_stacked(fast, rest, x, y, fisher, noise, extra_x)
        return self._capture_rows_vjp(fast, rest, x, y, fisher, layer_shapes, noise, extra_x)

    def _probed_vjp(self, fast, rest, x, layer_shapes):
        """(out, vjp_fn, layer inputs): the forward pass with zero probes added to every K-FAC
        layer's output, so that a VJP of the output gives each layer's output gradients."""
        probes = tuple(torch.zeros((x.shape[0], *s), dtype=x.dtype, device=x.device) for s in layer_shapes)

        def probed(probes):
            self.capture.start(probes)
            try:
                out = self.forward(fast, rest, x)
            except BaseException:
                self.capture.abort()
                raise
            return out, self.capture.stop()

        return torch.func.vjp(probed, probes, has_aux=True)

    def jacobian_rows(self, fast, rest, x, layer_shapes):
        """(out [M, K], a rows, g rows) at `fast` on inputs x [M, ...]: per K-FAC layer the
        per-example input rows ``[M, R, i]`` and the gradients of each of the K (flattened)
        outputs at the layer's output ``[M, K, R, o]``; together ``J_k = sum_r g_k,r a_r^T``.
        Use inside ``constant_batch_statistics`` where the network has BatchNorm (otherwise
        an output's gradient also reaches the other examples' layer outputs)."""
        M = x.shape[0]
        out, vjp_fn, inputs = self._probed_vjp(fast, rest, x, layer_shapes)
        flat = out.reshape(M, -1)
        K = flat.shape[1]
        eye = torch.eye(K, dtype=out.dtype, device=out.device)
        # One VJP per output: each sums over the examples, which the constant statistics keep
        # apart, so example m's slice is its own gradient.
        per_output = [vjp_fn(eye[k].expand(M, K).reshape(out.shape))[0] for k in range(K)]
        rows = [example_rows(layer, a, torch.stack(g))
                for layer, a, g in zip(self.spec.layers, inputs, zip(*per_output))]
        return flat, [r[0] for r in rows], [r[1] for r in rows]

    def _capture_rows_stacked(self, fast, rest, x, y, fisher, noise, extra_x):
        """capture_rows by backprop.py: one written-out reverse pass for all K cotangents."""
        n = x.shape[0]
        params = {**rest, **fast}
        out, inputs = backprop.forward(self.spec.leaves, params, x if extra_x is None else torch.cat([x, extra_x]))
        if extra_x is not None:   # per-example network: the support's rows alone
            inputs = backprop.first_rows(inputs, n)
        V = cotangents(out[:n], y, self.loss, fisher, noise)
        gs = backprop.output_grads(self.spec.leaves, params, inputs, V, self.paddings)
        layer_inputs = [a for a, (_, m) in zip(inputs, self.spec.leaves) if isinstance(m, KFAC_TYPES)]
        rows = [layer_rows(layer, a, g.flatten(0, 1))   # g [K*N, ...], cotangent-major
                for layer, a, g in zip(self.spec.layers, layer_inputs, gs)]
        return out, [r[0] for r in rows], [r[1] for r in rows]

    def _capture_rows_vjp(self, fast, rest, x, y, fisher, layer_shapes, noise, extra_x):
        """capture_rows for any network: zero probes on the K-FAC outputs, one VJP per cotangent."""
        n = x.shape[0]
        if extra_x is not None:
            x = torch.cat([x, extra_x])
        out, vjp_fn, inputs = self._probed_vjp(fast, rest, x, layer_shapes)
        V = cotangents(out[:n], y, self.loss, fisher, noise)
        if extra_x is not None:   # the extra rows carry no cotangent, and give no a or g rows
            V = torch.cat([V, V.new_zeros(V.shape[0], x.shape[0] - n, *V.shape[2:])], dim=1)
            inputs = [a[:n] for a in inputs]
        # One VJP per cotangent rather than vmap over them: under a second vmap, BatchNorm's
        # backward (and its double backward, for the meta-gradient) falls back to a chain of
        # elementwise ops over K*T folded channels, while each plain VJP keeps ATen's fused
        # kernels (Conv-4, 5-way exact Fisher: LLAMA step 787 -> 741 ms on 2 CPU threads).
        per_cotangent = [vjp_fn(v)[0] for v in V.unbind(0)]
        # g [K*N, ...], cotangent-major: the order of G's rows does not matter (a sum).
        gs = [g[0][:n] if len(g) == 1 else torch.cat([g_c[:n] for g_c in g]) for g in zip(*per_cotangent)]
        rows = [layer_rows(layer, a, g) for layer, a, g in zip(self.spec.layers, inputs, gs)]
        return out, [r[0] for r in rows], [r[1] for r in rows]
