"""adapt / kron_laplace / TaskPosterior: K-FAC factors against a per-example autograd oracle
(with biases, which laplace-torch cannot check), point predictions, sampling (once
KronCurvature.sample lands), errors."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import llama_fast as lf
from llama_fast.ops import reference

DT = torch.float64


def seeded(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))


def per_example_factors(model, x, y, loss, fisher):
    """A and G of every Linear layer by brute force: one autograd call per example and
    cotangent, A = mean abar abar^T, G = sum g g^T (docs/ops.md, "Conventions")."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    A = [0.0] * len(layers)
    G = [0.0] * len(layers)
    for n in range(x.shape[0]):
        inputs, outputs = [], []
        def record(module, args, out):
            inputs.append(args[0])
            outputs.append(out)
        hooks = [m.register_forward_hook(record) for m in layers]
        out = model(x[n:n + 1])[0]
        for h in hooks:
            h.remove()
        if loss == "cross_entropy":
            p = torch.softmax(out, -1)
            if fisher == "exact":
                # d/ds of sqrt(p_c) * (-log p_c) with sqrt(p_c) held fixed:
                terms = [p[c].detach().sqrt() * -torch.log_softmax(out, -1)[c] for c in range(out.shape[0])]
            else:
                terms = [-torch.log_softmax(out, -1)[y[n]]]
        else:
            terms = [out[c] for c in range(out.shape[0])] if fisher == "exact" else [0.5 * ((out - y[n]) ** 2).sum()]
        for term in terms:
            gs = torch.autograd.grad(term, outputs, retain_graph=True)
            for l, g in enumerate(gs):
                G[l] = G[l] + g.T @ g
        for l, a in enumerate(inputs):
            abar = torch.cat([a, torch.ones_like(a[:, :1])], -1)
            A[l] = A[l] + abar.T @ abar / x.shape[0]
    return [a.detach().unsqueeze(0) for a in A], [g.detach().unsqueeze(0) for g in G]


@pytest.mark.parametrize("loss,fisher", [("cross_entropy", "exact"), ("cross_entropy", "empirical"),
                                         ("mse", "exact"), ("mse", "empirical")])
def test_factors_match_per_example_oracle(loss, fisher, rng):
    seeded(rng)
    outputs = 3 if loss == "cross_entropy" else 2
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, outputs)).to(DT)
    x = torch.randn(6, 2, generator=rng, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=rng) if loss == "cross_entropy" else torch.randn(6, 2, generator=rng, dtype=DT)
    post = lf.kron_laplace(model, x, y, loss=loss, damping=0.3, scale=1.7, fisher=fisher)
    A, G = per_example_factors(model, x, y, loss, fisher)
    for got, want in zip(post.A + post.G, A + G):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(post.logdet(), reference.kron_logdet(A, G, damping=0.3, scale=1.7))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_mc_fisher_averages_to_exact(loss, rng):
    """G from mc labels is an unbiased estimate of the exact G: many samples get close."""
    seeded(rng)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(5, 2, generator=rng, dtype=DT)
    y = torch.randint(0, 3, (5,), generator=rng) if loss == "cross_entropy" else torch.randn(5, 3, generator=rng, dtype=DT)
    exact = lf.kron_laplace(model, x, y, loss=loss, damping=0.3)
    mc = lf.kron_laplace(model, x, y, loss=loss, damping=0.3, fisher="mc", mc_samples=4000,
                         generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng))))
    for got, want in zip(mc.G, exact.G):
        torch.testing.assert_close(got, want, rtol=0.1, atol=0.1 * want.abs().max().item())
    for got, want in zip(mc.A, exact.A):
        torch.testing.assert_close(got, want)


def adapted_point_outputs(model, post, x):
    """Outputs per task with the adapted weights loaded into the module (plain forward)."""
    outs = []
    for t in range(x.shape[0]):
        params = {k: v[t] for k, v in post.params.items()}
        outs.append(functional_call(model, params, (x[t],), strict=False))
    return torch.stack(outs)


def conv_setup(rng, device):
    seeded(rng)
    model = lf.models.conv4(in_channels=1, ways=3, hidden=4, image_size=16).to(DT).to(device)
    x = torch.randn(2, 3, 1, 16, 16, generator=rng, dtype=DT).to(device)
    y = torch.arange(3).expand(2, 3).contiguous().to(device)
    return model, x, y


def test_predict_point_estimate_classification(device, rng):
    model, x, y = conv_setup(rng, device)
    post = lf.adapt(model, x, y, loss="cross_entropy", inner_lr=0.4, inner_steps=3, damping=0.5)
    query = torch.randn(2, 5, 1, 16, 16, generator=rng, dtype=DT).to(device)
    probs = post.predict(query, pred_type="point")
    expected = torch.softmax(adapted_point_outputs(model, post, query), -1)
    torch.testing.assert_close(probs, expected)
    # Adaptation moved the weights: the support set is fitted better than before.
    before = nn.functional.cross_entropy(adapted_point_outputs(model, lf.kron_laplace(model, x[0], y[0], loss="cross_entropy", damping=0.5), x[:1])[0], y[0])
    after = nn.functional.cross_entropy(torch.log(post.predict(x, pred_type="point")[0]), y[0])
    assert after < before
    assert post.logdet().shape == (2,) and post.logdet().device.type == device.type


def test_predict_point_estimate_regression(rng):
    seeded(rng)
    model = lf.models.mlp(hidden=(8, 8)).to(DT)
    x = torch.randn(3, 5, 1, generator=rng, dtype=DT)
    post = lf.adapt(model, x, torch.sin(x), loss="mse", inner_lr=0.05, inner_steps=2, damping=1.0)
    query = torch.randn(3, 7, 1, generator=rng, dtype=DT)
    mean, std = post.predict(query, pred_type="point")
    torch.testing.assert_close(mean, adapted_point_outputs(model, post, query))
    torch.testing.assert_close(std, torch.ones_like(mean))   # sigma = 1 noise only


def test_zero_steps_is_the_model(rng):
    model, x, y = conv_setup(rng, "cpu")
    post = lf.adapt(model, x, y, loss="cross_entropy", inner_lr=0.4, inner_steps=0, damping=0.5)
    for name, value in post.params.items():
        torch.testing.assert_close(value, model.get_parameter(name).detach().expand_as(value))
    assert set(post.params) == set(lf.meta.functional.inspect_model(model).fast)
    assert not any("1." == k[:2] for k in post.params)  # BatchNorm is not adapted


def test_adapt_errors(rng):
    model, x, y = conv_setup(rng, "cpu")
    with pytest.raises(ValueError, match="damping must be positive"):
        lf.adapt(model, x, y, loss="cross_entropy", inner_lr=0.1, damping=0.0)
    with pytest.raises(ValueError, match="support_y has T=1 tasks but support_x has T=2"):
        lf.adapt(model, x, y[:1], loss="cross_entropy", inner_lr=0.1, damping=1.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        lf.adapt(model, x, y, loss="nll", inner_lr=0.1, damping=1.0)
    post = lf.adapt(model, x, y, loss="cross_entropy", inner_lr=0.1, damping=1.0)
    with pytest.raises(ValueError, match=r"x must be a tensor \[T=2, M, ...\]"):
        post.predict(x[:1])
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        post.predict(x, pred_type="nn", num_samples=-1)


def test_sample_shapes_and_fixed_batchnorm(device, rng):
    model, x, y = conv_setup(rng, device)
    post = lf.adapt(model, x, y, loss="cross_entropy", inner_lr=0.1, damping=1.0)
    samples = post.sample(3, generator=torch.Generator(device=device.type).manual_seed(0))
    for name, value in model.named_parameters():
        assert samples[name].shape == (3, 2, *value.shape), name
    spec = lf.meta.functional.inspect_model(model)
    for name in spec.slow:
        torch.testing.assert_close(samples[name], model.get_parameter(name).detach().expand(3, 2, *model.get_parameter(name).shape))
    for name in spec.fast:
        assert not torch.equal(samples[name][0], post.params[name])


def test_samples_have_the_posterior_mean_and_covariance(rng):
    """Over many samples, the empirical mean is phi and the covariance of the homogeneous
    weights of a layer is (s G (x) A + delta I)^-1."""
    seeded(rng)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).to(DT)
    x = torch.randn(1, 4, 2, generator=rng, dtype=DT)
    post = lf.adapt(model, x, torch.randn(1, 4, 2, generator=rng, dtype=DT), loss="mse", inner_lr=0.1,
                    damping=2.0, scale=0.5)
    S = 20000
    samples = post.sample(S, generator=torch.Generator().manual_seed(1))
    W = torch.cat([samples["2.weight"], samples["2.bias"].unsqueeze(-1)], -1)[:, 0].reshape(S, -1)
    mean = post.mean()[1][0].reshape(-1)
    torch.testing.assert_close(W.mean(0), mean, rtol=0, atol=0.05)
    H = 0.5 * torch.kron(post.G[1][0], post.A[1][0]) + 2.0 * torch.eye(6, dtype=DT)
    cov = (W - mean).T @ (W - mean) / S
    torch.testing.assert_close(cov, torch.linalg.inv(H), rtol=0, atol=0.03)


def test_predict_with_samples(rng):
    model, x, y = conv_setup(rng, "cpu")
    post = lf.adapt(model, x, y, loss="cross_entropy", inner_lr=0.1, damping=1e8)
    probs = post.predict(x, pred_type="nn", num_samples=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, dtype=DT))
    # A very tight posterior (delta = 1e8) predicts like its mean.
    torch.testing.assert_close(probs, post.predict(x, pred_type="point"), rtol=0, atol=1e-3)
    seeded(rng)
    reg = lf.models.mlp(hidden=(8,)).to(DT)
    xs = torch.randn(2, 5, 1, generator=rng, dtype=DT)
    mean, std = lf.adapt(reg, xs, xs.sin(), loss="mse", inner_lr=0.1, damping=0.5).predict(
        xs, pred_type="nn", num_samples=16, generator=torch.Generator().manual_seed(0))
    assert mean.shape == std.shape == (2, 5, 1) and bool((std > 1).all())


# A task's largest activation: 4 query rows x 4 channels x 16 x 16 float64 = 32 KB.
@pytest.mark.parametrize("chunk_bytes", [1, 3 * 4 * 4 * 16 * 16 * 8])   # chunks of 1 and of 3 tasks
def test_predict_in_task_chunks_equals_vmap(chunk_bytes, rng, monkeypatch):
    """On the CPU, predict and sample_outputs take large tasks in chunks (meta_step's "auto"
    rule; a chunk of one task is a plain call): the same outputs, point estimate and samples,
    as one vmap over all tasks (the rule forced both ways through its byte limit), and equal
    to a plain per-task, per-sample forward."""
    seeded(rng)
    model = lf.models.conv4(in_channels=1, ways=3, hidden=4, image_size=16).to(DT)
    x = torch.randn(5, 3, 1, 16, 16, generator=rng, dtype=DT)
    y = torch.arange(3).expand(5, 3).contiguous()
    query = torch.randn(5, 4, 1, 16, 16, generator=rng, dtype=DT)
    post = lf.adapt(model, x, y, loss="cross_entropy", inner_lr=0.4, damping=0.5)
    samples = post.sample(3, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(lf.meta.tasks, "AUTO_CHUNK_BYTES", 1 << 40)    # one vmap for all tasks
    assert post._task_chunk(query) is None
    whole = post.predict(query), post.sample_outputs(samples, query), post.predict(query, pred_type="point")
    monkeypatch.setattr(lf.meta.tasks, "AUTO_CHUNK_BYTES", chunk_bytes)
    assert post._task_chunk(query) == max(1, chunk_bytes // (4 * 4 * 16 * 16 * 8))
    chunked = post.predict(query), post.sample_outputs(samples, query), post.predict(query, pred_type="point")
    torch.testing.assert_close(chunked[0], whole[0])      # the GLM predictive
    torch.testing.assert_close(chunked[2], whole[2])
    torch.testing.assert_close(chunked[1], whole[1])
    plain = torch.stack([torch.stack([functional_call(model, {k: v[s, t] for k, v in samples.items()},
                                                      (query[t],), strict=False) for t in range(5)])
                         for s in range(3)])
    torch.testing.assert_close(chunked[1], plain)
    assert chunked[1].shape == (3, 5, 4, 3)
    with pytest.raises(ValueError, match=r"x must be a tensor \[T=5, M, ...\]"):
        post.sample_outputs(samples, query[:2])
    with pytest.raises(ValueError, match="samples lacks the adapted parameters"):
        post.sample_outputs({}, query)
    bad = dict(samples, **{"0.weight": samples["0.weight"][:, :2]})
    with pytest.raises(ValueError, match=r"samples\['0.weight'\] must have shape \[S, T=5, 4, 1, 3, 3\]"):
        post.sample_outputs(bad, query)
    bad = dict(samples, **{"0.weight": samples["0.weight"][:2]})
    with pytest.raises(ValueError, match=r"has S=3 samples but others have S=2"):
        post.sample_outputs(bad, query)


def test_predict_noise(rng):
    """The point estimate's std is the noise alone; another noise goes through with_noise (the
    curvature rescaled by 1/sigma^2: the same draws give the same predictive as with_noise's);
    a bad noise is a ValueError naming it; classification ignores it."""
    seeded(rng)
    reg = lf.models.mlp(hidden=(8,)).to(DT)
    xs = torch.randn(2, 5, 1, generator=rng, dtype=DT)
    post = lf.adapt(reg, xs, xs.sin(), loss="mse", inner_lr=0.1, damping=0.5)
    torch.testing.assert_close(post.predict(xs, pred_type="point", noise=0.3)[1], torch.full((2, 5, 1), 0.3, dtype=DT))
    for pred_type in ("nn", "glm"):
        via_predict = post.predict(xs, pred_type=pred_type, num_samples=6, noise=0.1,
                                   generator=torch.Generator().manual_seed(3))
        via_posterior = post.with_noise(0.1).predict(xs, pred_type=pred_type, num_samples=6,
                                                     generator=torch.Generator().manual_seed(3))
        for got, want in zip(via_predict, via_posterior):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="noise must be a finite number > 0"):
            post.predict(xs, noise=bad)
    model, x, y = conv_setup(rng, "cpu")
    cls = lf.adapt(model, x, y, loss="cross_entropy", inner_lr=0.1, damping=1.0)
    torch.testing.assert_close(cls.predict(x, noise=0.01), cls.predict(x))


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_softmax_ggn_roots(classes, rng):
    """C-1 cotangents whose outer products sum to diag(p) - p p^T, also for near one-hot p."""
    from llama_fast.meta.functional import softmax_ggn_roots
    logits = torch.randn(6, classes, generator=rng, dtype=DT) * 3
    logits[0, -1] = 60.0      # p ~ e_C: the Householder denominator stays >= 1
    logits[1, 0] = 60.0       # p ~ e_1
    log_p = torch.log_softmax(logits, -1)
    p = log_p.exp()
    U = softmax_ggn_roots(log_p)
    assert U.shape == (classes - 1, 6, classes)
    want = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    torch.testing.assert_close(torch.einsum("kni,knj->nij", U, U), want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("delta", [0.05, 30.0])
def test_with_damping_equals_a_fresh_adapt(delta, rng):
    """with_damping reuses the eigendecompositions (low-rank conv/linear factors included):
    log-det, samples, predictions and solves equal those of adapt(..., damping=delta)."""
    model, x, y = conv_setup(rng, "cpu")
    base = lf.adapt(model, x, y, loss="cross_entropy", inner_lr=0.1, damping=1.0)
    assert any(isinstance(A, lf.LowRankFactor) for A in base.A)
    base.sample(1, generator=torch.Generator().manual_seed(0))   # fills the shared basis cache
    moved = base.with_damping(delta)
    fresh = lf.adapt(model, x, y, loss="cross_entropy", inner_lr=0.1, damping=delta)
    assert moved.damping == delta and base.damping == 1.0
    torch.testing.assert_close(moved.logdet(), fresh.logdet(), rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(base.logdet(), base.with_damping(1.0).logdet(), rtol=1e-10, atol=1e-8)
    draws = [p.sample(3, generator=torch.Generator().manual_seed(5)) for p in (moved, fresh)]
    for name in draws[0]:
        torch.testing.assert_close(draws[0][name], draws[1][name], rtol=1e-9, atol=1e-10)
    probs = [p.predict(x, pred_type="nn", num_samples=2, generator=torch.Generator().manual_seed(7))
             for p in (moved, fresh)]
    torch.testing.assert_close(probs[0], probs[1], rtol=1e-9, atol=1e-10)
    V = [torch.randn(2, *m.shape[1:], generator=rng, dtype=DT) for m in base.mean()]
    for a, b in zip(moved.curvature.solve(V), fresh.curvature.solve(V)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    per_task = base.with_damping(torch.tensor([0.5, 2.0], dtype=DT))
    torch.testing.assert_close(per_task.logdet()[1], base.with_damping(2.0).logdet()[1])
    with pytest.raises(ValueError, match="damping"):
        base.with_damping(0.0)
