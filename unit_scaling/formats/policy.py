"""The format policy of a matmul (`FormatPolicy`, `FP8`) and the matmul that applies it.

**Casts live inside custom_vjp.** JAX differentiates `astype(fp8)` by casting the
cotangent to the same fp8 type: a gradient of 1000 becomes NaN in E4M3FN and one of
1e-4 becomes 0. So every cast used under differentiation sits inside a
`jax.custom_vjp` (`quantise_fwd`, `quantise_bwd`, `matmul`) whose backward rule
decides the gradient's format deliberately (E5M2 for output gradients by default) and
returns cotangents in the primal's dtype, never float8.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling.formats.quantisation import (
    E4M3FN,
    E5M2,
    FPFormat,
    _check_floating,
    _check_nearest,
    quantise,
    saturating_cast,
)

__all__ = ["FormatPolicy", "FP8", "matmul"]


@dataclasses.dataclass(frozen=True)
class FormatPolicy:
    """Which formats a matmul's operands and output gradient are rounded to.

    Fields:
      fwd: format of both matmul inputs in the forward pass (None: not quantised).
      bwd: format of the output gradient in the backward pass (None: not quantised).
      real: False simulates (values rounded with `quantise`, compute dtype kept, any
        backend). True casts to the formats' real dtypes (float8_e4m3fn/e5m2) so that
        XLA on H100 runs FP8 GEMMs; needs formats with a `.dtype`.

    Only nearest rounding: matmul receives no PRNG key. Frozen and hashable (a static
    argument of the matmul's custom_vjp). Checked on construction.
    """

    fwd: FPFormat | None = E4M3FN
    bwd: FPFormat | None = E5M2
    real: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.real, bool):
            raise ValueError(f"FormatPolicy.real must be a bool, got {self.real!r}")
        for side in ("fwd", "bwd"):
            fmt = getattr(self, side)
            if fmt is None:
                continue
            if not isinstance(fmt, FPFormat):
                raise ValueError(
                    f"FormatPolicy.{side} must be an FPFormat or None, got {fmt!r}"
                )
            _check_nearest(fmt, f"FormatPolicy.{side}")
            if self.real and fmt.dtype is None:
                raise ValueError(
                    f"FormatPolicy(real=True): {side}={fmt} has no real dtype to cast "
                    "to; use a format with one (E4M3FN, E5M2, E4M3FNUZ, E5M2FNUZ, "
                    "FP16, BF16, ...) or simulate it with real=False"
                )


FP8 = FormatPolicy()
"""E4M3FN forward operands, E5M2 output gradients, simulated."""


def _fwd_operand(x: jax.Array, policy: FormatPolicy) -> jax.Array:
    """The forward operand as stored: quantised (same dtype) or cast (float8)."""
    if policy.fwd is None:
        return x
    if policy.real:
        return saturating_cast(x, policy.fwd)
    return quantise(x, policy.fwd)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _policy_matmul_fwd(
    policy: FormatPolicy, dtypes: tuple[np.dtype, np.dtype], a: jax.Array, b: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    a_q, b_q = _fwd_operand(a, policy), _fwd_operand(b, policy)
    out_dtype = jnp.result_type(*dtypes)
    if policy.real and policy.fwd is not None:
        out = jnp.matmul(a_q, b_q, preferred_element_type=out_dtype)
    else:
        out = jnp.matmul(a_q, b_q)
    return out, (a_q, b_q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _policy_matmul(
    policy: FormatPolicy, dtypes: tuple[np.dtype, np.dtype], a: jax.Array, b: jax.Array
) -> jax.Array:
    return _policy_matmul_fwd(policy, dtypes, a, b)[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _policy_matmul_bwd(
    policy: FormatPolicy,
    dtypes: tuple[np.dtype, np.dtype],
    saved: tuple[jax.Array, jax.Array],
    g: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    # Upcast stored float8 operands to the compute dtype: XLA's GPU GEMM rewriter
    # fuses convert(f8) -> dot into an FP8 GEMM, and cotangents are never float8.
    a_q, b_q = saved[0].astype(dtypes[0]), saved[1].astype(dtypes[1])
    if policy.bwd is not None:
        if policy.real:
            g = saturating_cast(g, policy.bwd).astype(g.dtype)
        else:
            g = quantise(g, policy.bwd)
    _, matmul_vjp = jax.vjp(jnp.matmul, a_q, b_q)  # handles 1-D and broadcast cases
    g_a, g_b = matmul_vjp(g)
    return g_a.astype(dtypes[0]), g_b.astype(dtypes[1])


_policy_matmul.defvjp(_policy_matmul_fwd, _policy_matmul_bwd)


def matmul(a: jax.Array, b: jax.Array, policy: FormatPolicy | None = None) -> jax.Array:
    """`jnp.matmul(a, b)`; inputs rounded to `policy.fwd`, output gradient to `.bwd`.

    Shapes as jnp.matmul: a[..., m, k] @ b[..., k, n] with numpy broadcasting of batch
    dims (e.g. x[b, s, k] @ kernel[k, n]), and the 1-D cases. Output dtype:
    jnp.result_type(a, b).

    - policy None (or fwd and bwd both None): exactly jnp.matmul(a, b).
    - Forward: both operands rounded to policy.fwd (simulate: `quantise`, same
      dtype; real: `saturating_cast` to policy.fwd.dtype and a float8-input matmul
      with preferred_element_type = the output dtype).
    - Backward: the output gradient rounded to policy.bwd, then the input gradients
      are those of jnp.matmul at the saved *quantised* operands (upcast to the compute
      dtype in real mode). Cotangents have their primal's dtype.

    No scale factors here: unit scaling applies them around this call.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if policy is None:
        return jnp.matmul(a, b)
    if not isinstance(policy, FormatPolicy):
        raise TypeError(
            f"matmul: policy must be a FormatPolicy or None, got {policy!r}"
        )
    if policy.fwd is None and policy.bwd is None:
        return jnp.matmul(a, b)
    _check_floating(a, "matmul (a)")
    _check_floating(b, "matmul (b)")
    return _policy_matmul(policy, (a.dtype, b.dtype), a, b)
