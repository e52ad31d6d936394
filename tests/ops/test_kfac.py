"""kfac_factors against the pure-torch reference: values, gradients, registration, bad input."""

import pytest
import torch
from torch.library import opcheck

import llama_fast as lf
from llama_fast.ops import reference

# (T, N, i, M, o): T 1..64, N 1..2000, i/o 1..600; wide, tall, tiny and odd sizes.
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 5, 4, 7),
    (64, 8, 17, 9, 3),
    (5, 2000, 3, 1500, 2),
    (3, 40, 600, 30, 64),
    (2, 7, 600, 5, 600),
    (1, 2000, 130, 2000, 70),
    (17, 33, 65, 12, 129),
    (8, 257, 40, 300, 33),
    (4, 1, 600, 1, 1),
    (32, 10, 40, 10, 40),
]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
CPU_PATHS = ["auto", "portable", "blas"]


def randn(*shape, generator, dtype=torch.float32, device="cpu"):
    """Random normal data drawn on the CPU generator, then moved (same values on any device)."""
    return torch.randn(*shape, generator=generator, dtype=dtype).to(device)


@pytest.fixture(params=CPU_PATHS)
def cpu_path(request, monkeypatch):
    """Runs a CPU test under each CPU kernel path (portable is the CUDA kernel's arithmetic)."""
    monkeypatch.setenv("LLAMA_FAST_CPU_GRAM", request.param)
    return request.param


def assert_factor_close(out, x, bias, scale, rng, dtype):
    """|out - exact| <= tol * scale * |xbar|^T |xbar| elementwise (the dot-product error scale),
    with the exact value from a float64 reference on the same inputs; out exactly symmetric."""
    exact = reference.kfac_factors(x.double(), x.double(), bias, scale, 1.0)[0]
    xa = x.double().abs()
    bound = reference.kfac_factors(xa, xa, bias, abs(scale), 1.0)[0]
    err = (out.double() - exact).abs()
    worst = (err / (bound * TOL[dtype] + 1e-300)).max().item()
    assert worst <= 1.0, f"error {worst:.3g} x tolerance (seed {rng.initial_seed()})"
    assert torch.equal(out, out.transpose(-1, -2)), "factor is not exactly symmetric"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_over_shapes(device, cpu_path, shape, bias, dtype, rng):
    if device.type == "cuda" and cpu_path != "auto":
        pytest.skip("CPU path choice does not apply to CUDA")
    T, N, i, M, o = shape
    a = randn(T, N, i, generator=rng, dtype=dtype, device=device)
    g = randn(T, M, o, generator=rng, dtype=dtype, device=device)
    A, G = lf.kfac_factors(a, g, bias=bias, g_scale=0.5)
    assert A.shape == (T, i + bias, i + bias) and G.shape == (T, o, o)
    assert A.dtype == dtype and A.device == a.device
    assert_factor_close(A.cpu(), a.cpu(), bias, 1.0 / N, rng, dtype)
    assert_factor_close(G.cpu(), g.cpu(), False, 0.5, rng, dtype)


def network_layers(T, rng, device, dtype=torch.float32, layers=5):
    shapes = [((T, 50, 9), (T, 60, 16)), ((T, 20, 145), (T, 33, 16)), ((T, 4, 64), (T, 4, 5)),
              ((T, 1, 1), (T, 2, 1)), ((T, 300, 7), (T, 300, 3))]
    shapes = (shapes * (layers // len(shapes) + 1))[:layers]
    a = [randn(*sa, generator=rng, dtype=dtype, device=device) for sa, _ in shapes]
    g = [randn(*sg, generator=rng, dtype=dtype, device=device) for _, sg in shapes]
    return a, g


@pytest.mark.parametrize("layers", [5, 21])  # 21 layers = 42 problems: two CUDA launches
def test_layer_lists_match_reference(device, cpu_path, layers, rng):
    if device.type == "cuda" and cpu_path != "auto":
        pytest.skip("CPU path choice does not apply to CUDA")
    a, g = network_layers(6, rng, device, layers=layers)
    bias = [l % 2 == 0 for l in range(layers)]
    a_scale = [None if l % 3 else 0.25 for l in range(layers)]
    g_scale = [1.0 + l for l in range(layers)]
    A, G = lf.kfac_factors(a, g, bias=bias, a_scale=a_scale, g_scale=g_scale)
    assert len(A) == len(G) == layers
    for l in range(layers):
        scale = a_scale[l] if a_scale[l] is not None else 1.0 / a[l].shape[1]
        assert_factor_close(A[l].cpu(), a[l].cpu(), bias[l], scale, rng, torch.float32)
        assert_factor_close(G[l].cpu(), g[l].cpu(), False, g_scale[l], rng, torch.float32)


def test_list_of_pairs_equals_two_lists(device, rng):
    a, g = network_layers(3, rng, device)
    A1, G1 = lf.kfac_factors(a, g)
    A2, G2 = lf.kfac_factors(list(zip(a, g)))
    for x, y in zip(A1 + G1, A2 + G2):
        assert torch.equal(x, y)


def test_non_contiguous_inputs(device, cpu_path, rng):
    if device.type == "cuda" and cpu_path != "auto":
        pytest.skip("CPU path choice does not apply to CUDA")
    base = randn(4, 70, 90, generator=rng, device=device)
    variants = {
        "transposed": base.transpose(1, 2)[:, :, :50],  # column stride != 1
        "strided": base[:, ::3, 1::2],
        "task-broadcast": base[:1, :20, :30].expand(4, 20, 30),
    }
    for name, a in variants.items():
        g = a[..., : min(a.shape[-1], 33)] * 2
        A, G = lf.kfac_factors(a, g)
        assert_factor_close(A.cpu(), a.cpu(), True, 1.0 / a.shape[1], rng, torch.float32)
        assert_factor_close(G.cpu(), g.cpu(), False, 1.0, rng, torch.float32)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(device, bias, rng):
    a = randn(2, 4, 3, generator=rng, dtype=torch.float64, device=device).requires_grad_()
    g = randn(2, 5, 2, generator=rng, dtype=torch.float64, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, g: lf.kfac_factors(a, g, bias=bias, g_scale=0.7), (a, g))
    assert torch.autograd.gradgradcheck(lambda a, g: lf.kfac_factors(a, g, bias=bias), (a, g))


def test_gradcheck_layer_list(device, rng):
    a, g = network_layers(2, rng, device, dtype=torch.float64, layers=2)
    a = [x[:, :3, :4].detach().requires_grad_() for x in a]
    g = [y[:, :3, :3].detach().requires_grad_() for y in g]

    def factors(a0, a1, g0, g1):
        A, G = lf.kfac_factors([a0, a1], [g0, g1], bias=[True, False], a_scale=[None, 2.0])
        return (*A, *G)

    assert torch.autograd.gradcheck(factors, (*a, *g))


def test_gradients_match_reference_one_output_used(device, rng):
    """Only A feeds the loss: G's gradient is absent (None) and must not break backward."""
    a = randn(3, 30, 20, generator=rng, device=device).requires_grad_()
    g = randn(3, 25, 10, generator=rng, device=device).requires_grad_()
    A, _ = lf.kfac_factors(a, g)
    (A * A).sum().backward()
    a2 = a.detach().clone().requires_grad_()
    A_ref, _ = reference.kfac_factors(a2, g.detach())
    (A_ref * A_ref).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-5)
    assert g.grad is None or torch.count_nonzero(g.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype, rng):
    a, g = network_layers(3, rng, device, dtype=dtype, layers=3)
    a = [x.requires_grad_() for x in a]
    opcheck(torch.ops.llama_fast.kfac_factors.default, (a, g, [True, False, True], [0.1, 0.2, 1.0], [1.0, 1.0, 3.0]))


def test_no_layers():
    assert lf.kfac_factors([], []) == ([], [])


def test_torch_compile_fullgraph(device, rng):
    a, g = network_layers(2, rng, device, layers=2)

    def fisher_trace(a, g):
        A, G = lf.kfac_factors(a, g)
        return sum(x.diagonal(dim1=-2, dim2=-1).sum() for x in A + G)

    compiled = torch.compile(fisher_trace, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(a, g), fisher_trace(a, g))


# ---- bad input ------------------------------------------------------------------------------

def test_bad_rank_names_argument(device):
    with pytest.raises(ValueError, match=r"\ba\b.*3 dims"):
        lf.kfac_factors(torch.randn(4, 5, device=device), torch.randn(1, 4, 5, device=device))
    with pytest.raises(ValueError, match=r"g\[1\].*3 dims"):
        lf.kfac_factors([torch.randn(2, 3, 4, device=device)] * 2,
                        [torch.randn(2, 3, 4, device=device), torch.randn(3, 4, device=device)])


def test_mismatched_tasks(device):
    with pytest.raises(ValueError, match=r"\bg\b has T=3"):
        lf.kfac_factors(torch.randn(2, 5, 4, device=device), torch.randn(3, 5, 4, device=device))


def test_dtype_mix_and_int_tensors(device):
    with pytest.raises(ValueError, match=r"\bg\b has dtype torch.float64"):
        lf.kfac_factors(torch.randn(2, 5, 4, device=device),
                        torch.randn(2, 5, 4, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"\ba\b must be float32 or float64, got torch.int64"):
        lf.kfac_factors(torch.ones(2, 5, 4, dtype=torch.long, device=device), torch.randn(2, 5, 4, device=device))
    with pytest.raises(ValueError, match="float32 or float64"):
        lf.kfac_factors(torch.randn(2, 5, 4, device=device).half(), torch.randn(2, 5, 4, device=device).half())


def test_empty_rows_and_bad_settings(device):
    a, g = torch.randn(2, 5, 4, device=device), torch.randn(2, 5, 3, device=device)
    with pytest.raises(ValueError, match=r"\ba\b needs at least one row"):
        lf.kfac_factors(a[:, :0], g)
    with pytest.raises(ValueError, match=r"bias has 3 entries but there are 2 layers"):
        lf.kfac_factors([a, a], [g, g], bias=[True, True, False])
    with pytest.raises(ValueError, match="a_scale must be finite"):
        lf.kfac_factors(a, g, a_scale=float("nan"))
    with pytest.raises(TypeError, match=r"\bg\b must be a torch.Tensor"):
        lf.kfac_factors(a)
    with pytest.raises(ValueError, match="one tensor per layer"):
        lf.kfac_factors([a, a], [g])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("zero", ["a", "g"])
def test_zero_width_layers_give_empty_factors(device, cpu_path, zero, bias, rng):
    """A layer with no inputs or no outputs has an empty factor (a [T, 1, 1] ones-only A with a
    bias), as the reference gives it, on every CPU path: no crash (the portable path divided by
    a zero tile count: SIGFPE)."""
    if device.type == "cuda" and cpu_path != "auto":
        pytest.skip("CPU path choice does not apply to CUDA")
    a = randn(3, 5, 0 if zero == "a" else 2, generator=rng, device=device)
    g = randn(3, 5, 0 if zero == "g" else 2, generator=rng, device=device)
    A, G = lf.kfac_factors(a, g, bias=bias)
    A_ref, G_ref = reference.kfac_factors(a, g, bias=bias)
    assert A.shape == A_ref.shape and G.shape == G_ref.shape
    torch.testing.assert_close(A, A_ref)
    torch.testing.assert_close(G, G_ref)


def test_check_finite(device):
    a, g = torch.randn(2, 5, 4, device=device), torch.randn(2, 5, 3, device=device)
    a[1, 2, 3] = float("nan")
    g[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"\ba\b contains NaN or Inf"):
        lf.kfac_factors(a, g, check_finite=True)
    with pytest.raises(ValueError, match=r"g\[1\] contains NaN or Inf"):
        lf.kfac_factors([a.nan_to_num(), a.nan_to_num()], [g.nan_to_num(), g], check_finite=True)
    A, _ = lf.kfac_factors(a, g)  # unchecked: NaN propagates, no crash
    assert torch.isnan(A[1]).any() and not torch.isnan(A[0]).any()


def test_raw_op_checks_in_cpp():
    """The compiled op validates too, for users of torch.ops.llama_fast directly."""
    with pytest.raises(RuntimeError, match=r"a\[0\] must have shape \[T, N, features\]"):
        torch.ops.llama_fast.kfac_factors([torch.randn(3, 4)], [torch.randn(1, 3, 4)], [True], [1.0], [1.0])
    with pytest.raises(RuntimeError, match=r"g\[0\] has T=2 tasks but a\[0\] has T=1"):
        torch.ops.llama_fast.kfac_factors([torch.randn(1, 3, 4)], [torch.randn(2, 3, 4)], [True], [1.0], [1.0])
    with pytest.raises(RuntimeError, match="one entry per layer"):
        torch.ops.llama_fast.kfac_factors([torch.randn(1, 3, 4)], [torch.randn(1, 3, 4)], [], [1.0], [1.0])


@pytest.mark.cuda
def test_cpu_cuda_mix():
    if not torch.cuda.is_available():
        pytest.skip("no GPU: CUDA kernels are compiled but cannot run here")
    with pytest.raises(ValueError, match=r"\bg\b is on cuda:0 but a is on cpu"):
        lf.kfac_factors(torch.randn(2, 5, 4), torch.randn(2, 5, 4, device="cuda"))
    with pytest.raises(RuntimeError, match=r"g\[0\] is on cuda"):
        torch.ops.llama_fast.kfac_factors([torch.randn(1, 3, 4)], [torch.randn(1, 3, 4, device="cuda")], [True], [1.0], [1.0])


@pytest.mark.cuda
def test_cuda_current_stream(rng):
    """The kernel runs on the current stream: results are right when read on that stream."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU: CUDA kernels are compiled but cannot run here")
    a, g = network_layers(8, rng, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        A, G = lf.kfac_factors(a, g)
        A_ref, G_ref = reference.kfac_factors(a, g)
        for x, y in zip(A + G, A_ref + G_ref):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    torch.cuda.synchronize()


@pytest.mark.parametrize("which", ["a_scale", "g_scale"])
def test_scale_tensor_gets_its_gradient(which, rng):
    """A scale tensor that requires grad was turned into a float (torch warned, no gradient):
    the factor now depends on it (gradcheck); with low_rank=True it is a clear error."""
    a = torch.randn(2, 5, 3, generator=rng, dtype=torch.float64)
    g = torch.randn(2, 5, 2, generator=rng, dtype=torch.float64)
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda s: lf.kfac_factors(a, g, **{which: s}), (s,))
    for got, want in zip(lf.kfac_factors([a, a], [g, g], **{which: [s, 0.5]}),
                         lf.kfac_factors([a, a], [g, g], **{which: [0.3, 0.5]})):
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="require grad need low_rank=False"):
        lf.kfac_factors(a, g, low_rank=True, **{which: s})
