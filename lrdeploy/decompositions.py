"""Matrix and tensor decompositions used by the passes, and the spectral rank estimators.

Plain functions on numpy arrays, computed in float64; the passes cast the factors back to the
weight's dtype.
"""

from __future__ import annotations

import hashlib

import numpy as np
import tensorly as tl
from cachetools import LRUCache, cached
from scipy.linalg import solve_triangular
from scipy.optimize import minimize_scalar
from tensorly.decomposition import partial_tucker, tensor_train_matrix
from tensorly.tt_matrix import tt_matrix_to_tensor

# The same matrix is factorized again and again: the planner builds every candidate rank of a
# site (to key its latency, to measure its error), and a benchmark applies whole plans many
# times; each rank is a truncation of one SVD. Before this cache, SVDs were 35 s of the 124 s
# the planner took to prepare MiniLM-L6. Bounded in bytes: MiniLM-L6's 36 sites, plain and
# whitened, held 380 MB when it planned. A long-lived process that is done factorizing can
# free it with ``thin_svd.cache_clear()``.
CACHE_BYTES = 512 * 2**20


def _content_key(*arrays: np.ndarray, **options: float) -> tuple:
    """Shapes, dtypes and a digest of the values: equal arrays share a cache entry."""
    arrays = tuple(np.ascontiguousarray(a) for a in arrays)
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        digest.update(array)
    return (tuple((a.shape, a.dtype.str) for a in arrays), digest.digest(),
            tuple(sorted(options.items())))


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for array in arrays:
        array.flags.writeable = False  # shared by every caller of the cache
    return arrays


@cached(LRUCache(CACHE_BYTES, getsizeof=lambda arrays: sum(a.nbytes for a in arrays)),
        key=_content_key)
def thin_svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``u, s, vt`` of ``matrix`` (float64, ``full_matrices=False``), cached by content and
    read-only."""
    return _read_only(*np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False))


def singular_values(matrix: np.ndarray) -> np.ndarray:
    """Singular values of ``matrix`` in descending order (float64)."""
    return np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)


def svd_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factorization ``matrix ~= left @ right`` (Eckart-Young).

    Parameters
    ----------
    matrix : ndarray, shape (m, n)
    rank : int, 1 <= rank <= min(m, n)

    Returns
    -------
    left : ndarray, shape (m, rank)
        ``U_r diag(sqrt(s_r))``
    right : ndarray, shape (rank, n)
        ``diag(sqrt(s_r)) V_r^T``; splitting sqrt(s) to both sides keeps the two factors at
        similar magnitudes, which matters once they are stored in float16.

    References
    ----------
    .. [1] C. Eckart, G. Young, "The approximation of one matrix by another of lower rank",
       Psychometrika 1(3), 1936.
    """
    u, s, vt = thin_svd(matrix)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


@cached(LRUCache(CACHE_BYTES // 8, getsizeof=lambda arrays: arrays[0].nbytes),
        key=_content_key)
def _cached_whitening(gram: np.ndarray, damping: float) -> tuple[np.ndarray]:
    gram = np.asarray(gram, dtype=np.float64)
    scale = float(np.mean(np.diag(gram))) or 1.0
    return _read_only(np.linalg.cholesky(gram + damping * scale * np.eye(len(gram))).T)


def whitening(gram: np.ndarray, damping: float = 1e-6) -> np.ndarray:
    """Upper-triangular ``R`` with ``R^T R = gram + damping * mean(diag(gram)) * I``.

    For activations X (rows are samples) with ``gram = X^T X``, ``||X A||_F = ||R A||_F`` for
    every A. The damping keeps R invertible when some input features are (nearly) constant
    zero, e.g. channels a ReLU never opens on the calibration data. Cached by content and
    read-only, as ``thin_svd``.
    """
    return _cached_whitening(gram, damping=damping)[0]


def whitened_svd_factors(
    matrix: np.ndarray, gram: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` factors minimising the *output* error ``||X W - X left right||_F``.

    With ``R^T R = X^T X`` the error equals ``||R W - R left right||_F``, minimised by the
    truncated SVD ``R W ~= U_r S_r V_r^T`` (Eckart-Young on the whitened matrix), so
    ``left = R^{-1} U_r S_r^{1/2}`` and ``right = S_r^{1/2} V_r^T``. With ``gram = I`` this is
    ``svd_factors``.

    Parameters
    ----------
    matrix : ndarray, shape (m, n)
        The weight W of ``y = x @ W``; x has m features.
    gram : ndarray, shape (m, m)
        ``X^T X`` of calibration activations X (samples x m) at the weight's input.
    rank : int, 1 <= rank <= min(m, n)

    Returns
    -------
    left : ndarray, shape (m, rank)
    right : ndarray, shape (rank, n)

    References
    ----------
    .. [1] X. Wang, Y. Zheng, Z. Wan, M. Zhang, "SVD-LLM: Truncation-aware Singular Value
       Decomposition for Large Language Model Compression", ICLR 2025 (truncation-aware
       data whitening, Sec. 3.1).
    .. [2] X. Zhang, J. Zou, K. He, J. Sun, "Accelerating Very Deep Convolutional Networks for
       Classification and Detection", TPAMI 38(10), 2016 (the same objective for conv layers).
    """
    whiten = whitening(gram)
    u, s, vt = thin_svd(whiten @ np.asarray(matrix, dtype=np.float64))
    root = np.sqrt(s[:rank])
    left = solve_triangular(whiten, u[:, :rank] * root, lower=False)
    return left, root[:, None] * vt[:rank]


def svd_output_errors(matrix: np.ndarray, gram: np.ndarray, fit_gram: np.ndarray | None = None
                      ) -> np.ndarray:
    """Squared output errors of truncated SVD on data with ``gram = X^T X``.

    Entry r is ``||X (W - W_r)||_F^2`` for the rank-r truncation ``W_r`` (r = 0 .. min(m, n)):
    plain (Eckart-Young) without ``fit_gram``, else the whitened truncation fitted to other data
    with ``fit_gram`` (``whitened_svd_factors``). With ``R W = U S V^T`` (``R = I`` for plain
    SVD, else ``whitening(fit_gram)``), ``X (W - W_r) = sum_{i>r} s_i (X R^{-1} u_i) v_i^T`` and
    the v_i are orthonormal, so the error is ``sum_{i>r} s_i^2 u_i^T R^{-T} gram R^{-1} u_i``.
    Errors measured on ``gram`` of held-out data show what whitened factors lose on data they
    were not fitted to (the tail of their own spectrum is the error on the fitting data only).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    whiten = None if fit_gram is None else whitening(fit_gram)
    u, s, _ = thin_svd(matrix if whiten is None else whiten @ matrix)
    if whiten is not None:
        u = solve_triangular(whiten, u, lower=False)
    # u_i^T gram u_i for every i at once, through one matrix product (a three-operand einsum
    # loops unblocked: 0.5 s instead of 0.015 s for a 1536-feature site).
    return tail_sums(s**2 * np.sum(u * (np.asarray(gram, dtype=np.float64) @ u), axis=0))


def tail_sums(energy: np.ndarray) -> np.ndarray:
    """Entry r is ``sum(energy[r:])`` for r = 0 .. len(energy): what truncating to rank r
    leaves out, when ``energy[i]`` is the share of direction i."""
    return np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])


def tucker2(
    kernel: np.ndarray, ranks: tuple[int, int], n_iter_max: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 decomposition of a conv kernel over its two channel modes.

    ``W[o, c, i, j] ~= sum_{a, b} U_out[o, a] core[a, b, i, j] U_in[c, b]``

    Parameters
    ----------
    kernel : ndarray, shape (C_out, C_in, kh, kw)
    ranks : (r_out, r_in)
    n_iter_max : int
        HOOI refinement sweeps after the HOSVD initialisation (0 = plain truncated HOSVD).

    Returns
    -------
    core : ndarray, shape (r_out, r_in, kh, kw)
    u_out : ndarray, shape (C_out, r_out)
    u_in : ndarray, shape (C_in, r_in)

    References
    ----------
    .. [1] Y.-D. Kim et al., "Compression of Deep Convolutional Neural Networks for Fast and Low
       Power Mobile Applications", ICLR 2016.
    .. [2] L. De Lathauwer, B. De Moor, J. Vandewalle, "On the best rank-1 and rank-(R1,...,RN)
       approximation of higher-order tensors", SIAM J. Matrix Anal. Appl. 21(4), 2000.
    """
    (core, (u_out, u_in)), _ = partial_tucker(
        tl.tensor(np.asarray(kernel, dtype=np.float64)),
        rank=list(ranks),
        modes=[0, 1],
        n_iter_max=n_iter_max,
        init="svd",
    )
    return np.asarray(core), np.asarray(u_out), np.asarray(u_in)


# Above this many weights the TT-SVD's unfoldings use a randomized SVD: a full SVD of a
# 4096 x 4096 unfolding takes about a minute on two cores, the randomized one a second.
TT_RANDOMIZED_ABOVE = 4_000_000


def tt_matrix(
    weight: np.ndarray, in_modes: tuple[int, ...], out_modes: tuple[int, ...],
    ranks: tuple[int, ...],
) -> list[np.ndarray]:
    """Tensor-train matrix (TT-SVD) of a weight ``W`` (K x N) tensorized as K = k_1...k_d,
    N = n_1...n_d.

    ``W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ... G_d[:, i_d, j_d, :]``
    with row and column indices split in row-major order.

    Parameters
    ----------
    weight : ndarray, shape (K, N)
    in_modes, out_modes : tuple of d ints, products K and N
    ranks : tuple of d - 1 ints, the inner TT ranks r_1..r_{d-1} (r_0 = r_d = 1)

    Returns
    -------
    cores : list of d ndarrays, core i of shape (r_{i-1}, k_i, n_i, r_i)
        Exact when every rank is at most its bond's full rank and reaches it
        (``lrdeploy.tensorize.max_tt_ranks``).

    References
    ----------
    .. [1] I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
    .. [2] A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing Neural Networks",
       NeurIPS 2015.
    """
    tensor = np.asarray(weight, dtype=np.float64).reshape(*in_modes, *out_modes)
    svd = "randomized_svd" if weight.size > TT_RANDOMIZED_ABOVE else "truncated_svd"
    cores = tensor_train_matrix(tl.tensor(tensor), (1, *ranks, 1), svd=svd, random_state=0)
    return [np.asarray(core) for core in cores]


def tt_matrix_dense(cores: list[np.ndarray]) -> np.ndarray:
    """The K x N matrix the TT cores of ``tt_matrix`` hold (for error checks only)."""
    rows = int(np.prod([core.shape[1] for core in cores]))
    return np.asarray(tt_matrix_to_tensor(cores)).reshape(rows, -1)


def spatial_unfolding(kernel: np.ndarray) -> np.ndarray:
    """The (C_in * kh) x (C_out * kw) matrix whose rank-r SVD is a k x 1 then 1 x k conv pair."""
    c_out, c_in, kh, kw = kernel.shape
    return kernel.transpose(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)


def spatial_svd(kernel: np.ndarray, rank: int, gram: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Separate a k x k conv into a vertical (kh x 1) and a horizontal (1 x kw) conv.

    ``W[o, c, i, j] ~= sum_k vertical[k, c, i, 0] horizontal[o, k, 0, j]``, the truncated SVD
    of ``spatial_unfolding(W)``; with ``gram``, the whitened truncation of that unfolding
    (``whitened_svd_factors``), which minimises the error on the vertical input patches whose
    ``X^T X`` it is (see ``passes.whitened_svd``).

    Parameters
    ----------
    kernel : ndarray, shape (C_out, C_in, kh, kw)
    rank : int, number of intermediate channels
    gram : ndarray, shape (C_in kh, C_in kh), optional
        ``X^T X`` of the vertical patches of the conv's input, features in the unfolding's row
        order (channel, then kernel row), as ``calibration.feature_rows`` gives them.

    Returns
    -------
    vertical : ndarray, shape (rank, C_in, kh, 1)
    horizontal : ndarray, shape (C_out, rank, 1, kw)

    References
    ----------
    .. [1] M. Jaderberg, A. Vedaldi, A. Zisserman, "Speeding up Convolutional Neural Networks
       with Low Rank Expansions", BMVC 2014 (scheme 2).
    """
    c_out, c_in, kh, kw = kernel.shape
    unfolded = spatial_unfolding(kernel)
    left, right = (svd_factors(unfolded, rank) if gram is None
                   else whitened_svd_factors(unfolded, gram, rank))
    vertical = left.reshape(c_in, kh, rank).transpose(2, 0, 1)[..., None]
    horizontal = right.reshape(rank, c_out, kw).transpose(1, 0, 2)[:, :, None, :]
    return vertical, horizontal


def effective_rank(singular: np.ndarray) -> float:
    """Effective rank: exp of the Shannon entropy of the L1-normalised singular values.

    ``p_i = s_i / sum(s)``, ``erank = exp(-sum p_i log p_i)``; equals k for k equal singular
    values and lies between 1 and the rank.

    References
    ----------
    .. [1] O. Roy, M. Vetterli, "The effective rank: a measure of effective dimensionality",
       EUSIPCO 2007.
    """
    singular = np.asarray(singular, dtype=np.float64)
    total = singular.sum()
    if total <= 0:
        return 0.0
    p = singular[singular > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def energy_rank(singular: np.ndarray, energy: float) -> int:
    """Smallest r whose leading singular values keep ``energy`` of sum(s_i^2)."""
    squares = np.asarray(singular, dtype=np.float64) ** 2
    total = squares.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(squares) / total
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(squares)))


def evbmf_rank(singular: np.ndarray, shape: tuple[int, int]) -> int:
    """Rank chosen by empirical variational Bayesian matrix factorization (EVBMF), from the
    singular values ``singular`` of a matrix of ``shape`` (callers have the spectrum already:
    the rank needs no second SVD).

    With the noise variance sigma^2 itself estimated by maximising the evidence, the global
    analytic EVBMF solution keeps exactly the singular values above
    ``sqrt(M sigma^2 (1 + tau) (1 + alpha / tau))``, ``alpha = L / M``,
    ``tau = 2.5129 sqrt(alpha)``.
    No maintained package provides it (tensorly does not), hence this implementation.

    References
    ----------
    .. [1] S. Nakajima, R. Tomioka, M. Sugiyama, S. D. Babacan, "Condition for perfect
       dimensionality recovery by variational Bayesian PCA", JMLR 16, 2015 (Sec. 3, Thm. 2).
    .. [2] Y.-D. Kim et al., ICLR 2016, who use it to pick Tucker-2 ranks.
    """
    rows, cols = sorted(shape)
    s = np.sort(np.asarray(singular, dtype=np.float64))[::-1]
    if s[0] <= 0:
        return 1
    alpha = rows / cols
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    upper = np.sum(s**2) / (rows * cols)
    guaranteed = int(min(np.ceil(rows / (1 + alpha)), rows)) - 1
    tail = s[guaranteed:] if guaranteed < rows else s[-1:]
    lower = max(tail[0] ** 2 / (cols * x_bar), np.mean(tail**2) / cols)
    if not lower < upper:
        return 1

    def neg_log_evidence(sigma2: float) -> float:
        x = s**2 / (cols * sigma2)
        above, below = x[x > x_bar], x[x <= x_bar]
        tau = 0.5 * (above - (1 + alpha) + np.sqrt((above - (1 + alpha)) ** 2 - 4 * alpha))
        return float(
            np.sum(below - np.log(below))
            + np.sum(above - tau)
            + np.sum(np.log((tau + 1) / above))
            + alpha * np.sum(np.log(tau / alpha + 1))
        )

    sigma2 = minimize_scalar(neg_log_evidence, bounds=(lower, upper), method="bounded").x
    threshold = np.sqrt(cols * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return max(1, int(np.sum(s > threshold)))
