"""torch.compile: the curvature part of meta_step (kfac_factors per vmapped call on captured
rows, low-rank A included, then one kron_logdet over the calls' concatenated factors) traces
into one graph through the ops' fake registrations and matches eager in value and gradient.
(aot_eager keeps the test fast; the inductor backend was also checked by hand, see README
"torch.compile".)"""

import pytest
import torch

from llama_fast.meta.factors import curvature_factors, curvature_logdet


def test_curvature_logdet_compiles_fullgraph(rng):
    # Layer 0 dense (more rows than width), layer 1 low rank (5 rows, width 33), layer 2 bias-free.
    a = [torch.randn(3, 12, 4, generator=rng), torch.randn(3, 5, 32, generator=rng),
         torch.randn(3, 6, 7, generator=rng)]
    g = [torch.randn(3, 30, 6, generator=rng), torch.randn(3, 15, 3, generator=rng),
         torch.randn(3, 6, 2, generator=rng)]
    a = [x.requires_grad_() for x in a]
    g = [x.requires_grad_() for x in g]

    def logdet(a, g):   # two vmapped calls: tasks [0, 1) and [1, 3)
        biases = [True, True, False]
        calls = [curvature_factors([x[span] for x in a], [x[span] for x in g], biases, "kernels")
                 for span in (slice(0, 1), slice(1, 3))]
        return curvature_logdet(calls, torch.tensor([0.5, 0.7, 0.9]), 1.5, "kernels")

    compiled = torch.compile(logdet, backend="aot_eager", fullgraph=True)
    got, expected = compiled(a, g), logdet(a, g)
    torch.testing.assert_close(got, expected)
    whole = curvature_logdet([curvature_factors(a, g, [True, True, False], "kernels")],
                             torch.tensor([0.5, 0.7, 0.9]), 1.5, "kernels")
    torch.testing.assert_close(expected, whole)   # the concatenated calls = one call for all
    weights = torch.randn(3, generator=rng)
    grads = torch.autograd.grad((got * weights).sum(), a + g)
    want = torch.autograd.grad((expected * weights).sum(), a + g)
    for x, y in zip(grads, want):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("network", ["mlp", "conv4"])
def test_meta_objective_compiles_with_graph_breaks(network, rng):
    """torch.compile (fullgraph=False) of the whole second-order LLAMA objective: dynamo traces
    the vmapped inner loop (torch.func) and the curvature; the hook registration is a graph
    break; Conv-4's BatchNorm -> ReLU -> max-pool blocks take their reverse steps one by one
    (dynamo cannot vmap backprop.BlockInputGrad). The meta-gradient equals eager's."""
    import llama_fast as lf
    from llama_fast.meta.step import meta_objective

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    if network == "mlp":
        net, loss, steps = lf.models.mlp(hidden=(6, 6)), "mse", 2
        x = lambda k: torch.randn(2, k, 1, generator=rng)
        y = lambda k: torch.randn(2, k, 1, generator=rng)
    else:
        # float64: eager's fused block and the compiled steps round differently in float32
        net = lf.models.conv4(in_channels=1, ways=3, hidden=4, image_size=16).double()
        loss, steps = "cross_entropy", 1
        x = lambda k: torch.randn(2, k, 1, 16, 16, generator=rng, dtype=torch.float64)
        y = lambda k: torch.randint(0, 3, (2, k), generator=rng)
    batch = lf.TaskBatch(x(5), y(5), x(7), y(7))

    def objective(batch):
        return meta_objective(net, batch, algorithm="llama", loss=loss, inner_lr=0.1, inner_steps=steps,
                              eta=0.1, damping=0.5)[0]

    compiled = torch.compile(objective, backend="aot_eager")
    want = torch.autograd.grad(objective(batch), list(net.parameters()))
    got = torch.autograd.grad(compiled(batch), list(net.parameters()))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
