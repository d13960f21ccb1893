"""The accountant against dp-accounting's own test values, and the planner's boundary."""

from __future__ import annotations

import math

import pytest

from fedclip_edge.privacy import accountant as A


def test_pld_matches_library_example_subsampled_gaussian() -> None:
    # dp_accounting/pld/pld_privacy_accountant_test.py, test_self_composed_subsampled_gaussian:
    # Poisson q = 0.2, z = 0.5, 3 compositions: epsilon 1 at delta 0.15594
    assert A.epsilon(0.5, 0.2, 3, 0.15594, accountant="pld") == pytest.approx(1.0, abs=1e-3)


def test_pld_matches_library_example_gaussian() -> None:
    # same file, test_gaussian_basic: z = sqrt(3), 3 rounds, no sampling: epsilon 1 at 0.126936
    eps = A.epsilon(math.sqrt(3), 1.0, 3, 0.126936, accountant="pld")
    assert eps == pytest.approx(1.0, abs=1e-3)
    assert A.local_epsilon(math.sqrt(3), 3, 0.126936, accountant="pld") == pytest.approx(eps)


def test_rdp_matches_library_example_rdp_values() -> None:
    """dp_accounting/rdp/rdp_privacy_accountant_test.py, test_compute_rdp_poisson_sampled_gaussian:
    q = 0.01, z = 2.5, 50 rounds has these RDP values at these orders; our epsilon at those
    orders must be the library's conversion of exactly those values."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    orders = [1.5, 2.5, 5, 50, 100]  # the test's np.inf order left out: it makes 0/0 here
    rdp = [6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02]
    expected, _ = compute_epsilon(orders, rdp, 1e-5)
    got = A.epsilon(2.5, 0.01, 50, 1e-5, accountant="rdp", orders=orders)
    assert got == pytest.approx(expected, rel=1e-3)
    assert 0 < got < 5


def test_rdp_and_pld_agree_roughly_and_rdp_is_looser() -> None:
    rdp = A.epsilon(1.0, 0.1, 50, 1e-5, accountant="rdp")
    pld = A.epsilon(1.0, 0.1, 50, 1e-5, accountant="pld")
    assert pld <= rdp * 1.01 and pld > 0.7 * rdp


def test_edges() -> None:
    assert A.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert A.epsilon(0.0, 0.1, 3, 1e-5) == math.inf
    assert A.sampling_rate(10, 100) == 0.1
    with pytest.raises(ValueError, match="delta"):
        A.epsilon(1.0, 0.1, 3, 0.0)
    with pytest.raises(ValueError, match="sampling rate"):
        A.epsilon(1.0, 1.5, 3, 1e-5)
    with pytest.raises(ValueError, match="unknown accountant"):
        A.epsilon(1.0, 0.1, 3, 1e-5, accountant="moments")
    with pytest.raises(ValueError, match="devices per round"):
        A.sampling_rate(11, 10)


def test_planner_boundary() -> None:
    z, q, delta, target = 1.0, 0.1, 1e-2, 3.0
    r = A.max_rounds(target, z, q, delta)
    assert r > 1
    assert A.epsilon(z, q, r, delta) <= target < A.epsilon(z, q, r + 1, delta)
    # a budget one round already exceeds allows none; a huge one hits the limit
    assert A.max_rounds(0.01, z, q, delta) == 0
    assert A.max_rounds(1e6, z, q, delta, limit=40) == 40
