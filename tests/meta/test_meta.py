"""meta_step: MAML meta-gradients against a plain-autograd loop over tasks, LLAMA
meta-gradients against finite differences, log-dets against kron_laplace on every adapted
task, TaskBatch and argument errors."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import llama_fast as lf
from llama_fast.ops import reference
from llama_fast.meta.step import meta_objective

DT = torch.float64


def sinusoid_batch(T, N, M, rng, device="cpu"):
    x = lambda n: torch.rand(T, n, 1, generator=rng, dtype=DT) * 10 - 5
    sx, qx = x(N), x(M)
    amp = torch.rand(T, 1, 1, generator=rng, dtype=DT) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, generator=rng, dtype=DT) * 3.14
    return lf.TaskBatch(sx, amp * torch.sin(sx + phase), qx, amp * torch.sin(qx + phase)).to(device)


def image_batch(T, ways, shots, queries, size, rng, device="cpu"):
    def part(k):
        x = torch.randn(T, ways * k, 1, size, size, generator=rng, dtype=DT)
        y = torch.arange(ways).repeat_interleave(k).expand(T, -1).contiguous()
        return x, y
    return lf.TaskBatch(*part(shots), *part(queries)).to(device)


def small_mlp(rng, hidden=(8, 8), act=nn.ReLU, bias=True, out=1):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    if act is nn.ReLU and bias and out == 1:
        return lf.models.mlp(hidden=hidden).to(DT)
    widths = [1, *hidden, out]
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(DT)


def small_conv4(rng, ways=3):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    return lf.models.conv4(in_channels=1, ways=ways, hidden=8, image_size=16).to(DT)


def meta_grads(model, batch, **kwargs):
    """The meta-gradient that meta_step back-propagates (an SGD step of size 0 keeps it)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    result = lf.meta_step(model, batch, opt, **kwargs)
    return [p.grad.clone() for p in model.parameters()], result


def loop_grads(model, batch, **kwargs):
    model.zero_grad()
    reference.maml_loop(model, batch, **kwargs).backward()
    return [p.grad.clone() for p in model.parameters()]


def assert_grads_close(got, expected, rtol=1e-5):
    """rtol relative, with an absolute floor of rtol times the largest gradient entry: a conv
    bias in front of BatchNorm has an exactly-zero true gradient, computed as round-off."""
    scale = max(e.abs().max() for e in expected).clamp_min(1e-12)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=rtol, atol=rtol * scale)


# --- MAML and FOMAML against the per-task autograd loop --------------------------------------

@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_maml_gradients_match_loop_mlp(algorithm, steps, rng):
    model = small_mlp(rng)
    batch = sinusoid_batch(4, 5, 7, rng)
    got, result = meta_grads(model, batch, algorithm=algorithm, loss="mse", inner_lr=0.05, inner_steps=steps)
    expected = loop_grads(model, batch, loss="mse", inner_lr=0.05, inner_steps=steps,
                          first_order=algorithm == "fomaml")
    assert result.logdet is None and result.query_accuracy is None
    assert_grads_close(got, expected)


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_maml_gradients_match_loop_conv4(algorithm, steps, rng):
    model = small_conv4(rng)
    batch = image_batch(3, 3, 2, 3, 16, rng)
    got, result = meta_grads(model, batch, algorithm=algorithm, loss="cross_entropy", inner_lr=0.2,
                             inner_steps=steps)
    expected = loop_grads(model, batch, loss="cross_entropy", inner_lr=0.2, inner_steps=steps,
                          first_order=algorithm == "fomaml")
    assert_grads_close(got, expected)
    # BatchNorm parameters are meta-learned (they get a gradient) but not adapted.
    assert model[1].weight.grad.abs().sum() > 0


def test_first_order_flag_equals_fomaml(rng):
    model = small_mlp(rng)
    batch = sinusoid_batch(3, 5, 5, rng)
    fo, _ = meta_grads(model, batch, algorithm="maml", first_order=True, loss="mse", inner_lr=0.1)
    fomaml, _ = meta_grads(model, batch, algorithm="fomaml", loss="mse", inner_lr=0.1)
    so, _ = meta_grads(model, batch, algorithm="maml", loss="mse", inner_lr=0.1)
    assert_grads_close(fo, fomaml, rtol=1e-12)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(fo, so)), "first order must differ from second"


def test_query_loss_and_accuracy_match_loop(rng):
    model = small_conv4(rng)
    batch = image_batch(2, 3, 1, 4, 16, rng)
    _, result = meta_grads(model, batch, algorithm="maml", loss="cross_entropy", inner_lr=0.3, inner_steps=2)
    from torch.func import functional_call
    params = dict(model.named_parameters())
    bn = {f"{i}.{p}" for i in (1, 5, 9, 13) for p in ("weight", "bias")}
    for t in range(2):
        fast = {k: v for k, v in params.items() if k not in bn}
        for _ in range(2):
            out = functional_call(model, {**params, **fast}, (batch.support_x[t],))
            grads = torch.autograd.grad(nn.functional.cross_entropy(out, batch.support_y[t]), list(fast.values()))
            fast = {k: v - 0.3 * g for (k, v), g in zip(fast.items(), grads)}
        out = functional_call(model, {**params, **fast}, (batch.query_x[t],))
        torch.testing.assert_close(result.query_loss[t], nn.functional.cross_entropy(out, batch.query_y[t]).detach())
        accuracy = (out.argmax(-1) == batch.query_y[t]).to(DT).mean()
        torch.testing.assert_close(result.query_accuracy[t], accuracy)


def test_maml_does_no_curvature_work(rng, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("MAML must not touch the curvature")
    monkeypatch.setattr(lf.meta.step, "curvature_factors", forbidden)
    monkeypatch.setattr(lf.meta.step, "curvature_logdet", forbidden)
    monkeypatch.setattr(lf.meta.functional.FunctionalNet, "capture_rows", forbidden)
    model = small_mlp(rng)
    result = lf.meta_step(model, sinusoid_batch(2, 5, 5, rng), torch.optim.SGD(model.parameters(), lr=0.1),
                          algorithm="maml", loss="mse", inner_lr=0.1, timings=True)
    assert result.logdet is None and "curvature" not in result.timings


def test_step_updates_parameters(rng):
    model = small_mlp(rng)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    result = lf.meta_step(model, sinusoid_batch(2, 5, 5, rng), opt, algorithm="llama", loss="mse",
                          inner_lr=0.1, eta=0.01, damping=1.0, timings=True)
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.detach(), b - 0.01 * p.grad)
    assert set(result.timings) == {"forward", "curvature", "backward", "step", "total"}
    assert torch.isfinite(result.meta_loss)


# --- LLAMA meta-gradients: finite differences ------------------------------------------------

def flat_objective(model, batch, **kwargs):
    """The meta-loss as a function of one flat float64 vector of all parameters."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def f(flat):
        parts = torch.split(flat, sizes)
        params = {k: v.reshape(s) for k, v, s in zip(names, parts, shapes)}
        return meta_objective(model, batch, params=params, **kwargs)[0]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, theta


def directional_check(f, theta, rng, directions=3, eps=1e-6, rtol=1e-5, tries=12):
    """grad . v against central differences along random unit directions v.

    With ReLU and max-pool the LLAMA objective is piecewise smooth, and not even continuous:
    G is built from back-propagated gradients, whose ReLU masks and max-pool routes switch.
    A direction whose segment [-eps, eps] crosses such a switch is no test of the gradient
    (the difference quotient sees the jump), and shows it as one-sided quotients that
    disagree; such directions are replaced by fresh ones. `directions` smooth ones must pass.
    """
    x = theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f(x), x)
    checked = 0
    for _ in range(tries):
        v = torch.randn(theta.shape, generator=rng, dtype=DT)
        v = v / v.norm()
        with torch.no_grad():
            lo, mid, hi = f(theta - eps * v), f(theta), f(theta + eps * v)
        tol = rtol * (abs(grad @ v) + grad.norm())
        if abs((hi - mid) - (mid - lo)) / eps > tol:
            continue   # a switch inside the segment
        torch.testing.assert_close(grad @ v, (hi - lo) / (2 * eps), rtol=rtol, atol=rtol * grad.norm())
        checked += 1
        if checked == directions:
            return
    pytest.fail(f"only {checked} of {tries} random directions were smooth enough to check "
                f"(seed {rng.initial_seed()})")


@pytest.mark.parametrize("curvature_on", ["support", "query"])
def test_llama_gradcheck_mlp_mse(curvature_on, rng):
    """Full gradcheck (every coordinate) on a 1-4-4-1 tanh network, second-order, 2 steps."""
    model = small_mlp(rng, hidden=(4, 4), act=nn.Tanh)
    batch = sinusoid_batch(2, 4, 5, rng)
    f, theta = flat_objective(model, batch, algorithm="llama", loss="mse", inner_lr=0.05, inner_steps=2,
                              eta=0.3, damping=0.7, scale=1.3, curvature_on=curvature_on, prior_term=True)
    assert torch.autograd.gradcheck(f, (theta.clone().requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_llama_directional_fd_conv_ce(fisher, rng):
    """Conv-4 (BatchNorm, max-pool, CE) LLAMA meta-gradient against central differences."""
    model = small_conv4(rng)
    batch = image_batch(2, 3, 1, 2, 16, rng)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    kwargs = dict(algorithm="llama", loss="cross_entropy", inner_lr=0.1, inner_steps=1, eta=0.05,
                  damping=torch.tensor([0.5, 2.0], dtype=DT), fisher=fisher)
    f, theta = flat_objective(model, batch, **kwargs)

    def f_seeded(flat):
        # mc: the same sampled labels at every evaluation (a fresh generator, fixed seed).
        g, _ = flat_objective(model, batch, generator=torch.Generator().manual_seed(seed), **kwargs)
        return g(flat)
    directional_check(f_seeded, theta, rng)


def test_llama_first_order_is_the_objective_gradient_at_adapted_params(rng):
    """First-order LLAMA's meta-gradient is the mean over tasks of grad_phi J_i at the adapted
    phi_i: checked against a zero-step objective evaluated per task at adapt()'s phi_i (whose
    own gradient is covered by the finite-difference tests)."""
    model = small_mlp(rng, hidden=(6,), act=nn.Tanh, out=3)
    x = torch.randn(3, 6, 1, generator=rng, dtype=DT)
    y = torch.randint(0, 3, (3, 6), generator=rng)
    batch = lf.TaskBatch(x, y, torch.randn(3, 4, 1, generator=rng, dtype=DT), torch.randint(0, 3, (3, 4), generator=rng))
    kw = dict(algorithm="llama", loss="cross_entropy", eta=0.2, damping=0.3)
    got, _ = meta_grads(model, batch, inner_lr=0.3, inner_steps=2, first_order=True, **kw)
    post = lf.adapt(model, batch.support_x, batch.support_y, loss="cross_entropy", inner_lr=0.3,
                    inner_steps=2, damping=0.3)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for t in range(3):
        phi = {k: v[t].clone().requires_grad_() for k, v in post.params.items()}
        task = lf.TaskBatch(*(z[t:t + 1] for z in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
        # Zero inner steps at phi_t: the curvature is taken on phi_t's support set, as in meta_step.
        loss, _ = meta_objective(model, task, params=phi, inner_lr=0.0, inner_steps=0, **kw)
        grads = torch.autograd.grad(loss, list(phi.values()))
        by_name = dict(zip(phi, grads))
        for e, (name, _) in zip(expected, model.named_parameters()):
            e += by_name[name] / 3
    assert_grads_close(got, expected, rtol=1e-9)


# --- log-dets: meta_step, adapt and kron_laplace agree -----------------------------------------

@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_logdets_equal_kron_laplace_on_adapted_tasks(fisher, backend, rng):
    model = small_conv4(rng)
    batch = image_batch(3, 3, 1, 2, 16, rng)
    settings = dict(loss="cross_entropy", inner_lr=0.2, inner_steps=2, damping=0.4, scale=2.0, fisher=fisher)
    _, result = meta_grads(model, batch, algorithm="llama", eta=0.1, backend=backend, **settings)
    post = lf.adapt(model, batch.support_x, batch.support_y, backend=backend,
                    **{k: v for k, v in settings.items()})
    torch.testing.assert_close(post.logdet(), result.logdet, rtol=1e-9, atol=1e-9)
    for t in range(3):
        task_model = copy.deepcopy(model)
        with torch.no_grad():
            for name, value in post.params.items():
                task_model.get_parameter(name).copy_(value[t])
        single = lf.kron_laplace(task_model, batch.support_x[t], batch.support_y[t], loss="cross_entropy",
                                 damping=0.4, scale=2.0, fisher=fisher)
        torch.testing.assert_close(single.logdet()[0], result.logdet[t], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm", ["parameters", "none"])
def test_meta_loss_is_query_loss_plus_eta_log_det_over_p(norm, rng):
    """J = mean query loss + eta log det H / P (P = the K-FAC parameters; "none": P = 1)."""
    model = small_conv4(rng)
    batch = image_batch(3, 3, 1, 2, 16, rng)
    meta_loss, result = meta_objective(model, batch, algorithm="llama", loss="cross_entropy", inner_lr=0.2,
                                       eta=0.3, damping=0.4, logdet_norm=norm)
    kfac = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    P = sum(p.numel() for m in kfac for p in m.parameters()) if norm == "parameters" else 1
    assert P > 1000 or norm == "none"
    expected = (result.query_loss + 0.3 * result.logdet / P).mean()
    torch.testing.assert_close(meta_loss.detach(), expected, rtol=1e-12, atol=1e-12)


def test_logdet_norm_is_checked(rng):
    model = small_conv4(rng)
    batch = image_batch(2, 3, 1, 2, 16, rng)
    with pytest.raises(ValueError, match="logdet_norm"):
        meta_objective(model, batch, inner_lr=0.2, eta=0.3, damping=0.4, logdet_norm="examples")


@pytest.mark.parametrize("network", ["conv4", "mlp"])
def test_kernels_and_reference_backends_agree(network, rng):
    """Log-dets and meta-gradients of both backends; the MLP's support (4 points) is narrower
    than its hidden layers, so the kernels take the low-rank A path and the dual of G."""
    if network == "conv4":
        model, batch, loss = small_conv4(rng), image_batch(2, 3, 1, 2, 16, rng), "cross_entropy"
    else:
        model, batch, loss = small_mlp(rng), sinusoid_batch(2, 4, 9, rng), "mse"
    damping = torch.tensor([0.4, 0.9], dtype=torch.float64)
    kw = dict(algorithm="llama", loss=loss, inner_lr=0.2, eta=0.1, damping=damping)
    g_ker, r_ker = meta_grads(model, batch, backend="kernels", **kw)
    g_ref, r_ref = meta_grads(model, batch, backend="reference", **kw)
    torch.testing.assert_close(r_ker.logdet, r_ref.logdet, rtol=1e-9, atol=1e-9)
    assert_grads_close(g_ker, g_ref, rtol=1e-7)


def test_curvature_on_query_uses_query_set(rng):
    model = small_mlp(rng)
    batch = sinusoid_batch(2, 4, 9, rng)
    _, on_support = meta_grads(model, batch, algorithm="llama", loss="mse", inner_lr=0.1, eta=0.1, damping=0.5)
    _, on_query = meta_grads(model, batch, algorithm="llama", loss="mse", inner_lr=0.1, eta=0.1, damping=0.5,
                             curvature_on="query")
    post = lf.adapt(model, batch.support_x, batch.support_y, loss="mse", inner_lr=0.1, damping=0.5)
    torch.testing.assert_close(on_support.logdet, post.logdet())
    for t in range(2):
        task_model = copy.deepcopy(model)
        with torch.no_grad():
            for name, value in post.params.items():
                task_model.get_parameter(name).copy_(value[t])
        q = lf.kron_laplace(task_model, batch.query_x[t], batch.query_y[t], loss="mse", damping=0.5)
        torch.testing.assert_close(on_query.logdet[t], q.logdet()[0])


# --- TaskBatch and argument errors -------------------------------------------------------------

def test_taskbatch_errors(rng):
    sx, sy = torch.randn(3, 5, 1), torch.randn(3, 5, 1)
    with pytest.raises(ValueError, match="query_x has T=2 tasks but support_x has T=3"):
        lf.TaskBatch(sx, sy, torch.randn(2, 5, 1), torch.randn(2, 5, 1))
    with pytest.raises(ValueError, match="support_y has 4 examples per task but support_x has 5"):
        lf.TaskBatch(sx, torch.randn(3, 4, 1), sx, sy)
    with pytest.raises(ValueError, match="query_x examples have shape"):
        lf.TaskBatch(sx, sy, torch.randn(3, 5, 2), torch.randn(3, 5, 1))
    with pytest.raises(ValueError, match="support_x must be a floating-point"):
        lf.TaskBatch(sx.long(), sy, sx, sy)
    with pytest.raises(ValueError, match="support_y has dtype torch.float64 but support_x has torch.float32"):
        lf.TaskBatch(sx, sy.double(), sx, sy)
    with pytest.raises(TypeError, match="query_y must be a torch.Tensor"):
        lf.TaskBatch(sx, sy, sx, [1, 2])
    with pytest.raises(ValueError, match="leading task dim"):
        lf.TaskBatch(torch.randn(5), sy, sx, sy)
    batch = lf.TaskBatch(sx, torch.randint(0, 3, (3, 5), dtype=torch.int32), sx, torch.randint(0, 3, (3, 5), dtype=torch.int32))
    assert batch.support_y.dtype == torch.int64 and batch.tasks == 3


@pytest.mark.parametrize("algorithm", ["maml", "llama"])
def test_empty_task_sets_are_errors_naming_the_set(algorithm, rng):
    """T=0 (IndexError), K=0 (ZeroDivisionError) and Q=0 (a NaN meta-loss that still stepped)
    are ValueErrors naming the empty set, from TaskBatch, before any step; adapt likewise."""
    net = lf.models.mlp().to(DT)
    full = sinusoid_batch(3, 4, 5, rng)
    cases = {"support_x holds no tasks": [t[:0] for t in dataclasses.astuple(full)],
             "support_x has no support": [full.support_x[:, :0], full.support_y[:, :0], full.query_x, full.query_y],
             "query_x has no query": [full.support_x, full.support_y, full.query_x[:, :0], full.query_y[:, :0]]}
    before = [p.detach().clone() for p in net.parameters()]
    extra = dict(eta=1e-3, damping=1.0) if algorithm == "llama" else {}
    for match, tensors in cases.items():
        with pytest.raises(ValueError, match=f"TaskBatch.{match}"):
            batch = lf.TaskBatch(*tensors)
            lf.meta_step(net, batch, torch.optim.SGD(net.parameters(), lr=0.1), algorithm=algorithm,
                         loss="mse", inner_lr=0.01, **extra)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    for match, (sx, sy) in (("no tasks", (full.support_x[:0], full.support_y[:0])),
                            ("no support", (full.support_x[:, :0], full.support_y[:, :0]))):
        with pytest.raises(ValueError, match=match):
            lf.adapt(net, sx, sy, loss="mse", inner_lr=0.01, damping=1.0)


@pytest.mark.parametrize("steps", [1.7, 2.0, True, "2", None])
def test_inner_steps_must_be_an_integer(steps, rng):
    """inner_steps=1.7 ran 1 step; a float, a bool or a string is refused, an integer scalar
    of numpy or torch is fine."""
    net = lf.models.mlp().to(DT)
    batch = sinusoid_batch(2, 3, 3, rng)
    with pytest.raises(ValueError, match=f"inner_steps must be an integer, got {steps!r}"):
        lf.meta_step(net, batch, torch.optim.SGD(net.parameters(), lr=0.1), algorithm="maml", loss="mse",
                     inner_lr=0.01, inner_steps=steps)


def test_integer_scalars_are_step_counts(rng):
    import numpy as np

    net = lf.models.mlp().to(DT)
    batch = sinusoid_batch(2, 3, 3, rng)
    losses = [lf.meta_step(net, batch, torch.optim.SGD(net.parameters(), lr=0.0), algorithm="maml", loss="mse",
                           inner_lr=0.01, inner_steps=steps).meta_loss for steps in (2, np.int64(2), torch.tensor(2))]
    assert losses[0] == losses[1] == losses[2]
    with pytest.raises(ValueError, match="inner_steps must be >= 0, got -1"):
        lf.meta_step(net, batch, torch.optim.SGD(net.parameters(), lr=0.0), algorithm="maml", loss="mse",
                     inner_lr=0.01, inner_steps=-1)


def _step(model, batch, **kwargs):
    opts = dict(algorithm="llama", loss="cross_entropy", inner_lr=0.1, eta=0.1, damping=0.5)
    opts.update(kwargs)
    return lf.meta_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.1), **opts)


def test_argument_errors(rng):
    conv = small_conv4(rng)
    batch = image_batch(2, 3, 1, 2, 16, rng)
    with pytest.raises(ValueError, match=r"support_y holds labels in \[1, 3\] but the network has 3 classes"):
        bad = lf.TaskBatch(batch.support_x, batch.support_y + 1, batch.query_x, batch.query_y)
        _step(conv, bad)
    with pytest.raises(ValueError, match=r"query_y holds labels in \[-1"):
        _step(conv, lf.TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y - 1))
    with pytest.raises(ValueError, match="loss='mse' needs float targets"):
        _step(conv, batch, loss="mse")
    mlp = small_mlp(rng)
    sin = sinusoid_batch(2, 4, 4, rng)
    with pytest.raises(ValueError, match="loss='cross_entropy' needs network outputs of shape"):
        _step(mlp, sin)
    with pytest.raises(ValueError, match=r"loss='mse': support_y has per-example shape \(2,\)"):
        _step(mlp, lf.TaskBatch(sin.support_x, sin.support_y.repeat(1, 1, 2), sin.query_x,
                                sin.query_y.repeat(1, 1, 2)), loss="mse")
    with pytest.raises(ValueError, match="eta must be finite and >= 0"):
        _step(conv, batch, eta=-0.1)
    with pytest.raises(ValueError, match="eta .* is required"):
        _step(conv, batch, eta=None)
    for bad in (0.0, -1.0, float("nan"), torch.tensor([0.5, 0.0], dtype=DT)):
        with pytest.raises(ValueError, match="damping must be positive"):
            _step(conv, batch, damping=bad)
    with pytest.raises(ValueError, match=r"damping must be a float, a sequence of floats \(per layer\) or a tensor of shape \[T=2\] or \[T=2, L\]"):
        _step(conv, batch, damping=torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="algorithm must be one of"):
        _step(conv, batch, algorithm="reptile")
    with pytest.raises(ValueError, match="fisher must be one of"):
        _step(conv, batch, fisher="hessian")
    with pytest.raises(TypeError, match="batch must be a llama_fast.TaskBatch"):
        _step(conv, (batch.support_x, batch.support_y))
    with pytest.raises(ValueError, match="inner_lr must be finite and >= 0"):
        _step(conv, batch, inner_lr=-1.0)
    with pytest.raises(ValueError, match="damping .* is required"):
        _step(conv, batch, algorithm="maml", prior_term=True, damping=None)


@pytest.mark.parametrize("layer,name", [
    (nn.LayerNorm(4), "LayerNorm"),
    (nn.Embedding(3, 4), "Embedding"),
    (nn.Conv1d(1, 1, 1), "Conv1d"),
])
def test_unsupported_layer_is_named(layer, name, rng):
    model = nn.Sequential(nn.Linear(1, 4), layer, nn.Linear(4, 1)).to(DT)
    with pytest.raises(ValueError, match=rf"unsupported layer '1' \({name}\)"):
        _step(model, sinusoid_batch(2, 3, 3, rng), loss="mse")


def test_grouped_conv_is_rejected(rng):
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="layer '0' \\(Conv2d\\) has groups=2"):
        lf.meta.step.inspect_model(model)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_frozen_kfac_parameters_are_an_error(frozen, rng):
    """A K-FAC layer's parameter with requires_grad=False was adapted and entered the curvature
    silently; meta_step and adapt now name it. Frozen BatchNorm parameters stay fine (they are
    never adapted)."""
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)).to(DT)
    getattr(model[2], frozen).requires_grad_(False)
    batch = sinusoid_batch(2, 3, 3, rng)
    match = rf"layer '2' \(Linear\) has frozen parameters \['{frozen}'\]"
    with pytest.raises(ValueError, match=match):
        _step(model, batch, loss="mse")
    with pytest.raises(ValueError, match=match):
        lf.adapt(model, batch.support_x, batch.support_y, loss="mse", inner_lr=0.01, damping=1.0)
    norm = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    norm[1].weight.requires_grad_(False)
    assert lf.meta.step.inspect_model(norm).slow == ("1.weight", "1.bias")


@pytest.mark.parametrize("algorithm", ["maml", "llama"])
def test_non_finite_steps_are_skipped_and_reported(algorithm, rng):
    """One NaN support input makes the meta-loss and every gradient NaN: meta_step does not
    apply the update (weights and Adam's state unchanged) and says so; a finite batch after it
    steps normally."""
    net = lf.models.mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(3, 6, 1, generator=rng)
    y = torch.randn(3, 6, 1, generator=rng)
    extra = dict(eta=1e-3, damping=1.0) if algorithm == "llama" else {}
    bad = x.clone()
    bad[1, 2, 0] = float("nan")
    before = [p.detach().clone() for p in net.parameters()]
    out = lf.meta_step(net, lf.TaskBatch(bad, y, x, y), opt, algorithm=algorithm, loss="mse",
                       inner_lr=0.01, **extra)
    assert out.step_skipped and out.nonfinite_grads == len(before) and not bool(torch.isfinite(out.meta_loss))
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters())) and not opt.state
    out = lf.meta_step(net, lf.TaskBatch(x, y, x, y), opt, algorithm=algorithm, loss="mse", inner_lr=0.01, **extra)
    assert not out.step_skipped and out.nonfinite_grads == 0
    assert not all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_dropout_is_off_and_batchnorm_state_untouched(rng):
    """Dropout layers are identities inside meta_step (same gradients as without them), and
    the modules' train/eval flags and BatchNorm buffers come back unchanged."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)).to(DT)
    with_dropout = nn.Sequential(base[0], base[1], base[2], nn.Dropout(0.5), base[3])
    with_dropout.eval()
    running = base[1].running_mean.clone()
    batch = sinusoid_batch(2, 6, 6, rng)
    kw = dict(algorithm="llama", loss="mse", inner_lr=0.1, eta=0.1, damping=0.5)
    g1, _ = meta_grads(base, batch, **kw)
    g2, _ = meta_grads(with_dropout, batch, **kw)
    assert_grads_close(g1, g2, rtol=1e-12)
    assert not with_dropout.training and not with_dropout[1].training and with_dropout[1].track_running_stats
    torch.testing.assert_close(base[1].running_mean, running)


def test_meta_step_on_device_matches_cpu(device, rng):
    """The whole LLAMA step on the device (CUDA kernels there) against the CPU run."""
    model = small_conv4(rng)
    batch = image_batch(2, 3, 1, 2, 16, rng)
    kw = dict(algorithm="llama", loss="cross_entropy", inner_lr=0.2, inner_steps=2, eta=0.1, damping=0.4)
    g_cpu, r_cpu = meta_grads(model, batch, **kw)
    on_device = copy.deepcopy(model).to(device)
    g_dev, r_dev = meta_grads(on_device, batch.to(device), **kw)
    assert r_dev.logdet.device.type == device.type
    torch.testing.assert_close(r_dev.logdet.cpu(), r_cpu.logdet, rtol=1e-9, atol=1e-9)
    assert_grads_close([g.cpu() for g in g_dev], g_cpu, rtol=1e-7)


def test_per_example_networks_are_recognised():
    """Only torch.nn's own per-example modules qualify: BatchNorm mixes the batch, and a user
    subclass (even of nn.Linear) may override forward."""
    class MyLinear(nn.Linear):
        pass
    spec = lf.meta.step.inspect_model
    assert spec(lf.models.mlp()).per_example
    assert spec(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Dropout(), nn.Flatten(),
                              nn.LazyLinear(2))).per_example
    assert not spec(lf.models.conv4(hidden=4, image_size=16)).per_example
    assert not spec(nn.Sequential(MyLinear(1, 3), nn.ReLU(), nn.Linear(3, 1))).per_example
    assert not spec(nn.Sequential(nn.Linear(1, 3), nn.Softmax(dim=0), nn.Linear(3, 1))).per_example


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_query_riding_in_the_capture_pass_changes_nothing(fisher, rng, monkeypatch):
    """A per-example network runs its query set in the support's capture pass: the meta-loss,
    log-dets and meta-gradients equal those of separate passes."""
    model = small_mlp(rng, hidden=(6, 5), act=nn.Tanh, out=3)
    x = torch.randn(3, 4, 1, generator=rng, dtype=DT)
    batch = lf.TaskBatch(x, torch.randint(0, 3, (3, 4), generator=rng),
                         torch.randn(3, 7, 1, generator=rng, dtype=DT), torch.randint(0, 3, (3, 7), generator=rng))
    kw = dict(algorithm="llama", loss="cross_entropy", inner_lr=0.2, inner_steps=2, eta=0.3, damping=0.4,
              fisher=fisher)
    assert lf.meta.step.inspect_model(model).per_example
    merged, r_merged = meta_grads(model, batch, **kw)
    real_inspect = lf.meta.step.inspect_model
    monkeypatch.setattr(lf.meta.step, "inspect_model",
                        lambda m: dataclasses.replace(real_inspect(m), per_example=False))
    separate, r_separate = meta_grads(model, batch, **kw)
    torch.testing.assert_close(r_merged.meta_loss, r_separate.meta_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(r_merged.logdet, r_separate.logdet, rtol=1e-12, atol=0)
    assert_grads_close(merged, separate, rtol=1e-10)


@pytest.mark.parametrize("capture", ["stacked", "vjp"])
@pytest.mark.parametrize("fisher", ["exact", "mc"])
@pytest.mark.parametrize("network", ["conv4", "mlp"])
def test_task_chunks_change_nothing(network, fisher, capture, rng, monkeypatch):
    """Tasks vmapped in chunks (one autograd graph over them, the K-FAC factors formed per
    chunk with that chunk's mc noise, the log-det over all chunks' factors with the per-task
    dampings; a chunk of one task a plain call) give the same meta-loss, log-dets and
    meta-gradients as one vmap over all tasks; with the prior term too, and through either
    capture (the written-out reverse pass, or hooks, probes and a VJP per cotangent)."""
    if capture == "vjp":
        real_inspect = lf.meta.step.inspect_model
        monkeypatch.setattr(lf.meta.step, "inspect_model", lambda m: dataclasses.replace(real_inspect(m), leaves=None))
    if network == "conv4":
        model, batch, loss = small_conv4(rng), image_batch(3, 3, 1, 2, 16, rng), "cross_entropy"
    else:
        model, batch, loss = small_mlp(rng), sinusoid_batch(3, 4, 6, rng), "mse"
    kw = dict(algorithm="llama", loss=loss, inner_lr=0.1, inner_steps=2, eta=0.2, fisher=fisher,
              damping=torch.tensor([0.5, 1.0, 2.0], dtype=DT), prior_term=True)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    whole, r_whole = meta_grads(model, batch, task_chunk=None, generator=torch.Generator().manual_seed(seed), **kw)
    for chunk in (1, 2):
        got, r_got = meta_grads(model, batch, task_chunk=chunk, generator=torch.Generator().manual_seed(seed), **kw)
        torch.testing.assert_close(r_got.meta_loss, r_whole.meta_loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(r_got.logdet, r_whole.logdet, rtol=1e-12, atol=0)
        assert_grads_close(got, whole, rtol=1e-10)


def test_auto_task_chunk():
    """"auto": all tasks on a GPU; on the CPU, chunks within 1 MB of the widest capture
    activation (Conv-4 28x28 5-way 1-shot: 5 rows x 64 x 28 x 28 float32 = 0.96 MB per task)."""
    resolve = lf.meta.step.resolve_task_chunk
    conv4 = [(64, 28, 28), (64, 14, 14), (64, 7, 7), (64, 3, 3), (5,)]
    assert resolve("auto", 32, torch.device("cpu"), 5, conv4, 4) == 1
    assert resolve("auto", 32, torch.device("cpu"), 1, conv4, 4) == 5       # 0.19 MB per task
    assert resolve("auto", 4, torch.device("cpu"), 1, conv4, 4) is None      # one chunk
    assert resolve("auto", 32, torch.device("cpu"), 25, conv4, 8) == 1      # 5-shot float64
    assert resolve("auto", 32, torch.device("cuda"), 5, conv4, 4) is None
    assert resolve("auto", 32, torch.device("cpu"), 10, [(40,), (40,), (1,)], 4) is None   # sinusoid
    assert resolve(None, 32, torch.device("cpu"), 5, conv4, 4) is None
    assert resolve(3, 32, torch.device("cpu"), 5, conv4, 4) == 3
    for bad in (0, -2, 1.5, True, "all"):
        with pytest.raises(ValueError, match="task_chunk must be None, 'auto' or an int >= 1"):
            resolve(bad, 32, torch.device("cpu"), 5, conv4, 4)


# --- per-layer damping ----------------------------------------------------------------------

def test_per_layer_damping_objective(rng):
    """delta per K-FAC layer: the log-det is each layer's own (the reference backend's) and the
    prior term sums delta_l ||phi_l - theta_l||^2; equal deltas give the isotropic objective;
    a [T, L] tensor that requires grad receives its gradient (learnable prior precisions)."""
    model = small_mlp(rng, hidden=(6, 5))
    batch = sinusoid_batch(2, 4, 3, rng)
    kwargs = dict(algorithm="llama", loss="mse", inner_lr=0.05, eta=0.3, prior_term=True)
    iso, iso_result = meta_objective(model, batch, damping=0.7, **kwargs)
    same, _ = meta_objective(model, batch, damping=(0.7, 0.7, 0.7), **kwargs)
    torch.testing.assert_close(same, iso, rtol=1e-12, atol=1e-12)
    deltas = (0.05, 2.0, 0.6)
    ours, result = meta_objective(model, batch, damping=deltas, **kwargs)
    ref, ref_result = meta_objective(model, batch, damping=deltas, backend="reference", **kwargs)
    torch.testing.assert_close(result.logdet, ref_result.logdet, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ours, iso)
    delta = torch.tensor([deltas, deltas], dtype=DT, requires_grad=True)
    loss, _ = meta_objective(model, batch, damping=delta, **kwargs)
    torch.testing.assert_close(loss.detach(), ours, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, delta)
    assert grad.shape == (2, 3) and bool(torch.isfinite(grad).all()) and bool((grad != 0).all())
    with pytest.raises(ValueError, match=r"one delta per layer: expected 3 values, got 2"):
        meta_objective(model, batch, damping=(0.1, 0.2), **kwargs)


# --- the evidence's prior terms (learned prior precision) --------------------------------------

def test_evidence_prior_objective_and_gradient(rng):
    """evidence_prior: J = query loss + eta / P (log det H + sum_l delta_l ||phi_l - theta_l||^2
    - P_l log delta_l), written out from the plain objective; its gradient with respect to log
    delta [L] matches central differences (float64)."""
    model = small_mlp(rng, hidden=(6, 5))
    batch = sinusoid_batch(3, 4, 3, rng)
    kwargs = dict(algorithm="llama", loss="mse", inner_lr=0.05, inner_steps=2, eta=0.3)
    deltas = torch.tensor([0.05, 2.0, 0.6], dtype=DT)
    plain, result = meta_objective(model, batch, damping=tuple(deltas.tolist()), **kwargs)
    ours, _ = meta_objective(model, batch, damping=deltas.expand(3, -1), evidence_prior=True, **kwargs)
    theta = dict(model.named_parameters())
    layers = [("0.weight", "0.bias"), ("2.weight", "2.bias"), ("4.weight", "4.bias")]
    counts = torch.tensor([sum(theta[k].numel() for k in keys) for keys in layers], dtype=DT)
    P = counts.sum()
    phis = [lf.adapt(model, batch.support_x[t:t + 1], batch.support_y[t:t + 1], loss="mse", inner_lr=0.05,
                     inner_steps=2, damping=1.0).params for t in range(3)]
    sq = torch.tensor([[sum(((phi[k][0] - theta[k].detach()) ** 2).sum() for k in keys) for keys in layers]
                       for phi in phis], dtype=DT)
    prior = (deltas * sq - counts * deltas.log()).sum(-1)
    torch.testing.assert_close(ours.detach(), plain.detach() + (0.3 * prior / P).mean(), rtol=1e-10, atol=1e-12)

    log_delta = deltas.log().clone().requires_grad_()

    def objective(ld):
        return meta_objective(model, batch, damping=ld.exp().expand(3, -1), evidence_prior=True, **kwargs)[0]

    (grad,) = torch.autograd.grad(objective(log_delta), log_delta)
    eps = 1e-6
    for l in range(3):
        step = torch.zeros(3, dtype=DT)
        step[l] = eps
        with torch.no_grad():
            fd = (objective(log_delta + step) - objective(log_delta - step)) / (2 * eps)
        torch.testing.assert_close(grad[l], fd, rtol=1e-5, atol=1e-9)


def test_evidence_prior_learns_an_interior_delta(rng):
    """Minimising the evidence terms over log delta alone (theta fixed) settles at a finite,
    positive delta per layer: neither 0 nor infinity."""
    model = small_mlp(rng, hidden=(6, 5))
    batch = sinusoid_batch(4, 5, 3, rng)
    log_delta = torch.zeros(3, dtype=DT, requires_grad=True)
    opt = torch.optim.Adam([log_delta], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        loss, _ = meta_objective(model, batch, algorithm="llama", loss="mse", inner_lr=0.05, eta=1.0,
                                 damping=log_delta.exp().expand(4, -1), evidence_prior=True)
        loss.backward()
        opt.step()
    (grad,) = torch.autograd.grad(meta_objective(model, batch, algorithm="llama", loss="mse", inner_lr=0.05,
                                                 eta=1.0, damping=log_delta.exp().expand(4, -1),
                                                 evidence_prior=True)[0], log_delta)
    assert bool(torch.isfinite(log_delta).all()) and log_delta.abs().max() < 15
    assert grad.abs().max() < 1e-3


def test_evidence_prior_errors(rng):
    model = small_mlp(rng)
    batch = sinusoid_batch(2, 4, 3, rng)
    with pytest.raises(ValueError, match="evidence_prior completes LLAMA's log-det term"):
        meta_objective(model, batch, algorithm="maml", loss="mse", inner_lr=0.05, evidence_prior=True)
    with pytest.raises(ValueError, match="leave prior_term False"):
        meta_objective(model, batch, algorithm="llama", loss="mse", inner_lr=0.05, eta=1.0, damping=1.0,
                       evidence_prior=True, prior_term=True)
