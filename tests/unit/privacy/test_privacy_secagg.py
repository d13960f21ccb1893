"""Secure aggregation's primitives and an in-memory round: fixed point within its error bound,
key agreement, masks, Shamir sharing, dropouts, and masked vectors that say nothing alone."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedclip_edge.privacy import secagg as S


def test_fixed_point_by_hand() -> None:
    fp = S.FixedPoint(1.0, 1, bits=8)  # scale = 127 // 1
    assert fp.scale == 127
    enc = fp.encode(np.array([-1.0, 0.0, 1.0]))
    assert enc.tolist() == [129, 0, 127]  # -127 mod 256 = 129
    assert fp.decode(enc).tolist() == [-1.0, 0.0, 1.0]
    assert abs(fp.decode(fp.encode(np.array([0.3])))[0] - 0.3) <= fp.error_bound(1)


def test_fixed_point_sum_within_bound() -> None:
    rng = np.random.default_rng(0)
    fp = S.FixedPoint(2.0, 50, bits=32)
    xs = rng.uniform(-2.0, 2.0, size=(50, 1000))
    total = np.zeros(1000, dtype=np.uint64)
    for x in xs:
        total = fp.add(total, fp.encode(x))
    err = np.abs(fp.decode(total) - xs.sum(axis=0)).max()
    assert err <= fp.error_bound(50)
    assert fp.error_bound(50) < 1e-5  # 32 bits, 50 x |2|: about 2**-21


def test_out_of_range_refused_with_one_line() -> None:
    fp = S.FixedPoint(1.0, 10)
    with pytest.raises(S.RangeError) as e:
        fp.encode(np.array([0.5, -1.5]))
    assert "\n" not in str(e.value) and "1.5" in str(e.value)
    with pytest.raises(S.RangeError):
        fp.encode(np.array([np.nan]))
    with pytest.raises(ValueError, match="cannot hold"):
        S.FixedPoint(1000.0, 1000, bits=16)


def test_key_agreement_and_masks() -> None:
    sk_a, pk_a = S.keypair()
    sk_b, pk_b = S.keypair()
    s_ab = S.agreed_seed(sk_a, pk_b, me="a", peer="b", context=b"job|1")
    s_ba = S.agreed_seed(sk_b, pk_a, me="b", peer="a", context=b"job|1")
    assert s_ab == s_ba and len(s_ab) == 32
    assert S.agreed_seed(sk_a, pk_b, me="a", peer="b", context=b"job|2") != s_ab
    m = S.expand_mask(s_ab, 1000, 32)
    assert np.array_equal(m, S.expand_mask(s_ba, 1000, 32))
    assert m.dtype == np.uint64 and int(m.max()) < 2**32
    assert not np.array_equal(m, S.expand_mask(bytes(32), 1000, 32))


def test_shamir_t_of_n() -> None:
    secret = bytes(range(32))
    shares = S.share_secret(secret, 5, 3)
    for subset in ([0, 1, 2], [4, 2, 0], [1, 3, 4], [0, 1, 2, 3, 4]):
        assert S.reconstruct_secret([shares[i] for i in subset]) == secret
    # t - 1 shares interpolate a random field element: above 2**256 but with chance 2**-265
    with pytest.raises(ValueError, match="do not reconstruct"):
        S.reconstruct_secret(shares[:2])
    with pytest.raises(ValueError, match="threshold"):
        S.share_secret(secret, 3, 4)


def _inputs(n: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"dev-{i:02d}": rng.uniform(-1, 1, dim) for i in range(n)}


@pytest.mark.parametrize("before,after", [((), ()), ((), ("dev-03",)),
                                          (("dev-01",), ("dev-04", "dev-05"))])
def test_round_sum_equals_plain_sum(before: tuple[str, ...], after: tuple[str, ...]) -> None:
    xs = _inputs(8, 200, 1)
    fp = S.FixedPoint(1.0, 8)
    got, masked = S.simulate_round(xs, fp, threshold=5, drop_before_masking=before,
                                   drop_after_masking=after, seed=2)
    plain = sum(x for u, x in xs.items() if u not in before)
    senders = 8 - len(before)
    assert np.abs(got - plain).max() <= fp.error_bound(senders)
    assert set(masked) == set(xs) - set(before)


def test_too_many_dropouts_refused() -> None:
    xs = _inputs(4, 10, 1)
    with pytest.raises(S.ProtocolError, match="threshold is 3"):
        S.simulate_round(xs, S.FixedPoint(1.0, 4), threshold=3,
                         drop_after_masking=("dev-00", "dev-01"), seed=0)


def test_a_device_never_reveals_both_shares() -> None:
    sk, pk = S.keypair()
    d = S.Device("a", 1, sk, pk, bytes(32))
    with pytest.raises(S.ProtocolError, match="both shares"):
        d.unmask_shares({"b", "c"}, {"c"})


def test_masked_vector_is_independent_of_the_plain_one() -> None:
    """200 rounds of 3 devices, 64 coordinates each: across rounds the masked coordinate of
    dev-00 is uncorrelated with its plain value, and uniform mod 2**32 (chi-square over the
    top 4 bits). The same statistics on the unmasked encoding fail both checks."""
    fp = S.FixedPoint(1.0, 3)
    plain, masked, bare = [], [], []
    for trial in range(200):
        xs = _inputs(3, 64, 1000 + trial)
        _, seen = S.simulate_round(xs, fp, threshold=2, seed=trial)
        plain.append(xs["dev-00"])
        masked.append(seen["dev-00"])
        bare.append(fp.encode(xs["dev-00"]))
    x = np.concatenate(plain)
    y = np.concatenate(masked).astype(np.float64)
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.05  # 12,800 pairs: the null's std is ~0.009

    def chi2_p(v: np.ndarray) -> float:
        counts = np.bincount((v >> np.uint64(28)).astype(np.int64), minlength=16)
        return float(stats.chisquare(counts).pvalue)

    assert chi2_p(np.concatenate(masked)) > 0.001
    # the control: without masks the encoding is a function of the plain value
    b = np.concatenate(bare)
    assert chi2_p(b) < 1e-6
    assert abs(np.corrcoef(x, fp.decode(b))[0, 1]) > 0.99
