"""KronCurvature: the per-task K-FAC Laplace posterior precision of a network, with its
eigendecompositions cached.

Per layer ``H_l = s * (G_l (x) A_l) + delta * I`` (docs/ops.md, "Conventions"). Building one runs the
eigendecompositions of every factor once (``torch.ops.llama_fast.kron_logdet_exact``); the
log-determinant is then at hand, differentiable, and the eigenbases are kept for what needs
them next: posterior sampling (``sample``: the fused op ``torch.ops.llama_fast.kron_scaled_normal``
draws the eigenbasis coordinates, two batched matmuls rotate them), ``solve`` (``H^-1 v``) and
``precision_matvec`` (``H v``).

Matrices ``V`` of a layer are shaped like its homogeneous weight ``[o, i']`` (G is o x o, A is
i' x i'); with PyTorch's row-major vec, ``H vec(V) = vec(s * G V A + delta * V)``.

Low-rank ``A = s_a * R^T R`` (R = abar rows ``[T, N, i']``) is never materialised: with the
dual's eigendecomposition ``s_a R R^T = U diag(Lambda) U^T``, the orthonormal eigenvectors of A
with nonzero eigenvalues are ``V_A = sqrt(s_a) R^T U Lambda^(-1/2)`` (``[T, i', N]``; columns
of Lambda below ``N_max * eps * max Lambda`` are treated as zeros and dropped, i.e. zeroed), and
every direction orthogonal to them has eigenvalue 0 (precision exactly ``delta`` there). A G
built from fewer rows M than its width o (``g`` rows ``[T, M, o]``, no bias column) is held the
same way. With bases V_G, V_A (the full eigenvectors for a dense factor), H acts as
``s mu lambda + delta`` on ``V_G C V_A^T`` and as ``delta`` on the rest,
``V - V_G (V_G^T V V_A) V_A^T``; sampling, solves and the function-space covariance
(``functional_covariance``: ``J H^-1 J^T`` of a linearised predictive) use exactly that split.
"""

import copy
import math
import numbers

import torch

from . import _checks
from .covariance import project_rows
from .kfac import _as_layer_lists
from .lowrank import LowRankFactor

__all__ = ["KronCurvature"]

MODES = ("exact",)


def damping_tensor(damping, tasks, layers, like, check):
    """The damping as a tensor: ``[T]`` (one delta per task, shared by the layers) or
    ``[T, L]`` (per layer) from a float, a tensor ``[]``, ``[T]`` or ``[T, L]``, or a sequence
    of L floats (one per layer)."""
    if isinstance(damping, (list, tuple)):
        if len(damping) != layers:
            raise ValueError(f"damping as a sequence gives one delta per layer: expected {layers} "
                             f"values, got {len(damping)}")
        values = [float(x) for x in damping]
        if not all(math.isfinite(x) and x > 0 for x in values):
            raise ValueError(f"damping must be positive and finite, got {values}")
        return torch.tensor(values, dtype=like.dtype, device=like.device).expand(tasks, layers)
    if isinstance(damping, torch.Tensor):
        _checks.check_tensor(damping, "damping")
        if damping.dim() == 0:
            damping = damping.expand(tasks)
        if damping.shape not in ((tasks,), (tasks, layers)):
            raise ValueError(f"damping must be a float, a sequence of {layers} floats (per layer) or a "
                             f"tensor of shape [T={tasks}] or [T={tasks}, L={layers}], got {tuple(damping.shape)}")
        if damping.dtype != like.dtype or damping.device != like.device:
            raise ValueError(f"damping must have the factors' dtype {like.dtype} and device {like.device}, "
                             f"got {damping.dtype} on {damping.device}")
        if check and not bool((damping > 0).all() & torch.isfinite(damping).all()):
            raise ValueError("damping must be positive and finite")
        return damping
    value = float(damping)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"damping must be positive and finite, got {value}")
    return torch.full((tasks,), value, dtype=like.dtype, device=like.device)


def layer_damping(damping, l):
    """Layer l's delta ``[T]`` from a damping ``[T]`` or ``[T, L]``."""
    return damping if damping.dim() == 1 else damping[:, l]


def _check_factors(A_list, G_list, check):
    """Each factor a [T, d, d] float tensor or a LowRankFactor (its rows are checked; a G's
    rows have no bias column), all with one T, dtype and device; with `check`, finite and
    symmetric. Returns T."""
    names, tensors = [], []
    T = None
    for l, (A, G) in enumerate(zip(A_list, G_list)):
        for x, kind in ((A, "A"), (G, "G")):
            name = f"{kind}[{l}]" if len(A_list) > 1 else kind
            low_rank = isinstance(x, LowRankFactor)
            if low_rank:
                if kind == "G" and x.bias:
                    raise ValueError(f"{name} is a LowRankFactor with bias=True; G's rows have no bias column")
                x, name = x.rows, f"{name}.rows"
            _checks.check_tensor(x, name, ndim=3)
            if not low_rank and x.shape[1] != x.shape[2]:
                raise ValueError(f"{name} must be square [T, d, d], got {tuple(x.shape)}")
            T = x.shape[0] if T is None else T
            if x.shape[0] != T:
                raise ValueError(f"{name} has T={x.shape[0]} tasks but {names[0]} has T={T}")
            if check:
                _checks.check_finite(x, name)
                if not low_rank:
                    _checks.check_symmetric(x, name)
            names.append(name)
            tensors.append(x)
    _checks.check_same(tensors, names)
    return T


def prepare_factors(A, G, damping, scale, check):
    """Validated layer lists, task count, per-task damping tensor and scale (shared by every
    log-det mode)."""
    A_list, G_list, _ = _as_layer_lists(A, G, names=("A", "G"))
    if not A_list:
        raise ValueError("kron_logdet needs at least one layer")
    tasks = _check_factors(A_list, G_list, check)
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    like = A_list[0].rows if isinstance(A_list[0], LowRankFactor) else A_list[0]
    return A_list, G_list, tasks, damping_tensor(damping, tasks, len(A_list), like, check), scale


class KronCurvature:
    """K-FAC curvature ``H_l = s * (G_l (x) A_l) + delta * I`` of every layer of T tasks.

    Args:
        A, G: factors as for :func:`llama_fast.kron_logdet` (tensors ``[T, d, d]``, lists of
            them, a list of ``(A, G)`` pairs; an ``A`` or ``G`` may be a ``LowRankFactor``).
        damping: ``delta > 0``: a float, a per-task tensor ``[T]``, or per layer: a sequence
            of L floats or a tensor ``[T, L]`` (``H_l`` then has ``delta_l``).
        scale: ``s > 0``.
        mode: "exact".
        check: validate symmetry, finiteness and damping positivity (syncs with the host).

    Attributes:
        evals_A, evecs_A, evals_G, evecs_G: per-layer eigendecompositions (ascending), detached.
            For a low-rank factor they are those of its dual Gram matrix ``[T, N, N]``.
        damping: the damping tensor, ``[T]`` or (per layer) ``[T, L]``.
    """

    def __init__(self, A, G=None, damping=1.0, scale=1.0, mode="exact", *, check=False):
        if mode not in MODES:
            raise ValueError(f"KronCurvature supports mode {MODES}, got {mode!r} "
                             "(kron_logdet also has mode='factored')")
        A_list, G_list, self.tasks, self.damping, self.scale = prepare_factors(A, G, damping, scale, check)
        self.factors_A, self.factors_G = A_list, G_list
        dense_A, dense_G = ([x.dual() if isinstance(x, LowRankFactor) else x for x in xs] for xs in (A_list, G_list))
        if self.damping.dim() == 1:
            out = torch.ops.llama_fast.kron_logdet_exact(dense_A, dense_G, self.damping, self.scale)
            logdet, decompositions = out[0], out[1:]
        else:   # per-layer deltas: one call per layer (the op takes one delta per task)
            outs = [torch.ops.llama_fast.kron_logdet_exact([A], [G], self.damping[:, l], self.scale)
                    for l, (A, G) in enumerate(zip(dense_A, dense_G))]
            logdet = sum(out[0] for out in outs)
            decompositions = [[out[k][0] for out in outs] for k in range(1, 5)]
        self._logdet = logdet + self._null_logdet(self.damping)
        self.evals_A, self.evecs_A, self.evals_G, self.evecs_G = (list(x) for x in decompositions)

    def null_pairs(self, l) -> int:
        """Eigenvalue pairs (lambda, mu) of layer l that a low-rank factor leaves out: one of
        them is an exact zero there, so each contributes log(delta_l)."""
        A, G = self.factors_A[l], self.factors_G[l]
        return A.shape[-1] * G.shape[-1] - _rank(A) * _rank(G)

    def _null_logdet(self, damping):
        """sum_l null_pairs(l) * log(delta_l), [T]."""
        total = 0
        for l in range(self.layers):
            if self.null_pairs(l):
                total = total + self.null_pairs(l) * torch.log(layer_damping(damping, l))
        return total

    @property
    def layers(self) -> int:
        return len(self.factors_A)

    def logdet(self) -> torch.Tensor:
        """``sum_l log det H_l`` per task, ``[T]``; differentiable (single backward)."""
        return self._logdet

    def with_damping(self, damping) -> "KronCurvature":
        """The same curvature with another ``delta`` (any form the constructor takes).

        No eigendecomposition is redone: the copy shares the cached eigenbases (they do not
        depend on delta), so trying a grid of deltas costs one decomposition. Its log-det is
        re-summed from the cached eigenvalues and is a constant (no gradient to the factors);
        build a new ``KronCurvature`` where that gradient is needed.
        """
        return self._with(damping_tensor(damping, self.tasks, self.layers, self.evals_G[0], check=True),
                          self.scale)

    def with_scale(self, scale) -> "KronCurvature":
        """The same curvature with another ``s`` (e.g. ``1 / sigma^2`` for a refitted Gaussian
        noise): shared eigenbases, a constant log-det, as :meth:`with_damping`."""
        return self._with(self.damping, _positive_scale(scale))

    def _with(self, damping, scale):
        other = copy.copy(self)
        other.damping, other.scale = damping, scale
        evals_A = [lam.detach() for lam in self.evals_A]
        evals_G = [mu.detach() for mu in self.evals_G]
        if damping.dim() == 1:
            logdet = torch.ops.llama_fast.kron_logdet_from_eigs(evals_A, evals_G, damping, scale)
        else:
            logdet = sum(torch.ops.llama_fast.kron_logdet_from_eigs([lam], [mu], damping[:, l], scale)
                         for l, (lam, mu) in enumerate(zip(evals_A, evals_G)))
        other._logdet = logdet + self._null_logdet(damping)
        # The low-rank bases depend on neither: one cache for both (filled by either).
        other.__dict__["_basis_cache"] = self.__dict__.setdefault("_basis_cache", {})
        return other

    # ---- sampling, solves, products -----------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.damping.dtype

    @property
    def device(self) -> torch.device:
        return self.damping.device

    def layer_shape(self, l: int) -> tuple:
        """``(o, i')``: the shape of layer l's homogeneous weight (G is o x o, A is i' x i')."""
        return self.factors_G[l].shape[-1], self.factors_A[l].shape[-1]

    def _per_layer(self, X, name, exact):
        """(list of per-layer tensors, single) for a tensor (one layer) or a list per layer;
        each shaped ``[T, o, i']`` (``exact``) or ``[..., T, o, i']``, with the factors' dtype
        and device."""
        single = isinstance(X, torch.Tensor)
        if single:
            if self.layers != 1:
                raise ValueError(f"{name} must be a list with one tensor per layer ({self.layers} "
                                 "layers), got a single tensor")
            X = [X]
        elif not isinstance(X, (list, tuple)):
            raise TypeError(f"{name} must be a tensor or a list of tensors (one per layer), "
                            f"got {type(X).__name__}")
        if len(X) != self.layers:
            raise ValueError(f"{name} has {len(X)} entries but the curvature has {self.layers} layers")
        for l, x in enumerate(X):
            nm = f"{name}[{l}]" if not single else name
            _checks.check_tensor(x, nm)
            o, i = self.layer_shape(l)
            want = (self.tasks, o, i)
            if (x.dim() != 3 if exact else x.dim() < 3) or tuple(x.shape[-3:]) != want:
                lead = "" if exact else "..., "
                raise ValueError(f"{nm} must have shape [{lead}T={self.tasks}, o={o}, i'={i}] "
                                 f"(layer {l}: G is {o} x {o}, A is {i} x {i}), got {tuple(x.shape)}")
            if x.dtype != self.dtype or x.device != self.device:
                raise ValueError(f"{nm} must have the factors' dtype {self.dtype} and device "
                                 f"{self.device}, got {x.dtype} on {x.device}")
        return list(X), single

    def _low_rank(self, l):
        """(A is low-rank, G is low-rank) for layer l."""
        return isinstance(self.factors_A[l], LowRankFactor), isinstance(self.factors_G[l], LowRankFactor)

    def _basis(self, l, kind):
        """(V [T, width, r], eigenvalues [T, r]) of layer l's factor `kind` ("A" or "G"): for a
        dense factor its eigendecomposition; for a low-rank one (cached) the orthonormal
        eigenvectors of the nonzero eigenvalues, dropped (tiny) ones a zero column and 0."""
        factor = (self.factors_A if kind == "A" else self.factors_G)[l]
        evals = (self.evals_A if kind == "A" else self.evals_G)[l].detach()
        evecs = (self.evecs_A if kind == "A" else self.evecs_G)[l].detach()
        if not isinstance(factor, LowRankFactor):
            return evecs, evals
        cache = self.__dict__.setdefault("_basis_cache", {})
        if (kind, l) not in cache:
            tol = evals.amax(-1, keepdim=True).clamp_min(0) * max(evals.shape[-1], 1) * torch.finfo(evals.dtype).eps
            keep = evals > tol
            lam = torch.where(keep, evals, torch.zeros_like(evals))
            inv_root = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), torch.zeros_like(lam))
            V = math.sqrt(factor.scale) * (factor.rows_bar().detach().mT @ evecs) * inv_root.unsqueeze(-2)
            cache[(kind, l)] = (V, lam)
        return cache[(kind, l)]

    def sample(self, mean, num_samples=1, generator=None):
        """Draws ``phi ~ N(mean, H^-1)`` for every task and layer.

        Per layer ``phi = mean + Q_G [Z * (s mu lambda^T + delta)^(-1/2)] Q_A^T``, Z iid N(0, 1)
        from ``generator`` (a ``torch.Generator`` on the factors' device) or the device's
        default generator (``torch.manual_seed`` governs it). Low-rank factors: ``V_G [Z_1 *
        (s mu Lambda^T + delta)^(-1/2)] V_A^T + delta^(-1/2) (Z_2 - V_G V_G^T Z_2 V_A V_A^T)``
        (V_G = Q_G for a dense G, and so on), with no i' x i' matrix formed. All layers'
        normals come from one op call.

        Args:
            mean: ``[T, o, i']`` for a one-layer curvature, or a list with one per layer.
            num_samples: S >= 1.

        Returns:
            ``[S, T, o, i']`` (a list of them for list input). Differentiable with respect to
            ``mean`` (reparameterisation: the Jacobian is the identity); the factors, damping
            and scale are constants here (no gradient flows to them through the draw).
        """
        means, single = self._per_layer(mean, "mean", exact=True)
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        S = int(num_samples)
        if S < 1:
            raise ValueError(f"num_samples must be >= 1, got {S}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
            if generator.device.type != self.device.type:
                raise ValueError(f"generator is on {generator.device} but the factors are on {self.device}")
        Z, Z_null = self._scaled_normals(S, generator)
        out = []
        for l in range(self.layers):
            (V_A, _), (V_G, _) = self._basis(l, "A"), self._basis(l, "G")
            low_A, low_G = self._low_rank(l)
            if low_G:
                # E = Zn + V_G [Z_1 - V_G^T Zn V_A] V_A^T (small layers: G narrower than its rows)
                Zn = Z_null[l]
                E = Zn + V_G @ (Z[l] - V_G.mT @ Zn @ V_A) @ V_A.mT
                out.append(E + means[l])
            elif low_A:
                GZ = _fold(torch.matmul(V_G, Z[l]))  # [T, S*o, a]
                Zn = _fold(Z_null[l])  # [T, S*o, i']
                # The same with V_G = Q_G square (V_G V_G^T = I): E = Zn + (Q_G Z_1 - Zn V_A) V_A^T,
                # one product with V_A^T for both parts.
                E = _unfold(torch.baddbmm(Zn, GZ - torch.bmm(Zn, V_A), V_A.mT), S)
                out.append(E.contiguous() + means[l])
            else:
                out.append(_rotate_draws(V_G, Z[l], V_A, means[l]))
        return out[0] if single else out

    # ---- the function-space covariance of a linearised predictive -----------------------------

    def jacobian_coordinates(self, a, g, tasks=None, *, check_finite=True):
        """The network Jacobians of M inputs' K outputs in the cached eigenbases, per layer.

        Args:
            a: per layer, the input rows ``[T, M, R, i']`` of each input (bias column of ones
                included where the layer has a bias; R positions: a convolution's patches, 1
                for a linear layer).
            g: per layer, the rows ``[T, M, K, R, o]``: output k's gradient with respect to
                the layer's pre-activation at each position.
            (A tensor for a one-layer curvature, else lists with one per layer.)

        Returns:
            ``(rotated, residual)``: per layer ``U^T J_k V`` ``[T, M, K, g, a]`` (``J_k =
            sum_r g_k,r a_r^T``), and ``[L, T, M, K, K]`` Gram matrices of the Jacobians'
            parts outside the bases of low-rank factors (None if every factor is dense). They
            do not depend on delta or s: :meth:`functional_covariance` reuses them for any.

        ``tasks``: a ``slice`` of this curvature's tasks that the rows belong to (their T is
        its length), so that the tasks can be taken a few at a time. ``check_finite=False``
        skips the scan for NaN / Inf in the rows (a ValueError naming the row tensor
        otherwise): for rows the caller computed itself, whose non-finite entries should reach
        the output as NaN, as :meth:`TaskPosterior.functional_covariance`'s do.
        """
        span = self._task_span(tasks)
        a_list, g_list = self._jacobian_rows(a, g, span, check_finite)
        rotated, residuals = [], []
        for l, (a_l, g_l) in enumerate(zip(a_list, g_list)):
            basis_G = tuple(x[span] for x in self._basis(l, "G"))
            basis_A = tuple(x[span] for x in self._basis(l, "A"))
            Jh, R = project_rows(a_l, g_l, basis_G, basis_A, self._low_rank(l))
            rotated.append(Jh)
            residuals.append(R)
        if all(R is None for R in residuals):
            return rotated, None
        T, M, K = g_list[0].shape[:3]
        zero = g_list[0].new_zeros(T, M, K, K)
        return rotated, torch.stack([zero if R is None else R for R in residuals])

    def functional_covariance(self, a=None, g=None, *, coordinates=None, damping_grid=None, scale=None,
                              tasks=None, check_finite=True):
        """``J H^-1 J^T`` per task and input: the covariance of the linearised network's K
        outputs under the posterior ``N(mean, H^-1)``.

        Per layer ``sum_{p,q} Jh_k,pq Jh_j,pq / (s mu_p lambda_q + delta) + R[k, j] / delta``
        (the compiled op ``torch.ops.llama_fast.functional_covariance``).

        Args:
            a, g: Jacobian rows as for :meth:`jacobian_coordinates`; or
            coordinates: its result, to reuse for another damping or scale.
            damping_grid: None (this curvature's damping), or D dampings evaluated in one
                pass: a sequence of floats, or a tensor ``[D]``, ``[D, T]`` or ``[D, T, L]``
                (per layer).
            scale: another ``s`` (default: this curvature's), e.g. ``1 / sigma^2`` for a
                refitted Gaussian noise.
            tasks: a ``slice`` of the tasks the rows (or coordinates) belong to; default all.
            check_finite: as for :meth:`jacobian_coordinates`.

        Returns:
            ``[T, M, K, K]`` (``[D, T, M, K, K]`` with ``damping_grid``); differentiable with
            respect to the rows and the damping (the eigenbases are constants).
        """
        span = self._task_span(tasks)
        if coordinates is None:
            rotated, residual = self.jacobian_coordinates(a, g, span, check_finite=check_finite)
        elif a is not None or g is not None:
            raise ValueError("pass either the rows a, g or coordinates, not both")
        else:
            rotated, residual = coordinates
        scale = self.scale if scale is None else _positive_scale(scale)
        damping = self._damping_grid(damping_grid)[:, span]
        evals_G = [self._basis(l, "G")[1][span] for l in range(self.layers)]
        evals_A = [self._basis(l, "A")[1][span] for l in range(self.layers)]
        out = torch.ops.llama_fast.functional_covariance(rotated, evals_G, evals_A, residual, damping, scale)
        return out[0] if damping_grid is None else out

    def _task_span(self, tasks):
        if tasks is None:
            return slice(0, self.tasks)
        if not isinstance(tasks, slice) or tasks.step not in (None, 1):
            raise TypeError(f"tasks must be a slice of consecutive tasks, got {tasks!r}")
        start, stop, _ = tasks.indices(self.tasks)
        if stop <= start:
            raise ValueError(f"tasks selects no task of the curvature's {self.tasks}: {tasks!r}")
        return slice(start, stop)

    def _jacobian_rows(self, a, g, span, check_finite=True):
        """Validated per-layer lists of a [T, M, R, i'] and g [T, M, K, R, o] (one M, K; T the
        span's tasks); ``check_finite``: also refuse NaN / Inf entries."""
        single = isinstance(a, torch.Tensor)
        a_list, g_list = ([a], [g]) if single else (a, g)
        for x, name in ((a_list, "a"), (g_list, "g")):
            if not isinstance(x, (list, tuple)) or len(x) != self.layers:
                raise ValueError(f"{name} must be a tensor (one layer) or a list of {self.layers} "
                                 f"tensors (one per layer), got {type(x).__name__}")
        M = K = None
        for l, (a_l, g_l) in enumerate(zip(a_list, g_list)):
            na, ng = (f"a[{l}]", f"g[{l}]") if not single else ("a", "g")
            _checks.check_tensor(a_l, na, ndim=4)
            _checks.check_tensor(g_l, ng, ndim=5)
            o, i = self.layer_shape(l)
            M = a_l.shape[1] if M is None else M
            K = g_l.shape[2] if K is None else K
            T, R = span.stop - span.start, a_l.shape[2]
            if tuple(a_l.shape) != (T, M, R, i):
                raise ValueError(f"{na} must have shape [T={T}, M={M}, R, i'={i}] (layer {l}: A is "
                                 f"{i} x {i}, bias column included), got {tuple(a_l.shape)}")
            if tuple(g_l.shape) != (T, M, K, R, o):
                raise ValueError(f"{ng} must have shape [T={T}, M={M}, K={K}, R={R}, o={o}] "
                                 f"(layer {l}: G is {o} x {o}), got {tuple(g_l.shape)}")
            for x, nm in ((a_l, na), (g_l, ng)):
                if x.dtype != self.dtype or x.device != self.device:
                    raise ValueError(f"{nm} must have the factors' dtype {self.dtype} and device "
                                     f"{self.device}, got {x.dtype} on {x.device}")
                if check_finite:
                    _checks.check_finite(x, nm)
        return list(a_list), list(g_list)

    def _damping_grid(self, grid):
        """The op's damping ``[D, T, L]``: this curvature's (D = 1) or a validated grid."""
        T, L = self.tasks, self.layers
        if grid is None:
            delta = self.damping.detach()
            return (delta[:, None] if delta.dim() == 1 else delta).expand(T, L).unsqueeze(0)
        if not isinstance(grid, torch.Tensor):
            if not isinstance(grid, (list, tuple)) or not grid:
                raise TypeError(f"damping_grid must be a non-empty sequence of floats or a tensor, "
                                f"got {type(grid).__name__}")
            grid = torch.tensor([float(x) for x in grid], dtype=self.dtype, device=self.device)
        _checks.check_tensor(grid, "damping_grid")
        if grid.dtype != self.dtype or grid.device != self.device:
            raise ValueError(f"damping_grid must have the factors' dtype {self.dtype} and device "
                             f"{self.device}, got {grid.dtype} on {grid.device}")
        if grid.dim() == 1:
            grid = grid[:, None, None]
        elif grid.dim() == 2:
            grid = grid[:, :, None]
        if grid.dim() != 3 or grid.shape[1] not in (1, T) or grid.shape[2] not in (1, L):
            raise ValueError(f"damping_grid must have shape [D], [D, T={T}] or [D, T={T}, L={L}], "
                             f"got {tuple(grid.shape)}")
        if not bool(((grid > 0) & torch.isfinite(grid)).all()):
            raise ValueError("damping_grid must be positive and finite")
        return grid.expand(grid.shape[0], T, L)

    def _scaled_normals(self, S, generator):
        """Per layer the eigenbasis coordinates ``Z * (s mu lambda^T + delta)^(-1/2)``
        ``[S, T, o, a]``, and for layers with a low-rank factor, normals ``[S, T, o, i']``
        scaled by ``delta^(-1/2)`` for the directions outside span(V_G) (x) span(V_A): one op
        call for all layers (one per layer for per-layer deltas)."""
        groups = [list(range(self.layers))] if self.damping.dim() == 1 else [[l] for l in range(self.layers)]
        Z, Z_null = {}, {}
        for layers in groups:
            evals_A, evals_G, null_layers, null_A, null_G = [], [], [], [], []
            for l in layers:
                (_, lam), (_, mu) = self._basis(l, "A"), self._basis(l, "G")
                evals_A.append(lam)
                evals_G.append(mu)
                if any(self._low_rank(l)):
                    # Extra op entries with zero eigenvalues: normals scaled by delta^(-1/2).
                    null_layers.append(l)
                    o, i = self.layer_shape(l)
                    null_A.append(mu.new_zeros(self.tasks, i))
                    null_G.append(mu.new_zeros(self.tasks, o))
            delta = layer_damping(self.damping, layers[0]) if len(layers) == 1 else self.damping
            out = torch.ops.llama_fast.kron_scaled_normal(
                evals_A + null_A, evals_G + null_G, delta.detach().contiguous(), self.scale, S, generator)
            Z.update(zip(layers, out[:len(layers)]))
            Z_null.update(zip(null_layers, out[len(layers):]))
        return [Z[l] for l in range(self.layers)], Z_null

    def _delta(self, l):
        """Layer l's delta as ``[T, 1, 1]`` (detached)."""
        return layer_damping(self.damping, l).detach()[:, None, None]

    def _eig_denominator(self, l, mu, lam):
        """s * mu lambda^T + delta_l, [T, o, a] (negative round-off clamped to 0)."""
        return self.scale * mu.clamp_min(0).unsqueeze(-1) * lam.clamp_min(0).unsqueeze(-2) + self._delta(l)

    def solve(self, V):
        """``H^-1 v`` per layer: ``Q_G [(Q_G^T V Q_A) / (s mu lambda^T + delta)] Q_A^T``; for a
        low-rank factor, the part of V in span(V_G) (x) span(V_A) that way and
        ``(V - V_G V_G^T V V_A V_A^T) / delta`` for the rest. ``V``: ``[..., T, o, i']`` (or a list per layer); returns the same structure.
        Constants: the factors (no gradient to them); linear in V (differentiable)."""
        return self._map_layers(V, self._solve_layer)

    def precision_matvec(self, V):
        """``H v = s * G V A + delta * V`` per layer (a low-rank ``A = s_a R^T R`` through its
        rows: ``s_a (V R^T) R``, never i' x i'; a low-rank G likewise). ``V``: ``[..., T, o, i']`` (or a list per
        layer); returns the same structure. The factors are constants (detached)."""
        return self._map_layers(V, self._precision_layer)

    def _map_layers(self, V, layer_op):
        """``layer_op(l, X)`` on each layer's ``V`` with its leading dims flattened
        (``X [B, T, o, i']``), reshaped back; the same structure as ``V``."""
        Xs, single = self._per_layer(V, "V", exact=False)
        out = [layer_op(l, X.reshape(-1, *X.shape[-3:])).reshape(X.shape) for l, X in enumerate(Xs)]
        return out[0] if single else out

    def _solve_layer(self, l, X4):
        B = X4.shape[0]
        (V_A, lam), (V_G, mu) = self._basis(l, "A"), self._basis(l, "G")
        delta = self._delta(l)
        low_A, low_G = self._low_rank(l)
        if low_G:
            # V_G [Y / denominator] V_A^T + (X - V_G Y V_A^T) / delta, Y = V_G^T X V_A
            Y = V_G.mT @ X4 @ V_A
            return X4 / delta + V_G @ (Y / self._eig_denominator(l, mu, lam) - Y / delta) @ V_A.mT
        if low_A:
            Xf = _fold(X4)
            Y = torch.bmm(Xf, V_A)  # [T, B*o, N]
            core = torch.matmul(V_G.mT, _unfold(Y, B)) / self._eig_denominator(l, mu, lam)
            # (X - Y V_A^T) / delta + (Q_G core) V_A^T
            R = torch.baddbmm(Xf / delta, _fold(torch.matmul(V_G, core)) - Y / delta, V_A.mT)
        else:
            core = torch.matmul(V_G.mT, _unfold(torch.bmm(_fold(X4), V_A), B))
            R = torch.bmm(_fold(torch.matmul(V_G, core / self._eig_denominator(l, mu, lam))), V_A.mT)
        return _unfold(R, B)

    def _precision_layer(self, l, X4):
        A, G = self.factors_A[l], self.factors_G[l]
        if isinstance(A, LowRankFactor):
            R = A.rows_bar().detach()
            XA = A.scale * torch.bmm(torch.bmm(_fold(X4), R.mT), R)
        else:
            XA = torch.bmm(_fold(X4), A.detach())
        XA = _unfold(XA, X4.shape[0])
        if isinstance(G, LowRankFactor):
            R = G.rows.detach()
            GXA = G.scale * (R.mT @ (R @ XA))
        else:
            GXA = torch.matmul(G.detach(), XA)
        return self.scale * GXA + self._delta(l) * X4


def _positive_scale(scale) -> float:
    value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be positive and finite, got {value}")
    return value


def _rank(factor) -> int:
    """Rows of a LowRankFactor (its rank bound), the width of a dense one."""
    return factor.rank_bound if isinstance(factor, LowRankFactor) else factor.shape[-1]


def _rotate_draws(Q_G, Z, Q_A, mean):
    """``mean + Q_G Z_s Q_A^T`` for all draws ``Z [S, T, o, a]`` -> ``[S, T, o, a]`` by two
    batched products over the T tasks, the S draws folded into the columns of the first and
    the rows of the second, instead of S*T tiny products that each take a copy of Q_G or Q_A
    (torch.matmul's broadcast)."""
    S, T, o, a = Z.shape
    Y = torch.bmm(Q_G, Z.permute(1, 2, 0, 3).reshape(T, o, S * a))  # [T, o, S*a]
    E = torch.bmm(Y.view(T, o * S, a), Q_A.mT).view(T, o, S, a)
    # The mean is added after the reordering copy: broadcast over the leading S dim, the add
    # runs over long contiguous rows (3.6x faster than over the [T, o, S, a] view's 41-wide ones
    # at sinusoid T=32, S=100).
    return E.permute(2, 0, 1, 3).contiguous() + mean


def _fold(X):
    """[S, T, o, a] -> [T, S*o, a] (T becomes the batch of a bmm against a per-task matrix;
    torch.matmul would instead copy that matrix S times)."""
    S, T, o, a = X.shape
    return X.transpose(0, 1).reshape(T, S * o, a)


def _unfold(Y, S):
    """[T, S*o, a] -> [S, T, o, a] (a view)."""
    T, So, a = Y.shape
    return Y.view(T, S, So // S, a).transpose(0, 1)
