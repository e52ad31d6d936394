"""torch.compile: the curvature part of meta_step (kfac_factors + kron_logdet on captured rows,
low-rank A included) traces into one graph through the ops' fake registrations and matches
eager in value and gradient. (aot_eager keeps the test fast; the inductor backend was also
checked by hand, see README "torch.compile".)"""

import torch

from llama_fast.meta import curvature_logdet


def test_curvature_logdet_compiles_fullgraph(rng):
    # Layer 0 dense (more rows than width), layer 1 low rank (5 rows, width 33), layer 2 bias-free.
    a = [torch.randn(3, 12, 4, generator=rng), torch.randn(3, 5, 32, generator=rng),
         torch.randn(3, 6, 7, generator=rng)]
    g = [torch.randn(3, 30, 6, generator=rng), torch.randn(3, 15, 3, generator=rng),
         torch.randn(3, 6, 2, generator=rng)]
    a = [x.requires_grad_() for x in a]
    g = [x.requires_grad_() for x in g]

    def logdet(a, g):
        return curvature_logdet(a, g, [True, True, False], 0.5, 1.5, "kernels")

    compiled = torch.compile(logdet, backend="aot_eager", fullgraph=True)
    got, expected = compiled(a, g), logdet(a, g)
    torch.testing.assert_close(got, expected)
    weights = torch.randn(3, generator=rng)
    grads = torch.autograd.grad((got * weights).sum(), a + g)
    want = torch.autograd.grad((expected * weights).sum(), a + g)
    for x, y in zip(grads, want):
        torch.testing.assert_close(x, y)


def test_meta_objective_compiles_with_graph_breaks(rng):
    """torch.compile (fullgraph=False) of the whole second-order LLAMA objective: dynamo traces
    the vmapped inner loop (torch.func) and the curvature; the hook registration is a graph
    break. The meta-gradient equals eager's."""
    import llama_fast as lf
    from llama_fast.meta import meta_objective

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    net = lf.models.mlp(hidden=(6, 6))
    batch = lf.TaskBatch(torch.randn(2, 5, 1, generator=rng), torch.randn(2, 5, 1, generator=rng),
                         torch.randn(2, 7, 1, generator=rng), torch.randn(2, 7, 1, generator=rng))

    def objective(batch):
        return meta_objective(net, batch, algorithm="llama", loss="mse", inner_lr=0.1, inner_steps=2,
                              eta=0.1, damping=0.5)[0]

    compiled = torch.compile(objective, backend="aot_eager")
    want = torch.autograd.grad(objective(batch), list(net.parameters()))
    got = torch.autograd.grad(compiled(batch), list(net.parameters()))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
