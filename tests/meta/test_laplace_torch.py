"""kron_laplace against laplace-torch's KronLaplace (curvlinops backend) on bias-free networks.

Mapping (see README, "laplace-torch"): laplace-torch's KFAC (curvlinops, expand) has
``A = mean_{n,r} a a^T`` and ``G = sum_{n,r,c} g g^T`` for the summed loss (CrossEntropyLoss
or MSELoss with reduction="sum"; for regression it multiplies the product by 1/2, the
Gaussian nll with sigma = 1). Fitted on one batch holding the whole data set, no factor is
rescaled, and ``log_det_posterior_precision`` is ``sum log(mu lambda / temperature + delta)``:
our ``logdet()`` with ``damping = prior_precision`` and ``scale = 1 / temperature``. With a
bias, laplace-torch keeps W and b as separate blocks (``G (x) A`` and ``G``) while
llama_fast uses the homogeneous ``[W, b]`` block, so only bias-free layers compare exactly.
"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import llama_fast as lf

laplace = pytest.importorskip("laplace")
from laplace import KronLaplace  # noqa: E402
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN  # noqa: E402

DT = torch.float64


def laplace_torch_logdet(model, x, y, likelihood, delta, temperature, backend):
    la = KronLaplace(model, likelihood, prior_precision=delta, temperature=temperature, backend=backend)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=len(x)))
    return la.log_det_posterior_precision


def seeded(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))


def mlp(rng, outputs):
    seeded(rng)
    return nn.Sequential(nn.Linear(3, 6, bias=False), nn.Tanh(), nn.Linear(6, 5, bias=False), nn.ReLU(),
                         nn.Linear(5, outputs, bias=False)).to(DT)


def convnet(rng, classes=4):
    seeded(rng)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3, stride=2, bias=False), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4, classes, bias=False)).to(DT)


@pytest.mark.parametrize("delta,temperature", [(0.3, 1.0), (2.0, 0.5)])
def test_regression_exact(delta, temperature, rng):
    model = mlp(rng, outputs=2)
    x = torch.randn(9, 3, generator=rng, dtype=DT)
    y = torch.randn(9, 2, generator=rng, dtype=DT)
    ours = lf.kron_laplace(model, x, y, loss="mse", damping=delta, scale=1 / temperature).logdet()[0]
    theirs = laplace_torch_logdet(model, x, y, "regression", delta, temperature, CurvlinopsGGN)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("fisher,backend", [("exact", CurvlinopsGGN), ("empirical", CurvlinopsEF)])
def test_classification_mlp(fisher, backend, rng):
    model = mlp(rng, outputs=4)
    x = torch.randn(7, 3, generator=rng, dtype=DT)
    y = torch.randint(0, 4, (7,), generator=rng)
    ours = lf.kron_laplace(model, x, y, loss="cross_entropy", damping=0.5, fisher=fisher).logdet()[0]
    theirs = laplace_torch_logdet(model, x, y, "classification", 0.5, 1.0, backend)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_classification_conv_expand(backend, rng):
    """Conv layers: A averaged over examples and output positions (K-FAC expand) as in
    curvlinops; a strided conv and a max-pool in between."""
    model = convnet(rng)
    x = torch.randn(5, 2, 8, 8, generator=rng, dtype=DT)
    y = torch.randint(0, 4, (5,), generator=rng)
    ours = lf.kron_laplace(model, x, y, loss="cross_entropy", damping=0.2, backend=backend).logdet()[0]
    theirs = laplace_torch_logdet(model, x, y, "classification", 0.2, 1.0, CurvlinopsGGN)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-8)


def test_meta_step_logdet_equals_laplace_torch_on_adapted_task(rng):
    """The per-task log-det meta_step differentiates is laplace-torch's at the adapted weights."""
    model = mlp(rng, outputs=3)
    x = torch.randn(2, 6, 3, generator=rng, dtype=DT)
    y = torch.randint(0, 3, (2, 6), generator=rng)
    batch = lf.TaskBatch(x, y, x, y)
    result = lf.meta_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.0), algorithm="llama",
                          loss="cross_entropy", inner_lr=0.5, inner_steps=2, eta=0.1, damping=0.4)
    post = lf.adapt(model, x, y, loss="cross_entropy", inner_lr=0.5, inner_steps=2, damping=0.4)
    for t in range(2):
        with torch.no_grad():
            for name, value in post.params.items():
                model.get_parameter(name).copy_(value[t])
        theirs = laplace_torch_logdet(model, x[t], y[t], "classification", 0.4, 1.0, CurvlinopsGGN)
        torch.testing.assert_close(result.logdet[t], theirs, rtol=1e-10, atol=1e-8)


# ---- the linearised (GLM) predictive ----------------------------------------------------------

def fitted(model, x, y, likelihood, **kwargs):
    la = KronLaplace(model, likelihood, backend=CurvlinopsGGN, **kwargs)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=len(x)))
    return la


@pytest.mark.parametrize("sigma", [1.0, 0.3])
def test_glm_regression(sigma, rng):
    model = mlp(rng, outputs=2)
    x = torch.randn(9, 3, generator=rng, dtype=DT)
    y = torch.randn(9, 2, generator=rng, dtype=DT)
    query = torch.randn(6, 3, generator=rng, dtype=DT)
    post = lf.kron_laplace(model, x, y, loss="mse", damping=0.4, scale=2.0, noise=sigma)
    la = fitted(model, x, y, "regression", sigma_noise=sigma, prior_precision=0.4, temperature=0.5)
    f_mu, f_var = la(query, pred_type="glm")
    torch.testing.assert_close(post.functional_covariance(query[None])[0], f_var, rtol=1e-9, atol=1e-12)
    mean, std = post.predict(query[None])
    torch.testing.assert_close(mean[0], f_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std[0] ** 2, f_var.diagonal(dim1=-2, dim2=-1) + sigma ** 2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_glm_classification_probit(net, rng):
    model = mlp(rng, outputs=4) if net == "mlp" else convnet(rng)
    shape = (3,) if net == "mlp" else (2, 8, 8)
    x = torch.randn(7, *shape, generator=rng, dtype=DT)
    y = torch.randint(0, 4, (7,), generator=rng)
    query = torch.randn(5, *shape, generator=rng, dtype=DT)
    post = lf.kron_laplace(model, x, y, loss="cross_entropy", damping=0.3)
    la = fitted(model, x, y, "classification", prior_precision=0.3)
    _, f_var = la._glm_predictive_distribution(query)
    torch.testing.assert_close(post.functional_covariance(query[None])[0], f_var, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(post.predict(query[None])[0], la(query, pred_type="glm", link_approx="probit"),
                               rtol=1e-9, atol=1e-12)
