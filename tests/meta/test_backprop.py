"""backprop.py: the written-out reverse pass for K cotangents at once against the VJP path
(one autograd VJP per cotangent through zero probes), on networks covering every reverse step
it writes out (Linear, Conv2d by flipped-kernel convolution and by conv_transpose2d, BatchNorm
1d/2d, ReLU, MaxPool2d with overlapping windows, reshapes, Dropout) and the generic per-module
VJP (Tanh, ELU, Sigmoid, AvgPool2d); and which networks take it."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llama_fast as lf
from llama_fast.meta import backprop

DT = torch.float64


def seeded(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))


def conv_net(rng):
    """Strided conv (conv_transpose2d step), padding beyond the kernel's reach (conv_transpose2d
    again), dilation with padding='same' and a 3x3/stride-1 max-pool (overlapping windows), Tanh/ELU by the generic
    VJP, BatchNorm2d without affine parameters, average pooling and Dropout."""
    seeded(rng)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.Tanh(),
        nn.MaxPool2d(3, stride=1, padding=1),
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=3), nn.BatchNorm2d(4, affine=False), nn.ELU()),
        nn.Conv2d(4, 4, 3, padding="same", dilation=2, bias=False), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * 7 * 7, 3)).to(DT)


def bn_mlp(rng):
    """Linear layers with BatchNorm1d (affine) between them and a Sigmoid."""
    seeded(rng)
    return nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Sigmoid(),
                         nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3)).to(DT)


def block_net(rng):
    """BatchNorm2d -> ReLU -> max-pool blocks (one reverse step): affine-free BatchNorm into
    overlapping padded 3x3 windows, then an affine one into a 2x2 pool feeding a pool."""
    seeded(rng)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, affine=False), nn.ReLU(), nn.MaxPool2d(3, stride=1, padding=1),
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).to(DT)


def conv4(rng):
    seeded(rng)
    return lf.models.conv4(in_channels=1, ways=3, hidden=8, image_size=16).to(DT)


def images(rng, T, n, m, side, classes=3):
    x = lambda k: torch.randn(T, k, 1, side, side, generator=rng, dtype=DT)
    y = lambda k: torch.randint(0, classes, (T, k), generator=rng)
    return lf.TaskBatch(x(n), y(n), x(m), y(m))


def vectors(rng, T, n, m, dims, outs, loss):
    x = lambda k: torch.randn(T, k, dims, generator=rng, dtype=DT)
    if loss == "mse":
        y = lambda k: torch.randn(T, k, outs, generator=rng, dtype=DT)
    else:
        y = lambda k: torch.randint(0, outs, (T, k), generator=rng)
    return lf.TaskBatch(x(n), y(n), x(m), y(m))


CASES = {
    "conv4": lambda rng: (conv4(rng), images(rng, 2, 6, 4, 16), "cross_entropy"),
    "conv_net": lambda rng: (conv_net(rng), images(rng, 2, 5, 3, 19), "cross_entropy"),
    "block_net": lambda rng: (block_net(rng), images(rng, 2, 5, 3, 11), "cross_entropy"),
    "bn_mlp": lambda rng: (bn_mlp(rng), vectors(rng, 3, 7, 4, 2, 3, "cross_entropy"), "cross_entropy"),
    # per-example (the query rides in the capture pass, its max-pool indices sliced off)
    "pool_net": lambda rng: (seeded(rng) or nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).to(DT),
        images(rng, 2, 5, 3, 10, classes=4), "cross_entropy"),
    # per-example; MSE with 3 outputs: K = 3
    "mlp_mse": lambda rng: (nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT),
                            vectors(rng, 3, 4, 5, 2, 3, "mse"), "mse"),
}


def objective_and_grads(model, batch, **kwargs):
    model.zero_grad()
    meta_loss, result = lf.meta.step.meta_objective(model, batch, **kwargs)
    meta_loss.backward()
    return meta_loss.detach(), result.logdet, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_stacked_reverse_pass_matches_vjp_path(case, fisher, rng, monkeypatch):
    """Same meta-loss, log-dets and meta-gradients (through the K-FAC factors of every layer)
    as the per-cotangent VJP path, float64, two inner steps."""
    model, batch, loss = CASES[case](rng)
    spec = lf.meta.step.inspect_model(model)
    assert spec.leaves is not None and spec.per_example == (case in ("pool_net", "mlp_mse"))
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    kw = dict(algorithm="llama", loss=loss, inner_lr=0.1, inner_steps=2, eta=0.3, damping=0.5,
              fisher=fisher)
    stacked = objective_and_grads(model, batch, generator=torch.Generator().manual_seed(seed), **kw)
    real_inspect = lf.meta.step.inspect_model
    monkeypatch.setattr(lf.meta.step, "inspect_model", lambda m: dataclasses.replace(real_inspect(m), leaves=None))
    vjp = objective_and_grads(model, batch, generator=torch.Generator().manual_seed(seed), **kw)
    torch.testing.assert_close(stacked[0], vjp[0], rtol=1e-11, atol=0)
    torch.testing.assert_close(stacked[1], vjp[1], rtol=1e-11, atol=0)
    # absolute floor: a conv bias in front of BatchNorm has an exactly-zero true gradient
    scale = max(g.abs().max() for g in vjp[2])
    for got, expected in zip(stacked[2], vjp[2]):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * scale)


def test_output_grads_are_the_vjps_of_each_layer_output(rng):
    """Direct check of backprop.output_grads on conv_net: per K-FAC layer, the gradient of
    <V_k, f(x)> with respect to that layer's output, by autograd on probes."""
    model = conv_net(rng)
    spec = lf.meta.step.inspect_model(model)
    params = dict(model.named_parameters())
    x = torch.randn(4, 1, 19, 19, generator=rng, dtype=DT)
    with lf.meta.functional.functional_mode(model):
        out, inputs = backprop.forward(spec.leaves, params, x)
        torch.testing.assert_close(out, model(x), rtol=1e-13, atol=0)
        V = torch.randn(5, *out.shape, generator=rng, dtype=DT)
        paddings = {"0": (1, 1), "3.0": (3, 3), "4": (2, 2)}
        got = backprop.output_grads(spec.leaves, params, inputs, V, paddings)
        outputs = {}
        hooks = [l.module.register_forward_hook(lambda m, a, o, name=l.name: outputs.__setitem__(name, o))
                 for l in spec.layers]
        y = model(x)
        for h in hooks:
            h.remove()
    for k in range(V.shape[0]):
        expected = torch.autograd.grad(y, [outputs[l.name] for l in spec.layers], V[k], retain_graph=True)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g[k], e, rtol=1e-11, atol=1e-13)


def block_vjps(x, weight, g, pool, eps):
    """torch's own reverse step of BatchNorm (batch statistics) -> ReLU -> max-pool: one VJP per
    cotangent, kept differentiable (double backward) in x, weight and g."""
    y = pool(F.relu(F.batch_norm(x, None, None, weight, None, True, 0.0, eps)))
    return torch.stack([torch.autograd.grad(y, x, gk, create_graph=True)[0] for gk in g])


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,pool", [((5, 3, 4, 4), (2, 2, 0)), ((3, 2, 6, 5), (3, 1, 1)),
                                        ((2, 3, 7, 7), (3, 2, 1))])
def test_block_input_grad_and_its_derivatives_are_torchs(shape, pool, affine, rng, one_thread):
    """BlockInputGrad against autograd through F.batch_norm, relu and max_pool2d on fresh
    float64 inputs (non-overlapping, overlapping and padded windows): the reverse step itself,
    its derivatives in x, g and gamma (the meta-gradient's path), gradcheck, gradgradcheck, and
    vmap of its gradient over a leading dim."""
    eps, (kernel, stride, padding) = 1e-5, pool
    make = lambda *s: torch.randn(*s, generator=rng, dtype=DT)
    x = make(*shape).requires_grad_()
    weight = make(shape[1]).requires_grad_() if affine else None

    def pool_fn(z, **kw):
        return F.max_pool2d(z, kernel, stride, padding, **kw)
    pooled, indices = pool_fn(F.relu(F.batch_norm(x, None, None, weight, None, True, 0.0, eps)),
                              return_indices=True)
    g = make(3, *pooled.shape).requires_grad_()
    expected = block_vjps(x, weight, g, pool_fn, eps)

    def fn(x, g, *w):
        pooled = pool_fn(F.relu(F.batch_norm(x, None, None, w[0] if w else None, None, True, 0.0, eps)))
        return backprop.BlockInputGrad.apply(x, g, indices, pooled, w[0] if w else None, eps)[0]
    inputs = [x, g] + ([weight] if affine else [])
    got = fn(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    dy = make(*got.shape)
    for a, b in zip(torch.autograd.grad(got, inputs, dy), torch.autograd.grad(expected, inputs, dy)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    xs, gs = x.detach() + 0.1 * make(2, *shape), make(2, *g.shape)
    grad_fn = torch.func.grad(lambda x, g: (fn(x, g, *inputs[2:]) ** 2).sum(), (0, 1))
    vmapped = torch.func.vmap(grad_fn)(xs, gs)
    for i in range(2):
        for got_i, expected_i in zip((v[i] for v in vmapped), grad_fn(xs[i], gs[i])):
            torch.testing.assert_close(got_i, expected_i, rtol=1e-12, atol=1e-12)


def test_which_networks_take_the_stacked_pass():
    """Nested nn.Sequential of torch.nn leaves with known reverse steps: yes; anything whose
    forward is not the plain composition (a Sequential subclass, a custom module), an in-place
    activation, a shared K-FAC layer or an unsupported leaf: no (the VJP path)."""
    class MySequential(nn.Sequential):
        pass

    class MyReLU(nn.ReLU):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x)

    leaves = lambda m: lf.meta.step.inspect_model(m).leaves
    assert [p for p, _ in leaves(nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1))))] == \
        ["0", "1.0", "1.1"]
    assert leaves(lf.models.conv4(hidden=4, image_size=16)) is not None
    assert leaves(MySequential(nn.Linear(2, 3), nn.Linear(3, 1))) is None
    assert leaves(nn.Sequential(nn.Linear(2, 3), MyReLU(), nn.Linear(3, 1))) is None
    assert leaves(nn.Sequential(nn.Linear(2, 3), nn.ReLU(inplace=True), nn.Linear(3, 1))) is None
    assert leaves(nn.Sequential(nn.Linear(2, 3), nn.Softmax(dim=-1), nn.Linear(3, 1))) is None
    assert leaves(Net()) is None
    shared = nn.Linear(3, 3)
    assert leaves(nn.Sequential(nn.Linear(2, 3), shared, nn.ReLU(), shared)) is None
