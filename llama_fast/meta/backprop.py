"""A Sequential network's reverse pass written out layer by layer, for K cotangents at once.

LLAMA's G factors need, for each of K cotangents on the network output (C - 1 of them for the
exact softmax Fisher), the gradient with respect to every K-FAC layer's pre-activation output,
and the meta-gradient then differentiates through those gradients (a double backward).
Autograd's VJP serves one cotangent per pass, so K passes replay the whole backward graph and
the meta-gradient replays its double backward K times, BatchNorm's composite double backward
included: on the CPU, for 5 support images, that is mostly per-op overhead. Here each leaf's
reverse step is an ordinary differentiable torch expression with a leading cotangent dim, so
one pass serves all K and its double backward is ordinary autograd over K-batched ops. A
BatchNorm2d -> ReLU -> max-pool block (each of Conv-4's) takes one step with a hand-written
derivative instead (``BlockInputGrad``): its unpooled K-sized tensors are the capture's largest.

It applies to a (nested) ``torch.nn.Sequential`` whose leaves have a known reverse step:
Linear, Conv2d, BatchNorm with batch statistics (how functional_mode runs it) and the
parameter-free per-example modules of ``functional.PER_EXAMPLE_TYPES``. ``sequential_leaves``
returns None for any other network, which then keeps the VJP path.
"""

import torch
import torch.nn.functional as F
from torch import nn

# The K-FAC layer types: the leaves whose output gradients the reverse pass hands over.
KFAC_TYPES = (nn.Linear, nn.Conv2d)


def is_torch_nn_module(module: nn.Module) -> bool:
    """A module of torch.nn itself (a user's subclass may override forward)."""
    return type(module).__module__.startswith("torch.nn.modules.")


def _walk(module: nn.Module, path: str, leaves: list) -> bool:
    """Append the leaves of a Sequential tree in execution order; False if it is not one."""
    if type(module) is nn.Sequential:
        for name, child in module._modules.items():   # keeps a module listed twice, twice
            if child is None or not _walk(child, f"{path}.{name}" if path else name, leaves):
                return False
        return True
    leaves.append((path, module))
    return True


def sequential_leaves(model: nn.Module, kfac_names, supported_types) -> tuple | None:
    """((path, module), ...) of `model`'s leaves in execution order, or None where the written-out
    reverse pass does not apply: `model` is not a nested nn.Sequential, a leaf is not a torch.nn
    module of `supported_types` or BatchNorm, a leaf works in place, or the K-FAC leaves are not
    exactly `kfac_names` in order (a K-FAC layer listed twice)."""
    leaves = []
    if type(model) is not nn.Sequential or not _walk(model, "", leaves):
        return None
    for _, module in leaves:
        if not is_torch_nn_module(module) or getattr(module, "inplace", False):
            return None
        if not isinstance(module, (*supported_types, nn.modules.batchnorm._BatchNorm)):
            return None
    kfac = [path for path, module in leaves if isinstance(module, KFAC_TYPES)]
    return tuple(leaves) if tuple(kfac) == tuple(kfac_names) else None


def _param(params, path, name):
    return params.get(f"{path}.{name}")


def forward(leaves, params, x):
    """(output, inputs): the network on x with `params` (names as in named_parameters), and
    per leaf its input (the graph kept for the meta-gradient) or, for MaxPool2d, the pair
    (input, argmax indices)."""
    inputs = []
    for path, module in leaves:
        inputs.append(x)
        if type(module) is nn.MaxPool2d and not module.return_indices:
            x, indices = F.max_pool2d(x, module.kernel_size, module.stride, module.padding,
                                      module.dilation, ceil_mode=module.ceil_mode, return_indices=True)
            inputs[-1] = (inputs[-1], indices)
            continue
        if isinstance(module, nn.Linear):
            x = F.linear(x, _param(params, path, "weight"), _param(params, path, "bias"))
        elif isinstance(module, nn.Conv2d):
            x = module._conv_forward(x, _param(params, path, "weight"), _param(params, path, "bias"))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module._check_input_dim(x)
            x = F.batch_norm(x, None, None, _param(params, path, "weight"), _param(params, path, "bias"),
                             True, 0.0, module.eps)   # batch statistics, no running stats
        else:
            x = module(x)
    return x, inputs


def first_rows(inputs, n):
    """`forward`'s inputs restricted to the first n examples (per-example networks)."""
    return [tuple(t[:n] for t in x) if isinstance(x, tuple) else x[:n] for x in inputs]


def _conv_input_grad(module, weight, padding, x, g):
    """d/dx of conv2d(x) against g [K, N, O, h, w]: the transposed convolution; with stride 1,
    as a convolution with the flipped kernel (on the CPU, conv_transpose2d takes a slow path:
    Conv-4's 20 x 64 x 14 x 14 case 3.3 ms against 0.7 ms)."""
    flat = g.flatten(0, 1)
    reach = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    if tuple(module.stride) == (1, 1) and all(0 <= r - p for r, p in zip(reach, padding)):
        flipped = weight.flip(-2, -1).transpose(0, 1)
        grad = F.conv2d(flat, flipped, None, 1, [r - p for r, p in zip(reach, padding)], module.dilation)
        return grad.unflatten(0, g.shape[:2])
    output_padding = tuple(
        size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
        for size, out, s, p, d, k in zip(x.shape[-2:], g.shape[-2:], module.stride, padding,
                                          module.dilation, module.kernel_size))
    grad = F.conv_transpose2d(flat, weight, None, module.stride, padding, output_padding, 1,
                              module.dilation)
    return grad.unflatten(0, g.shape[:2])


def _batch_norm_input_grad(module, weight, x, g):
    """d/dx of batch-statistics BatchNorm against g [K, N, C, ...]:
    (gamma / sigma) (g - mean(g) - xhat mean(g xhat)), means per channel over the batch and
    positions, recomputed from x so that the meta-gradient flows through x."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(x.var(dims, correction=0, keepdim=True) + module.eps)
    xhat = (x - mean) * inv_std
    g_dims = [d + 1 for d in dims]
    centred = g - g.mean(g_dims, keepdim=True) - xhat * (g * xhat).mean(g_dims, keepdim=True)
    if weight is not None:
        inv_std = inv_std * weight.view(-1, *[1] * (x.dim() - 2))
    return inv_std * centred


def _argmax_positions(indices, k):
    """max_pool2d's argmax indices [..., h, w] as flat positions [k, ..., h * w], one copy per
    cotangent (an expanded view)."""
    return indices.flatten(-2).expand(k, *indices.shape[:-2], -1)


def _max_pool_input_grad(x, indices, g):
    """d/dx of max_pool2d against g [K, N, C, h, w]: g scattered to the argmax positions."""
    k = g.shape[0]
    grad = g.new_zeros(k, *x.shape[:-2], x.shape[-2] * x.shape[-1])
    return grad.scatter_add(-1, _argmax_positions(indices, k), g.flatten(-2)).view(k, *x.shape)


class BlockInputGrad(torch.autograd.Function):
    """The reverse step of a BatchNorm (batch statistics) -> ReLU -> max-pool block for K
    cotangents at once: from g [K, N, C, h, w] at the pool's output to the gradient at the
    BatchNorm's input, y = a (S - u - xhat v), with S the ReLU-masked g scattered to the argmax
    positions, a = gamma / sigma, u = mean(S), v = mean(S xhat) per cotangent and channel.

    Conv-4's first block is the capture's largest tensor (K x N x 64 x 28 x 28), and every pass
    over it is bound by memory bandwidth; written as separate torch ops, the scatter, mask and
    BatchNorm formula and autograd's derivative of them take ~25 such passes. Here S is never
    formed: u and v come from the pooled g and xhat at the argmax positions (the mask there is
    (pooled output > 0)), y is one dense write plus a scatter-add, and the backward reads dy
    three times: dL/dg = mask a (dy - mean(dy) - xhat mean(dy xhat)) at the argmax positions
    (the BatchNorm step is a self-adjoint projection), dL/dx is BatchNorm's own backward of
    dL/dxhat plus the path through sigma. The backward recomputes the statistics from x and g
    when autograd records it, so it is differentiable in turn.
    """

    generate_vmap_rule = True

    @staticmethod
    def statistics(x, g, indices, pooled, weight, eps):
        """(xhat, 1/sigma, masked g, xhat at the argmax positions, u, v, a)."""
        var, mean = torch.var_mean(x, (0, 2, 3), correction=0, keepdim=True)
        inv_std = torch.rsqrt(var + eps)
        xhat = (x - mean) * inv_std
        masked = g * (pooled > 0).to(g.dtype)
        xhat_at = xhat.flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)
        count = x.numel() // x.shape[1]
        u = masked.sum((1, 3, 4), keepdim=True) / count
        v = (masked * xhat_at).sum((1, 3, 4), keepdim=True) / count
        a = inv_std if weight is None else inv_std * weight.view(-1, 1, 1)
        return xhat, inv_std, masked, xhat_at, u, v, a

    @staticmethod
    def forward(x, g, indices, pooled, weight, eps):
        xhat, inv_std, masked, xhat_at, u, v, a = BlockInputGrad.statistics(x, g, indices, pooled, weight, eps)
        y = torch.addcmul(-(a * u), xhat, a * v, value=-1)           # a (-u - xhat v)
        values = a * masked                                          # + a S, in place in y
        y.view(*y.shape[:-2], -1).scatter_add_(-1, _argmax_positions(indices, values.shape[0]),
                                               values.flatten(-2))
        return y, xhat, inv_std, masked, xhat_at, u, v, a

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, g, indices, pooled, weight, eps = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(x, g, indices, pooled, weight, *output[1:])
        ctx.eps = eps

    @staticmethod
    def backward(ctx, dy, *_):
        x, g, indices, pooled, weight, xhat, inv_std, masked, xhat_at, u, v, a = ctx.saved_tensors
        if torch.is_grad_enabled():   # a double backward: the statistics as functions of x and g
            xhat, inv_std, masked, xhat_at, u, v, a = BlockInputGrad.statistics(
                x, g, indices, pooled, weight, ctx.eps)
        count = x.numel() // x.shape[1]
        k = dy.shape[0]
        mean_dy = dy.sum((1, 3, 4), keepdim=True) / count
        mean_dy_xhat = (dy * xhat).sum((1, 3, 4), keepdim=True) / count
        dy_at = dy.flatten(-2).gather(-1, _argmax_positions(indices, k)).view(g.shape)
        dmasked = a * torch.addcmul(dy_at - mean_dy, xhat_at, mean_dy_xhat, value=-1)
        dg = dmasked * (pooled > 0).to(g.dtype)
        # dL/da per channel: sum over cotangents and positions of dy (S - u - xhat v)
        da = ((dy_at * masked).sum((1, 3, 4), keepdim=True)
              - count * (u * mean_dy + v * mean_dy_xhat)).sum(0)
        # dL/dxhat: through -a xhat v directly, and through v = mean(S xhat)
        dxhat = -(a * (dy * v).sum(0))
        dxhat = dxhat - _max_pool_input_grad(dxhat, indices, (a * (masked * mean_dy_xhat).sum(0))[None])[0]
        dx = inv_std * (dxhat - dxhat.mean((0, 2, 3), keepdim=True)
                        - xhat * (dxhat * xhat).mean((0, 2, 3), keepdim=True))
        d_inv_std = da if weight is None else da * weight.view(-1, 1, 1)
        dx = dx - d_inv_std * inv_std * inv_std * xhat / count        # d(1/sigma)/dx
        dweight = None if weight is None else (da * inv_std).flatten()
        return dx, dg, None, None, dweight, None


def _generic_input_grad(module, x, g):
    """d/dx of a parameter-free per-example module: its VJP on K stacked copies of x."""
    k, n = g.shape[:2]
    stacked = x.unsqueeze(0).expand(k, *x.shape).reshape(k * n, *x.shape[1:])
    _, vjp_fn = torch.func.vjp(module, stacked)
    return vjp_fn(g.flatten(0, 1))[0].unflatten(0, (k, n))


def _input_grad(path, module, params, padding, x, g):
    if isinstance(module, nn.Linear):
        return g @ _param(params, path, "weight")
    if isinstance(module, nn.Conv2d):
        return _conv_input_grad(module, _param(params, path, "weight"), padding, x, g)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _batch_norm_input_grad(module, _param(params, path, "weight"), x, g)
    if isinstance(x, tuple):                    # MaxPool2d: (input, indices)
        return _max_pool_input_grad(*x, g)
    if isinstance(module, nn.ReLU):
        return g * (x > 0).to(g.dtype)          # torch's ReLU passes the gradient where x > 0
    if isinstance(module, (nn.Flatten, nn.Unflatten, nn.Identity, nn.modules.dropout._DropoutNd)):
        return g.reshape(g.shape[0], *x.shape)  # reshapes; Dropout is off (functional_mode)
    return _generic_input_grad(module, x, g)


def output_grads(leaves, params, inputs, cotangents, paddings):
    """Per K-FAC leaf, in order, the gradient [K, N, ...] of <cotangents[k], output> with
    respect to its output, for all K cotangents [K, N, ...] at once (differentiable).
    `paddings` maps each Conv2d path to its numeric zero padding."""
    kfac_at = [i for i, (_, m) in enumerate(leaves) if isinstance(m, KFAC_TYPES)]
    grads, g, i = [], cotangents, len(leaves) - 1
    while i >= kfac_at[0]:
        path, module = leaves[i]
        if i in kfac_at:
            grads.append(g)
            if i == kfac_at[0]:
                break                            # nothing below the first K-FAC layer is needed
        if _is_block(leaves, inputs, i):         # BatchNorm2d -> ReLU -> max-pool in one step
            bn_path, bn = leaves[i - 2]
            g = BlockInputGrad.apply(inputs[i - 2], g, inputs[i][1], _unpaired(inputs[i + 1]),
                                     _param(params, bn_path, "weight"), bn.eps)[0]
            i -= 3
            continue
        g = _input_grad(path, module, params, paddings.get(path), inputs[i], g)
        i -= 1
    return grads[::-1]


def _unpaired(x):
    """A leaf's recorded input (a max-pool's comes paired with its argmax indices)."""
    return x[0] if isinstance(x, tuple) else x


def _is_block(leaves, inputs, i):
    """Leaves i-2..i are BatchNorm2d, ReLU and a max-pool (its argmax indices recorded), and
    the pool's output is recorded as the next leaf's input. Not under torch.compile: dynamo
    cannot vmap an autograd.Function (generate_vmap_rule or not), so a compiled capture takes
    the three steps one by one (same values and gradients)."""
    return (i >= 2 and i + 1 < len(leaves) and isinstance(inputs[i], tuple)
            and type(leaves[i - 1][1]) is nn.ReLU and isinstance(leaves[i - 2][1], nn.BatchNorm2d)
            and not torch.compiler.is_compiling())
