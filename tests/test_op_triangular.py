"""The unit-lower solve of the delta-rule chunks (pallas_kernels/triangular.py) against float64
numpy solves: values, both gradients, any chunk length (padded block sizes), and the
ill-scaled case where forward substitution and a power series part ways.

Shapes: a [..., C, C] strictly lower triangular, rhs / x [..., C, F].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.triangular import invert_unit_lower, solve_unit_lower


def _system(c, f, scale, seed=0, batch=(2, 3)):
    rng = np.random.default_rng(seed)
    a = np.tril(rng.standard_normal((*batch, c, c)) * scale, -1)
    rhs = rng.standard_normal((*batch, c, f))
    return a, rhs


@pytest.mark.parametrize("c", [1, 3, 10, 16, 24, 64])
def test_solve_matches_float64(c):
    a, rhs = _system(c, 5, 0.3)
    x = solve_unit_lower(jnp.asarray(a, jnp.float32), jnp.asarray(rhs, jnp.float32))
    want = np.linalg.solve(np.eye(c) + a, rhs)
    assert x.dtype == jnp.float32 and x.shape == rhs.shape
    np.testing.assert_allclose(np.asarray(x), want, rtol=0,
                               atol=2e-6 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("base", [1, 4, 16, 64])
def test_inverse_every_block_size(base):
    """Each base block size (substitution on b rows, then merges) gives the same inverse."""
    a, _ = _system(64, 1, 0.2, seed=1)
    t = invert_unit_lower(jnp.asarray(a, jnp.float32), base=base)
    want = np.linalg.inv(np.eye(64) + a)
    np.testing.assert_allclose(np.asarray(t), want, rtol=0, atol=2e-6 * np.abs(want).max())
    assert np.all(np.triu(np.asarray(t), 1) == 0)       # exactly lower triangular


def test_equal_keys_stay_exact():
    """a = beta on every strict-lower entry (identical unit keys, beta = 1): the inverse is
    I minus the first subdiagonal. A product (I - A)(I + A^2)(I + A^4)... forms entries of
    A^32 of size C(63, 31) ~ 1e17 that cancel; substitution and block merges never do."""
    c = 64
    a = np.tril(np.ones((c, c)), -1)
    t = np.asarray(invert_unit_lower(jnp.asarray(a, jnp.float32)))
    want = np.eye(c) - np.eye(c, k=-1)
    np.testing.assert_array_equal(t, want)


def test_gradients_match_float64():
    """d rhs = (I + a)^-T g and d a = -tril(d rhs x^T, -1), checked against float64 formulas
    (the custom VJP) for a loss with a nonlinear cotangent."""
    c, f = 24, 4
    a, rhs = _system(c, f, 0.3, seed=2, batch=(3,))
    loss = lambda a, r: jnp.sum(jnp.sin(solve_unit_lower(a, r)))
    ga, gr = jax.grad(loss, argnums=(0, 1))(jnp.asarray(a, jnp.float32),
                                            jnp.asarray(rhs, jnp.float32))
    m = np.eye(c) + a
    x = np.linalg.solve(m, rhs)
    g = np.cos(x)
    want_r = np.linalg.solve(np.swapaxes(m, -1, -2), g)
    want_a = -np.tril(want_r @ np.swapaxes(x, -1, -2), -1)
    # float32 over sums of C products: a few ulps of the largest entry.
    for got, want in ((gr, want_r), (ga, want_a)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_upper_part_is_ignored():
    """Only the strict lower triangle of a is read in the values (the ops mask it anyway)."""
    a, rhs = _system(16, 3, 0.3, seed=3)
    noisy = a + np.triu(np.full(a.shape, 7.0))
    x1 = solve_unit_lower(jnp.asarray(a, jnp.float32), jnp.asarray(rhs, jnp.float32))
    x2 = solve_unit_lower(jnp.asarray(noisy, jnp.float32), jnp.asarray(rhs, jnp.float32))
    np.testing.assert_array_equal(np.asarray(x1), np.asarray(x2))
