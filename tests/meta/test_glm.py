"""The linearised (GLM) predictive of TaskPosterior against dense float64 oracles: Jacobians by
torch.func.jacrev, the explicit Kronecker precision of every layer, and J H^-1 J^T; linearised
weight draws (kron_sample through torch.func.jvp); the predictive's limits and errors."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import llama_fast as lf
from llama_fast.ops import reference

DT = torch.float64


def seeded(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))


def mlp(rng, bias, outputs=3, width=7):
    seeded(rng)
    return nn.Sequential(nn.Linear(4, width, bias=bias), nn.Tanh(), nn.Linear(width, 5, bias=bias), nn.ReLU(),
                         nn.Linear(5, outputs, bias=bias)).to(DT)


def convnet(rng, classes=3):
    seeded(rng)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4, classes)).to(DT)


def bn_convnet(rng, classes=3):
    seeded(rng)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(48, classes)).to(DT)
    with torch.no_grad():   # BatchNorm's affine parameters away from 1 and 0
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


def homogeneous_to_params(post, layer_weights):
    """{name: tensor} of the K-FAC layers from homogeneous weights [o, i'] (one task)."""
    out = {}
    for layer, W in zip(post.spec.layers, layer_weights):
        shape = post.params[layer.weight].shape[1:]
        if layer.has_bias:
            out[layer.bias] = W[:, -1]
            W = W[:, :-1]
        out[layer.weight] = W.reshape(shape)
    return out


def oracle_outputs(post, t, x, bn_stats=None):
    """f(W) on x [M, ...] for task t as a function of the homogeneous weights; BatchNorm in
    eval mode on the given batch statistics (constants) where the network has BatchNorm."""
    fixed = dict(post.fixed)
    if bn_stats is not None:
        fixed.update(bn_stats)

    def f(*weights):
        params = {**fixed, **homogeneous_to_params(post, weights)}
        return functional_call(post.model, params, (x,)).reshape(x.shape[0], -1)
    return f


def dense_glm_covariance(post, x, bn_stats=None):
    """sum_l J_l H_l^-1 J_l^T per task, [T, M, K, K]."""
    return torch.stack([dense_glm_covariance_one(post, t, x[t], bn_stats) for t in range(post.tasks)])


def dense_glm_covariance_one(post, t, x, bn_stats=None):
    """sum_l J_l H_l^-1 J_l^T of task t by jacrev and the explicit Kronecker precision."""
    weights = tuple(m[t] for m in post.mean())
    jac = torch.func.jacrev(oracle_outputs(post, t, x, bn_stats), argnums=tuple(range(len(weights))))(*weights)
    total = 0
    for l, J in enumerate(jac):                               # J [M, K, o, i']
        A, G = post.A[l], post.G[l]
        A = A.dense() if isinstance(A, lf.LowRankFactor) else A
        G = G.dense() if isinstance(G, lf.LowRankFactor) else G
        H = reference.kron_precision_dense(A[t:t + 1], G[t:t + 1], post.curvature.damping[t:t + 1], post.curvature_scale)[0]
        Jf = J.flatten(2)
        total = total + Jf @ torch.linalg.solve(H, Jf.mT)
    return total


def tasks(rng, T, N, M, shape, loss, outputs):
    sx = torch.randn(T, N, *shape, generator=rng, dtype=DT)
    qx = torch.randn(T, M, *shape, generator=rng, dtype=DT)
    if loss == "cross_entropy":
        sy = torch.randint(0, outputs, (T, N), generator=rng)
    else:
        sy = torch.randn(T, N, outputs, generator=rng, dtype=DT)
    return sx, sy, qx


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("support", [3, 12])     # 3 rows: low-rank A factors; 12: dense
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_mlp_matches_dense_oracle(bias, support, loss, rng):
    model = mlp(rng, bias, outputs=3)
    sx, sy, qx = tasks(rng, 2, support, 5, (4,), loss, 3)
    post = lf.adapt(model, sx, sy, loss=loss, inner_lr=0.1, inner_steps=2, damping=0.4, noise=0.7)
    if support == 3:
        assert any(isinstance(A, lf.LowRankFactor) for A in post.A)
    torch.testing.assert_close(post.functional_covariance(qx), dense_glm_covariance(post, qx),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("support", [2, 6])
def test_convnet_matches_dense_oracle(support, rng):
    model = convnet(rng)
    sx, sy, qx = tasks(rng, 2, support, 4, (2, 8, 8), "cross_entropy", 3)
    post = lf.adapt(model, sx, sy, loss="cross_entropy", inner_lr=0.1, inner_steps=1, damping=0.3)
    torch.testing.assert_close(post.functional_covariance(qx), dense_glm_covariance(post, qx),
                               rtol=1e-10, atol=1e-10)


def test_batchnorm_statistics_are_constants(rng):
    """With BatchNorm, the Jacobian is that of the network whose BatchNorm normalises with the
    query batch's statistics held fixed (eval mode on those statistics)."""
    model = bn_convnet(rng)
    sx, sy, qx = tasks(rng, 2, 4, 5, (2, 8, 8), "cross_entropy", 3)
    post = lf.adapt(model, sx, sy, loss="cross_entropy", inner_lr=0.1, inner_steps=1, damping=0.5)
    out = post.functional_covariance(qx)
    for t in range(2):
        h = nn.functional.conv2d(qx[t], post.params["0.weight"][t], post.params["0.bias"][t], padding=1)
        stats = {"1.running_mean": h.mean((0, 2, 3)), "1.running_var": h.var((0, 2, 3), unbiased=False)}
        model.eval()
        try:
            expected = dense_glm_covariance_one(post, t, qx[t], stats)
        finally:
            model.train()
        torch.testing.assert_close(out[t], expected, rtol=1e-10, atol=1e-10)


def test_linearised_draws_match(rng):
    """Weight draws of kron_sample pushed through the network's JVP at phi have covariance
    J H^-1 J^T: every entry within 5 Monte-Carlo standard errors."""
    model = mlp(rng, True, outputs=2, width=4)
    sx, sy, qx = tasks(rng, 1, 6, 3, (4,), "mse", 2)
    post = lf.adapt(model, sx, sy, loss="mse", inner_lr=0.1, inner_steps=1, damping=0.8)
    S = 20_000
    draws = post.curvature.sample([m for m in post.mean()], num_samples=S,
                                  generator=torch.Generator().manual_seed(3))
    means = tuple(m[0] for m in post.mean())
    f = oracle_outputs(post, 0, qx[0])
    tangents = [(d[:, 0] - m) for d, m in zip(draws, means)]
    jvps = torch.func.vmap(lambda *ts: torch.func.jvp(f, means, ts)[1])(*tangents)   # [S, M, K]
    cov = torch.einsum("smk,smj->mkj", jvps, jvps) / S
    exact = post.functional_covariance(qx)[0]
    se = torch.sqrt((exact.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * exact.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)
                     + exact ** 2) / S)
    assert ((cov - exact).abs() / se).max() < 5


def test_predict_limits(rng):
    """delta -> infinity: the GLM predictive is the point estimate exactly; regression's mean
    is the point estimate at any delta and its std is above sigma."""
    model = mlp(rng, True, outputs=3)
    sx, sy, qx = tasks(rng, 2, 6, 5, (4,), "cross_entropy", 3)
    post = lf.adapt(model, sx, sy, loss="cross_entropy", inner_lr=0.1, damping=0.5)
    point = post.predict(qx, pred_type="point")
    assert torch.equal(post.with_damping(1e300).predict(qx), point)
    glm = post.predict(qx)
    assert not torch.allclose(glm, point)
    torch.testing.assert_close(glm.sum(-1), torch.ones(2, 5, dtype=DT))
    # probit shrinks towards uniform: the top class loses probability
    assert (glm.max(-1).values <= point.max(-1).values + 1e-12).all()
    mc = post.predict(qx, link_approx="mc", num_samples=20_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc, glm, rtol=0, atol=0.05)

    reg = mlp(rng, True, outputs=2)
    sx, sy, qx = tasks(rng, 2, 6, 5, (4,), "mse", 2)
    post = lf.adapt(reg, sx, sy, loss="mse", inner_lr=0.1, damping=0.5, noise=0.3)
    point_mean, point_std = post.predict(qx, pred_type="point")
    mean, std = post.predict(qx)
    assert torch.equal(mean, point_mean)
    assert (std > point_std).all() and torch.equal(point_std, torch.full_like(point_std, 0.3))
    f_cov = post.functional_covariance(qx)
    torch.testing.assert_close(std ** 2, f_cov.diagonal(dim1=-2, dim2=-1) + 0.09)
    mean_inf, std_inf = post.with_damping(1e300).predict(qx)
    assert torch.equal(mean_inf, point_mean) and torch.equal(std_inf, point_std)


def test_noise_rescales_curvature(rng):
    """A Gaussian likelihood with noise sigma has curvature scale / sigma^2: the same posterior
    whether sigma is given to adapt, to with_noise or to predict."""
    model = mlp(rng, True, outputs=2)
    sx, sy, qx = tasks(rng, 2, 6, 4, (4,), "mse", 2)
    kwargs = dict(loss="mse", inner_lr=0.1, damping=0.5)
    at_adapt = lf.adapt(model, sx, sy, noise=0.25, **kwargs)
    later = lf.adapt(model, sx, sy, **kwargs).with_noise(0.25)
    assert at_adapt.curvature_scale == pytest.approx(16.0) and later.curvature_scale == pytest.approx(16.0)
    torch.testing.assert_close(later.logdet(), at_adapt.logdet(), rtol=1e-12, atol=0)
    torch.testing.assert_close(later.functional_covariance(qx), at_adapt.functional_covariance(qx),
                               rtol=1e-12, atol=0)
    via_predict = lf.adapt(model, sx, sy, **kwargs).predict(qx, noise=0.25)
    for got, want in zip(via_predict, at_adapt.predict(qx)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="with_noise applies to loss='mse'"):
        lf.adapt(mlp(rng, True), sx, torch.zeros(2, 6, dtype=torch.long), loss="cross_entropy",
                 inner_lr=0.1, damping=0.5).with_noise(0.5)


@pytest.mark.parametrize("kwargs,match", [
    ({"pred_type": "laplace"}, "pred_type"),
    ({"link_approx": "bridge"}, "link_approx"),
    ({"pred_type": "nn", "num_samples": 0}, "num_samples"),
    ({"link_approx": "mc", "num_samples": 2.5}, "num_samples"),
])
def test_predict_rejects_bad_arguments(kwargs, match, rng):
    model = mlp(rng, True, outputs=3)
    sx, sy, qx = tasks(rng, 1, 4, 2, (4,), "cross_entropy", 3)
    post = lf.adapt(model, sx, sy, loss="cross_entropy", inner_lr=0.1, damping=0.5)
    with pytest.raises(ValueError, match=match):
        post.predict(qx, **kwargs)


def test_outputs_are_the_point_logits(rng):
    model = bn_convnet(rng)
    sx, sy, qx = tasks(rng, 2, 4, 3, (2, 8, 8), "cross_entropy", 3)
    post = lf.adapt(model, sx, sy, loss="cross_entropy", inner_lr=0.1, damping=0.5)
    logits = post.outputs(qx)
    assert logits.shape == (2, 3, 3) and not logits.requires_grad
    torch.testing.assert_close(torch.softmax(logits, -1), post.predict(qx, pred_type="point"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x must be a tensor"):
        post.outputs(qx[:1])


def test_nan_inputs_give_nan_predictions(rng):
    """A NaN query input makes that task's predictions NaN in every pred_type (the
    BatchNorm statistics spread it over the task's queries), not an error or a finite number;
    the other tasks are untouched."""
    model = bn_convnet(rng)
    sx, sy, qx = tasks(rng, 2, 4, 3, (2, 8, 8), "cross_entropy", 3)
    post = lf.adapt(model, sx, sy, loss="cross_entropy", inner_lr=0.1, damping=0.5)
    clean = post.predict(qx)
    qx = qx.clone()
    qx[1, 0, 0, 2, 2] = float("nan")
    for pred_type in ("point", "glm", "nn"):
        probs = post.predict(qx, pred_type=pred_type, num_samples=4)
        assert torch.isnan(probs[1]).all()
        assert torch.isfinite(probs[0]).all()
    torch.testing.assert_close(post.predict(qx)[0], clean[0], rtol=1e-12, atol=1e-14)


def test_probit_formula():
    f = torch.tensor([[1.0, -0.5, 2.0]], dtype=DT)
    cov = torch.diag(torch.tensor([0.5, 2.0, 4.0], dtype=DT)).unsqueeze(0)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.tensor([0.5, 2.0, 4.0], dtype=DT))
    torch.testing.assert_close(lf.meta.predictive.probit_softmax(f, cov), torch.softmax(f * kappa, -1))


def test_chunks_equal_one_pass(rng, monkeypatch):
    """Tasks and inputs taken a few at a time (GLM_CHUNK_BYTES forced small) give the same
    covariance as one pass over all of them, on a network with BatchNorm (statistics over the
    task's whole query batch either way)."""
    model = bn_convnet(rng)
    sx, sy, qx = tasks(rng, 3, 4, 5, (2, 8, 8), "cross_entropy", 3)
    post = lf.adapt(model, sx, sy, loss="cross_entropy", inner_lr=0.1, inner_steps=1, damping=0.5)
    posterior = lf.meta.posterior
    monkeypatch.setattr(posterior, "GLM_CHUNK_BYTES", 1 << 40)
    assert post._glm_task_chunk(qx) == 3 or post._task_chunk(qx) is not None
    whole = post.functional_covariance(qx, damping_grid=[0.1, 1.0])
    monkeypatch.setattr(posterior, "GLM_CHUNK_BYTES", 1)
    assert post._glm_task_chunk(qx) == 1
    torch.testing.assert_close(post.functional_covariance(qx, damping_grid=[0.1, 1.0]), whole, rtol=1e-12, atol=1e-14)
