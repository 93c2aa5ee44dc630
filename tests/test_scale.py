"""The two primitives and the constraints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unit_scaling import scale
from unit_scaling.scale import apply_constraint, scale_bwd, scale_fwd


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_scale_fwd_and_bwd(dtype):
    x = jnp.arange(1, 7, dtype=dtype).reshape(2, 3)
    cot = jnp.full((2, 3), 2.0, dtype)
    y, vjp = jax.vjp(lambda x: scale_fwd(x, 0.5), x)
    np.testing.assert_array_equal(np.float32(y), np.float32(x) * 0.5)
    (g,) = vjp(cot)
    np.testing.assert_array_equal(np.float32(g), np.float32(cot))
    y, vjp = jax.vjp(lambda x: scale_bwd(x, 0.25), x)
    np.testing.assert_array_equal(np.float32(y), np.float32(x))
    (g,) = vjp(cot)
    np.testing.assert_array_equal(np.float32(g), np.float32(cot) * 0.25)
    assert y.dtype == dtype and g.dtype == dtype


def test_traced_scale_is_a_clear_error():
    with pytest.raises(TypeError, match="static Python float"):
        jax.jit(lambda x, s: scale_fwd(x, s))(jnp.ones(3), 2.0)
    with pytest.raises(TypeError, match="static Python float"):
        scale_bwd(jnp.ones(3), jnp.float32(2.0))
    with pytest.raises(TypeError, match="real number"):
        scale_fwd(jnp.ones(3), "2")


def test_numpy_and_int_scales_are_static():
    np.testing.assert_array_equal(scale_fwd(jnp.ones(2), np.float64(3.0)), [3.0, 3.0])
    np.testing.assert_array_equal(scale_fwd(jnp.ones(2), 2), [2.0, 2.0])


def test_second_order_and_jit():
    f = lambda x: jnp.sum(scale_bwd(scale_fwd(x, 3.0), 0.5) ** 2)
    x = jnp.array([1.0, 2.0])
    # Forward y = 3x, dL/dy = 2y = 6x; scale_bwd halves it and scale_fwd passes it on.
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), 3 * x)


@pytest.mark.parametrize(
    "name,scales,expected",
    [
        (None, (2.0, 8.0), (2.0, 8.0)),
        ("to_output_scale", (2.0, 8.0, 4.0), (2.0, 2.0, 2.0)),
        ("to_grad_input_scale", (2.0, 8.0), (8.0, 8.0)),
        ("to_left_grad_scale", (2.0, 8.0, 4.0), (8.0, 8.0, 8.0)),
        ("to_right_grad_scale", (2.0, 8.0, 4.0), (4.0, 4.0, 4.0)),
        ("gmean", (2.0, 8.0), (4.0, 4.0)),
        ("hmean", (2.0, 8.0), (3.2, 3.2)),
        ("amean", (2.0, 8.0), (5.0, 5.0)),
    ],
)
def test_constraints(name, scales, expected):
    np.testing.assert_allclose(apply_constraint(name, *scales), expected)


def test_unknown_constraint_lists_valid_ones():
    with pytest.raises(ValueError, match="gmean"):
        apply_constraint("geometric", 1.0, 2.0)


def test_callable_constraint():
    assert apply_constraint(min, 3.0, 1.0, 2.0) == (1.0, 1.0, 1.0)
    assert set(scale.CONSTRAINTS) == {
        "gmean", "hmean", "amean", "to_output_scale", "to_grad_input_scale",
        "to_left_grad_scale", "to_right_grad_scale"}
