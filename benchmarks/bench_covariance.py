"""The linearised (GLM) predictive's function-space covariance: the op against its oracle, and
the whole GLM predictive of 32 Conv-4 tasks against a loop of laplace-torch's KronLaplace.

``bench_functional_covariance``: the compiled op ``torch.ops.llama_fast.functional_covariance``
(the weighted contraction ``sum_pq Jh_k,pq Jh_j,pq / (s mu_p lambda_q + delta) + R / delta``)
against ``llama_fast.reference.functional_covariance`` (weights ``[D, T, g, a]`` and one einsum
per layer), both on the same arguments, for D = 1 damping and the 17-point grid of
``--damping auto`` (``experiments.selection.DAMPING_GRID``). The arguments are real: the Jacobian
coordinates, eigenvalues and low-rank residual Grams of adapted posteriors (1-40-40-1 sinusoid
MLP: M = 100 query points, K = 1 output, 10-shot support; Conv-4 Omniglot 5-way 1-shot
``lf.models.conv4``: M = 5 query images, K = 5 outputs), computed for the first
``REAL_TASKS`` tasks and repeated up to T = 32 (the op's cost depends on the shapes alone), as
``TaskPosterior.functional_covariance`` computes them (through its private ``_jacobian_rows``
and ``KronCurvature._basis``). The op's output is checked against the oracle on these very
arguments before timing (the float32 tolerances of tests/ops/test_covariance.py).

``bench_glm_predictive_vs_laplace_torch``: the GLM predictive (probit) of T = 32 Conv-4 Omniglot
5-way 1-shot tasks (random 28 x 28 images, M = 5 queries per task). Both sides use a bias-free
Conv-4 (``conv4_bias_free``: ``lf.models.conv4``'s layers with ``bias=False``; a conv bias in
front of BatchNorm has no effect, and laplace-torch keeps a bias as its own Kronecker block
where llama_fast uses the homogeneous ``[W, b]`` block, so only bias-free layers compare).

- llama_fast (timed as "kernels"): ``lf.adapt`` (the inner step of all 32 tasks, vmapped, and
  their K-FAC factors and eigendecompositions, low-rank where a factor has fewer support rows
  than its width) then one ``post.predict(qx, pred_type="glm")`` call for all tasks
  (Jacobian rows with BatchNorm statistics held constant, the op, the probit link).
- laplace-torch (timed as "reference"): a Python loop over the 32 tasks: copy the task's
  adapted parameters (``post.params[k][t]``, computed once by ``lf.adapt`` outside the timer,
  so this side does not pay for the inner step) into one model copy whose BatchNorm parameters
  do not require grad (laplace-torch's posterior then covers the conv and linear weights, as
  llama_fast's), ``KronLaplace(model, "classification", prior_precision=delta,
  backend=CurvlinopsGGN).fit`` on the task's 5 support images (curvlinops K-FAC, dense
  eigendecompositions of the 576-wide factors), and ``la(qx_t, pred_type="glm",
  link_approx="probit")`` (Jacobians by ``torch.func.jacrev`` through the whole query batch).

What each side computes, and how it is checked before timing:
- Without BatchNorm the two are the same quantity: a BatchNorm-free bias-free Conv-4 (16
  filters, float64, one task) driven by this file's code agrees to the tolerances of
  tests/meta/test_laplace_torch.py (rtol 1e-9).
- With BatchNorm (batch statistics, Conv-4's) they differ in two places. (1) Jacobians:
  laplace-torch differentiates through the query batch's statistics (each output depends on
  all M queries), llama_fast holds them constant (per-example rows; docs/meta-training.md,
  "Jacobians and BatchNorm"). (2) The G factors of the BatchNorm'd layers (~1% apart): both
  backpropagate square roots of the softmax Hessian through the support batch's statistics,
  which couple the examples, and then the factor depends on which square root is used
  (curvlinops: the C vectors ``sqrt(p_c) (e_c - p)``; llama_fast: C - 1 Householder vectors,
  ``softmax_ggn_roots``). Without the coupling both give the same factor. So on the measured
  inputs (task 0, float32) the benchmark compares against laplace-torch run with llama_fast's
  ``constant_batch_statistics`` hook on the model copy, which removes (1), within
  ``BN_PROB_ATOL`` (what (2) leaves; ``extra_info["max_prob_diff_constant_statistics"]``); the
  largest difference to laplace-torch as timed (without the hook), over all tasks of the last
  timed round, goes into ``extra_info["max_prob_diff_laplace_torch"]`` (0.05-0.08 in the runs so far).

Without ``--benchmark`` (``pytest benchmarks/bench_covariance.py``: a plain ``pytest`` does not
collect benchmarks/, a path named on the command line is run) every case runs its checks and
one paired round on ``QUICK_TASKS`` tasks, without warm-up: a smoke test of the suite (a few
seconds on an idle CPU), not a figure.
"""

import contextlib
import copy
import functools

import pytest
import torch
from torch import nn

import llama_fast as lf
from llama_fast import reference
from llama_fast.experiments.selection import DAMPING_GRID
from llama_fast.meta.functional import constant_batch_statistics
from lf_workloads import paired_benchmark

TASKS = 32
QUICK_TASKS = {"op": 2, "glm": 1}   # tasks per case without --benchmark
REAL_TASKS = 4                      # tasks whose op arguments are computed (then repeated)
WAYS = 5
SINUSOID_QUERIES = 100
CONV4_QUERIES = 5                   # 5-way, one query image per class (query_shots = shots = 1)
GLM_DAMPING = 1.0
# float32 probabilities with BatchNorm'd G factors (see above); CUDA: cuDNN's TF32 convolutions.
BN_PROB_ATOL = {"cpu": 2e-3, "cuda": 1e-2}


@pytest.fixture
def quick(request):
    """True without --benchmark: fewer tasks and one paired round (a smoke test)."""
    return not request.config.getoption("--benchmark")


def paired(benchmark, kernels, ref, device, *args, quick=False):
    """lf_workloads.paired_benchmark; in quick mode one paired round without warm-up (the
    figures of such a run mean nothing: it only exercises the suite)."""
    if quick:
        paired_benchmark(benchmark, kernels, ref, device, *args, rounds=1, warmup=False)
    else:
        paired_benchmark(benchmark, kernels, ref, device, *args)


# ---- 1. the op against the oracle ---------------------------------------------------------------

def sinusoid_posterior(T, device):
    """(posterior, queries [T, 100, 1]): the 1-40-40-1 MLP adapted to T 10-shot sinusoid tasks."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = lf.models.mlp().to(device)
    x = torch.rand(T, 10 + SINUSOID_QUERIES, 1, generator=gen) * 10 - 5
    amp = torch.rand(T, 1, 1, generator=gen) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, generator=gen) * 3.1416
    y = amp * torch.sin(x + phase)
    x, y = x.to(device), y.to(device)
    post = lf.adapt(model, x[:, :10], y[:, :10], loss="mse", inner_lr=0.01, damping=1.0)
    return post, x[:, 10:]


def conv4_posterior(T, device, make_model=None, dtype=torch.float32):
    """(model, posterior, support x, support y, queries): a Conv-4 (``make_model()``, default
    ``lf.models.conv4``) adapted to T 5-way 1-shot tasks of random 28 x 28 images, 5 queries
    per task."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if make_model is None:
        model = lf.models.conv4(in_channels=1, ways=WAYS, hidden=64, image_size=28)
    else:
        model = make_model()
    model = model.to(device=device, dtype=dtype)
    sx = torch.randn(T, WAYS, 1, 28, 28, generator=gen, dtype=dtype).to(device)
    sy = torch.arange(WAYS).expand(T, -1).contiguous().to(device)
    qx = torch.randn(T, CONV4_QUERIES, 1, 28, 28, generator=gen, dtype=dtype).to(device)
    post = lf.adapt(model, sx, sy, loss="cross_entropy", inner_lr=0.4, damping=GLM_DAMPING)
    return model, post, sx, sy, qx


@functools.lru_cache(maxsize=2)
def real_coordinates(workload, T, device):
    """(rotated, evals_G, evals_A, residual, scale) of a real posterior on REAL_TASKS tasks,
    repeated to T tasks (cached: the D = 1 and D = 17 cases share them)."""
    real = min(T, REAL_TASKS)
    if workload == "sinusoid":
        post, qx = sinusoid_posterior(real, device)
    else:
        _, post, _, _, qx = conv4_posterior(real, device)
    curvature = post.curvature
    with torch.no_grad():
        a, g = post._jacobian_rows(qx, (0, real))
        rotated, residual = curvature.jacobian_coordinates(a, g)
    evals_G = [curvature._basis(l, "G")[1] for l in range(curvature.layers)]
    evals_A = [curvature._basis(l, "A")[1] for l in range(curvature.layers)]
    index = torch.arange(T, device=device) % real

    def tile(x, dim=0):
        return x.index_select(dim, index).contiguous()

    rotated, evals_G, evals_A = ([tile(x) for x in xs] for xs in (rotated, evals_G, evals_A))
    residual = None if residual is None else tile(residual, dim=1)
    return rotated, evals_G, evals_A, residual, curvature.scale


def op_arguments(workload, T, D, device):
    """The op's arguments (rotated, evals_G, evals_A, residual, damping [D, T, L], scale):
    real_coordinates and D dampings (DAMPING_GRID for D = 17)."""
    rotated, evals_G, evals_A, residual, scale = real_coordinates(workload, T, device)
    grid = DAMPING_GRID if D == len(DAMPING_GRID) else (1.0,) * D
    damping = torch.tensor(grid, dtype=rotated[0].dtype, device=device)[:, None, None]
    damping = damping.expand(D, T, len(rotated)).contiguous()
    return rotated, evals_G, evals_A, residual, damping, scale


OP_CASES = [("sinusoid", TASKS, SINUSOID_QUERIES, 1), ("conv4-omniglot", TASKS, CONV4_QUERIES, WAYS)]


@pytest.mark.parametrize("D", [1, len(DAMPING_GRID)])
@pytest.mark.parametrize("workload,T,M,K", OP_CASES)
def bench_functional_covariance(benchmark, device, quick, workload, T, M, K, D):
    """The op vs reference.functional_covariance on one posterior's real arguments."""
    T = QUICK_TASKS["op"] if quick else T
    args = op_arguments(workload, T, D, device)
    rotated, _, _, residual, _, _ = args
    assert rotated[0].shape[:3] == (T, M, K)
    op = torch.ops.llama_fast.functional_covariance
    with torch.no_grad():
        out, expected = op(*args), reference.functional_covariance(*args)
    assert out.shape == (D, T, M, K, K)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5 * float(expected.abs().max()))
    benchmark.extra_info["widths"] = [tuple(x.shape[-2:]) for x in rotated]
    benchmark.extra_info["residual"] = residual is not None
    benchmark.group = f"functional_covariance {workload} T={T} M={M} K={K} D={D} {device}"

    def kernels():
        with torch.no_grad():
            return op(*args)

    def oracle():
        with torch.no_grad():
            return reference.functional_covariance(*args)

    paired(benchmark, kernels, oracle, device, quick=quick)


# ---- 2. the GLM predictive of 32 Conv-4 tasks against laplace-torch -----------------------------

def conv4_bias_free(batch_norm=True, ways=WAYS, hidden=64):
    """lf.models.conv4(in_channels=1, ways, hidden, image_size=28) with bias-free layers
    (optionally without its BatchNorm layers)."""
    blocks, channels = [], 1
    for _ in range(4):
        blocks.append(nn.Conv2d(channels, hidden, kernel_size=3, padding=1, bias=False))
        if batch_norm:
            blocks.append(nn.BatchNorm2d(hidden, track_running_stats=False))
        blocks += [nn.ReLU(), nn.MaxPool2d(2)]
        channels = hidden
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(hidden, ways, bias=False))


def llama_glm(model, sx, sy, qx, damping):
    """llama_fast: adapt all tasks, then one batched GLM predictive call."""
    post = lf.adapt(model, sx, sy, loss="cross_entropy", inner_lr=0.4, damping=damping)
    return post.predict(qx, pred_type="glm", link_approx="probit")


def laplace_copy(model):
    """The model copy laplace-torch works on: BatchNorm's parameters out of its posterior."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for p in module.parameters():
                p.requires_grad_(False)
    return copied


def laplace_torch_glm(copied, params, sx, sy, qx, damping, constant_statistics=False):
    """laplace-torch: a loop over tasks, one KronLaplace fit and GLM predictive each, with the
    task's adapted parameters ``params[k][t]`` copied into ``copied``; ``constant_statistics``:
    its Jacobians with BatchNorm's statistics held constant (llama_fast's hook)."""
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsGGN
    from torch.utils.data import DataLoader, TensorDataset

    probs = []
    for t in range(sx.shape[0]):
        with torch.no_grad():
            for name, value in params.items():
                copied.get_parameter(name).copy_(value[t])
        la = KronLaplace(copied, "classification", prior_precision=damping, backend=CurvlinopsGGN)
        la.fit(DataLoader(TensorDataset(sx[t], sy[t]), batch_size=sx.shape[1]))
        with constant_batch_statistics(copied) if constant_statistics else contextlib.nullcontext():
            probs.append(la(qx[t], pred_type="glm", link_approx="probit"))
    return torch.stack(probs)


def check_against_laplace_torch(model, post, sx, sy, qx, device):
    """The checks of the module docstring (before timing); returns the largest probability
    difference on task 0 to laplace-torch with constant BatchNorm statistics."""
    # Without BatchNorm, float64: the same quantity (tests/meta/test_laplace_torch.py's
    # tolerances). Narrower (16 filters) than the measured network: this checks how the
    # benchmark drives laplace-torch, which does not depend on the width.
    # On the CPU whatever the device: it checks the driving code, not a device's arithmetic.
    _, post64, sx64, sy64, qx64 = conv4_posterior(
        1, "cpu", functools.partial(conv4_bias_free, batch_norm=False, hidden=16), torch.float64)
    ours = post64.predict(qx64, pred_type="glm")
    theirs = laplace_torch_glm(laplace_copy(post64.model), post64.params, sx64, sy64, qx64, GLM_DAMPING)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    # The measured network and inputs (task 0), float32, BatchNorm statistics constant on both sides.
    if sx.shape[0] > 1:
        post = lf.adapt(model, sx[:1], sy[:1], loss="cross_entropy", inner_lr=0.4, damping=GLM_DAMPING)
    ours = post.predict(qx[:1], pred_type="glm")
    theirs = laplace_torch_glm(laplace_copy(model), post.params, sx[:1], sy[:1], qx[:1], GLM_DAMPING,
                               constant_statistics=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=BN_PROB_ATOL[torch.device(device).type])
    return float((ours - theirs).abs().max())


def bench_glm_predictive_vs_laplace_torch(benchmark, device, quick):
    """lf.adapt + one post.predict(pred_type="glm") for T Conv-4 tasks vs a loop of
    laplace-torch's KronLaplace fit + GLM predictive (module docstring)."""
    pytest.importorskip("laplace", reason="laplace-torch is not installed (pip install laplace-torch)")
    T = QUICK_TASKS["glm"] if quick else TASKS
    model, post, sx, sy, qx = conv4_posterior(T, device, conv4_bias_free)
    benchmark.extra_info["max_prob_diff_constant_statistics"] = check_against_laplace_torch(
        model, post, sx, sy, qx, device)
    copied = laplace_copy(model)
    params = {k: v.detach() for k, v in post.params.items()}
    results = {}

    def kernels():
        results["llama_fast"] = llama_glm(model, sx, sy, qx, GLM_DAMPING)

    def laplace_torch():
        results["laplace-torch"] = laplace_torch_glm(copied, params, sx, sy, qx, GLM_DAMPING)

    benchmark.group = f"glm predictive conv4-omniglot T={T} M={CONV4_QUERIES} vs laplace-torch {device}"
    paired(benchmark, kernels, laplace_torch, device, quick=quick)
    # laplace-torch as timed differentiates through the query batch's BatchNorm statistics.
    benchmark.extra_info["max_prob_diff_laplace_torch"] = float(
        (results["llama_fast"] - results["laplace-torch"]).abs().max())
