"""The decompositions and spectral estimators, against closed forms and exact reconstruction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorly as tl
from onnx import helper, numpy_helper

from conftest import make_model, run_cli, tensor_value
from lrdeploy.decompositions import (
    effective_rank,
    energy_rank,
    evbmf_rank,
    singular_values,
    spatial_svd,
    svd_factors,
    thin_svd,
    tucker2,
    whitened_svd_factors,
)


def matrix_with_spectrum(s: np.ndarray, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(s))))
    return (u * s) @ v.T


def test_effective_rank_of_equal_singular_values_is_their_count():
    m = matrix_with_spectrum(np.full(7, 3.0), 20, 30)
    assert effective_rank(singular_values(m)) == pytest.approx(7.0, rel=1e-9)


def test_effective_rank_of_geometric_spectrum_matches_closed_form():
    # s_i = q^i, i < n: p_i = (1 - q) q^i / (1 - q^n) and
    # H = -log((1 - q) / (1 - q^n)) - log(q) (q / (1 - q) - n q^n / (1 - q^n)).
    q, n = 0.7, 12
    m = matrix_with_spectrum(q ** np.arange(n), 40, 25, seed=1)
    mean_index = q / (1 - q) - n * q**n / (1 - q**n)
    entropy = -np.log((1 - q) / (1 - q**n)) - np.log(q) * mean_index
    assert effective_rank(singular_values(m)) == pytest.approx(np.exp(entropy), rel=1e-9)


def test_effective_rank_of_rank_one_matrix_is_one():
    m = np.outer(np.arange(1, 6), np.arange(1, 4)).astype(float)
    assert effective_rank(singular_values(m)) == pytest.approx(1.0, abs=1e-6)


def test_energy_rank_counts_squared_singular_values():
    s = np.array([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 13 / 14 + 1e-6) == 3
    assert energy_rank(s, 1.0) == 3


def noisy_rank_six() -> np.ndarray:
    """A 120 x 200 matrix of rank 6 (singular values 40 to 20) plus Gaussian noise (sd 0.3)."""
    signal = matrix_with_spectrum(np.linspace(40, 20, 6), 120, 200, seed=3)
    return signal + 0.3 * np.random.default_rng(3).standard_normal(signal.shape)


def test_evbmf_recovers_the_rank_of_a_noisy_low_rank_matrix():
    noisy = noisy_rank_six()
    assert evbmf_rank(singular_values(noisy), noisy.shape) == 6
    assert evbmf_rank(singular_values(noisy.T), noisy.T.shape) == 6


def test_svd_factors_exact_at_full_rank_and_optimal_when_truncated():
    m = np.random.default_rng(4).standard_normal((9, 5))
    left, right = svd_factors(m, 5)
    assert np.allclose(left @ right, m)
    left, right = svd_factors(m, 2)
    s = singular_values(m)
    assert np.linalg.norm(m - left @ right) == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)))


def test_cached_factors_follow_the_matrix_values_not_the_array():
    m = np.random.default_rng(5).standard_normal((9, 5))
    svd_factors(m, 2)
    m[0, 0] += 3.0  # the same array, changed in place: its cached SVD must not be served
    left, right = svd_factors(m, 2)
    assert np.linalg.norm(m - left @ right) == pytest.approx(
        np.sqrt(np.sum(singular_values(m)[2:] ** 2)))
    gram = np.eye(9)
    whitened_svd_factors(m, gram, 2)
    gram[1, 1] = 50.0
    left, right = whitened_svd_factors(m, gram, 2)
    assert not np.allclose(left @ right, svd_factors(m, 2)[0] @ svd_factors(m, 2)[1])
    u, _, _ = thin_svd(m)
    with pytest.raises(ValueError):
        u[0, 0] = 1.0  # one cached array serves every caller


def test_tucker2_exact_at_full_ranks():
    w = np.random.default_rng(5).standard_normal((6, 4, 3, 3))
    core, u_out, u_in = tucker2(w, (6, 4))
    assert core.shape == (6, 4, 3, 3) and u_out.shape == (6, 6) and u_in.shape == (4, 4)
    assert np.allclose(tl.tenalg.multi_mode_dot(core, [u_out, u_in], modes=[0, 1]), w)


def test_tucker2_refinement_never_worse_than_hosvd():
    w = np.random.default_rng(6).standard_normal((16, 12, 3, 3))

    def error(sweeps: int) -> float:
        core, u_out, u_in = tucker2(w, (5, 4), sweeps)
        return np.linalg.norm(w - tl.tenalg.multi_mode_dot(core, [u_out, u_in], modes=[0, 1]))

    assert error(10) <= error(0) + 1e-9


def test_spatial_svd_exact_at_full_rank():
    w = np.random.default_rng(7).standard_normal((5, 3, 3, 2))
    vertical, horizontal = spatial_svd(w, min(3 * 3, 5 * 2))
    rebuilt = np.einsum("kci,okj->ocij", vertical[..., 0], horizontal[:, :, 0, :])
    assert np.allclose(rebuilt, w)


def test_analyze_reports_the_evbmf_rank_of_a_site(tmp_path):
    noisy = noisy_rank_six().astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
                       [tensor_value("x", [1, 120])], ["y"], [numpy_helper.from_array(noisy, "w")])
    path = tmp_path / "planted.onnx"
    path.write_bytes(model.SerializeToString())
    proc = run_cli("analyze", path, "--json", tmp_path / "analysis.json")
    assert proc.returncode == 0, proc.stderr
    assert "VBMF" in proc.stdout
    (row,) = json.loads((tmp_path / "analysis.json").read_text())["sites"]
    assert row["vbmf"] == [6]
