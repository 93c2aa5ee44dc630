"""Every scaled op against its rule (exact ratios to the plain op) and against the
unit-scale property (measured RMS/std at realistic shapes), in float32 and bfloat16.

The expected scales are written out here from the rules, independently of the library
code, so a change of rule fails these tests. The rule (Blake et al., 2023): for
unit-normal inputs and output gradients, each op's output and each input gradient get
RMS close to 1, from static shapes alone (where the target is another one, as for
`linear_readout`'s output and the losses, the test says which). E.g. `matmul` of
`(m, k) @ (k, n)` scales the output by `k^-1/2`, the left gradient by `n^-1/2` and the
right one by `m^-1/2`; a constraint ("to_output_scale", "to_left_grad_scale", "gmean",
...) gives the scales it ties together one value; a parameter's gradient, a sum over
`B` rows, is scaled by `B^-1/2` (an embedding table's by `(V/B)^1/2`); the
nonlinearities, softmax and attention use the PyTorch reference's fitted scales
(`GELU_OUT`, `SILU_GRAD`, `attention_scale` below).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unit_scaling.functional as U
from unit_scaling import formats
from unit_scaling.scale import apply_constraint


def li(a, lo, hi):
    return math.exp(a * math.log(hi) + (1 - a) * math.log(lo))


def normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def plain_attention(q, k, v, mult=1.0, causal=False):
    d = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (mult / d)
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones(logits.shape[-2:], bool)), logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def attention_scale(d, s_len, mult=1.0, causal=False, p=0.0):
    flat = ((math.log(s_len) if causal else 1.0) / s_len) ** 0.5
    return (1 - p) ** 0.5 / li(1 / (1 + 4 * d / mult**2), flat, 1.0)


def affine(x, w, b):
    return x @ w + b[None]


def plain_layer_norm(x, w, b, eps=1e-5):
    x32 = x.astype(jnp.float32)
    x32 = x32 - x32.mean(-1, keepdims=True)
    y = x32 / jnp.sqrt(jnp.mean(x32**2, -1, keepdims=True) + eps)
    return (y * w[None] + b[None]).astype(x.dtype)


def plain_rms_norm(x, w, eps=1e-5):
    x32 = x.astype(jnp.float32)
    return (x32 / jnp.sqrt(jnp.mean(x32**2, -1, keepdims=True) + eps) * w[None]).astype(x.dtype)


GELU_OUT = lambda m: li(1 / (1 + 0.25 / m**2), 2, (2 / (1 - 1 / math.pi)) ** 0.5)
GELU_GRAD = lambda m: li(1 / (1 + 0.25 / m**2), 2, 2**0.5)
SILU_OUT = GELU_OUT
SILU_GRAD = lambda m: li(1 / (1 + 1 / m**2), 2, 2**0.5)
DROP_KEY = jax.random.key(7)


def cases(dtype):
    """(name, scaled_fn, plain_fn, args, out_scale, grad_scales) for small shapes.

    `scaled_fn(*args) == out_scale * plain_fn(*args)`, and the vjp of `scaled_fn` for a
    cotangent `c` equals `grad_scales[i] *` that of `plain_fn`.
    """
    x = normal(0, (6, 16), dtype)
    y = normal(1, (6, 16), dtype)
    w = normal(2, (16, 24), dtype)
    b = normal(3, (24,), dtype)
    g16 = normal(4, (16,), dtype) + 1
    b16 = normal(5, (16,), dtype)
    q, k, v = (normal(10 + i, (2, 8, 2, 16), dtype) for i in range(3))
    ids = jax.random.randint(jax.random.key(6), (3, 5), 0, 11)
    table = normal(8, (11, 16), dtype)
    seq = normal(13, (3, 10, 4), dtype)
    picks = jnp.array([[1, 7], [0, 9], [4, 5]])
    labels = jax.random.randint(jax.random.key(9), (6,), 0, 16)
    keep = jax.random.bernoulli(DROP_KEY, 0.9, x.shape)
    s_att = attention_scale(16, 8, mult=2.0, causal=True)
    plain_ce = lambda l: -jnp.sum(
        jnp.take_along_axis(jax.nn.log_softmax(l.astype(jnp.float32)), labels[:, None], -1)
    )
    out = [
        ("matmul", lambda a, c: U.matmul(a, c, constraint=None), jnp.matmul, (x, w),
         16**-0.5, (24**-0.5, 6**-0.5)),
        ("matmul/to_output_scale", U.matmul, jnp.matmul, (x, w), 16**-0.5, (16**-0.5,) * 2),
        ("matmul/to_left_grad_scale",
         lambda a, c: U.matmul(a, c, "to_left_grad_scale"), jnp.matmul, (x, w),
         24**-0.5, (24**-0.5,) * 2),
        ("matmul/gmean", lambda a, c: U.matmul(a, c, "gmean"), jnp.matmul, (x, w),
         (16 * 24 * 6) ** (-1 / 6), ((16 * 24 * 6) ** (-1 / 6),) * 2),
        ("linear", lambda a, c, d: U.linear(a, c, d, constraint=None),
         affine, (x, w, b), 16**-0.5, (24**-0.5, 6**-0.5, 6**-0.5)),
        ("linear/to_output_scale", U.linear, affine, (x, w, b),
         16**-0.5, (16**-0.5, 6**-0.5, 6**-0.5)),
        ("linear/to_grad_input_scale",
         lambda a, c, d: U.linear(a, c, d, constraint="to_grad_input_scale"),
         affine, (x, w, b), 24**-0.5, (24**-0.5, 6**-0.5, 6**-0.5)),
        ("linear_readout", U.linear_readout, affine, (x, w, b),
         1 / 16, (24**-0.5, 6**-0.5, 6**-0.5)),
        ("embedding", lambda t: U.embedding(ids, t), lambda t: t[ids], (table,),
         1.0, ((11 / 15) ** 0.5,)),
        ("gather_positions", lambda a: U.gather_positions(a, picks),
         lambda a: jnp.take_along_axis(a, picks[..., None], axis=1), (seq,),
         1.0, ((10 / 2) ** 0.5,)),
        ("gelu", lambda a: U.gelu(a, constraint=None),
         lambda a: jax.nn.gelu(a, approximate=False), (x,),
         GELU_OUT(1), (GELU_GRAD(1),)),
        ("gelu/mult=2/to_output_scale", lambda a: U.gelu(a, mult=2.0),
         lambda a: jax.nn.gelu(2 * a, approximate=False) / 2, (x,), GELU_OUT(2), (GELU_OUT(2),)),
        ("gelu/tanh/to_grad_input_scale",
         lambda a: U.gelu(a, constraint="to_grad_input_scale", approximate=True),
         lambda a: jax.nn.gelu(a, approximate=True), (x,), GELU_GRAD(1), (GELU_GRAD(1),)),
        ("silu/mult=0.5", lambda a: U.silu(a, mult=0.5, constraint=None),
         lambda a: a * jax.nn.sigmoid(0.5 * a), (x,), SILU_OUT(0.5), (SILU_GRAD(0.5),)),
        ("silu/to_output_scale", U.silu, jax.nn.silu, (x,), SILU_OUT(1), (SILU_OUT(1),)),
        ("silu_glu/mult=2", lambda a, c: U.silu_glu(a, c, mult=2.0),
         lambda a, c: a * c * jax.nn.sigmoid(2 * c), (x, y), SILU_GRAD(2), (SILU_GRAD(2),) * 2),
        ("softmax", lambda a: U.softmax(a, constraint=None, mult=0.5),
         lambda a: jax.nn.softmax(a * 0.5), (x,), li(1 / 17, 16, 4), (li(1 / 17, 32, 32**0.5),)),
        ("softmax/axis0/to_output_scale", lambda a: U.softmax(a, axis=0),
         lambda a: jax.nn.softmax(a, axis=0), (x,), li(0.2, 6, 6**0.5), (li(0.2, 6, 6**0.5),)),
        ("dropout", lambda a: U.dropout(a, 0.1, DROP_KEY),
         lambda a: jnp.where(keep, a / 0.9, 0), (x,), 0.9**0.5, (0.9**0.5,)),
        ("dropout/deterministic", lambda a: U.dropout(a, 0.1, deterministic=True),
         lambda a: a, (x,), 0.9**0.5, (0.9**0.5,)),
        ("add", lambda a, c: U.add(a, c, constraint=None), jnp.add, (x, y),
         2**-0.5, (1.0, 1.0)),
        ("add/broadcast/to_output_scale", U.add, lambda a, c: a + c[None], (x, b16),
         2**-0.5, (2**-0.5,) * 2),
        ("add/broadcast", lambda a, c: U.add(a, c, constraint=None), lambda a, c: a + c[None], (x, b16),
         2**-0.5, (1.0, 6**-0.5)),
        # Forward weights tau/(1+tau^2)^1/2 and 1/(1+tau^2)^1/2; identity backward.
        ("residual_add/tau=0.5", lambda a, c: U.residual_add(a, c, 0.5),
         lambda a, c: a * (0.5 / 1.25**0.5) + c / 1.25**0.5, (x, y), 1.0,
         (1.25**0.5 / 0.5, 1.25**0.5)),
        ("layer_norm", U.layer_norm, plain_layer_norm, (x, g16, b16), 1.0,
         (1.0, 6**-0.5, 6**-0.5)),
        ("rms_norm", U.rms_norm, plain_rms_norm, (x, g16), 1.0, (1.0, 6**-0.5)),
        ("attention/causal/mult=2",
         lambda a, c, d: U.scaled_dot_product_attention(a, c, d, causal=True, mult=2.0),
         lambda a, c, d: plain_attention(a, c, d, mult=2.0, causal=True), (q, k, v),
         s_att, (s_att,) * 3),
        ("cross_entropy/sum", lambda l: U.cross_entropy(l, labels, reduction="sum"),
         plain_ce, (x,), 1.0, (16 / 15**0.5,)),
        ("cross_entropy/mean", lambda l: U.cross_entropy(l, labels), plain_ce, (x,),
         1 / 6, (16 / 15**0.5,)),
        ("cross_entropy/mult=2", lambda l: U.cross_entropy(l, labels, mult=2.0),
         lambda l: plain_ce(2 * l), (x,), 1 / 6, (16 / 15**0.5 / 2,)),
        ("mse_loss/sum", lambda a, c: U.mse_loss(a, c, "sum"),
         lambda a, c: jnp.sum((a.astype(jnp.float32) - c.astype(jnp.float32)) ** 2),
         (x, y), 1.0, (8**-0.5,) * 2),
        ("mse_loss/mean", U.mse_loss,
         lambda a, c: jnp.sum((a.astype(jnp.float32) - c.astype(jnp.float32)) ** 2),
         (x, y), 1 / 96, (8**-0.5,) * 2),
    ]
    return out


CASE_NAMES = [c[0] for c in cases(jnp.float32)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_exact_rule(name, dtype):
    """Output and every gradient equal the plain op's times the documented scale."""
    (_, scaled_fn, plain_fn, args, out_scale, grad_scales), = [
        c for c in cases(dtype) if c[0] == name
    ]
    cot = normal(99, jax.eval_shape(scaled_fn, *args).shape, args[0].dtype)

    @jax.jit
    def run(*args):
        out, vjp = jax.vjp(scaled_fn, *args)
        ref, ref_vjp = jax.vjp(plain_fn, *args)
        cot_ = cot.astype(out.dtype)
        return out, ref, vjp(cot_), ref_vjp(cot_)

    out, ref, grads, ref_grads = run(*args)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    assert out.dtype == ref.dtype
    np.testing.assert_allclose(
        np.float32(out), np.float32(ref) * out_scale, **tol, err_msg="forward"
    )
    for i, (g, rg, s) in enumerate(zip(grads, ref_grads, grad_scales, strict=True)):
        assert g.dtype == args[i].dtype, f"gradient {i} dtype"
        np.testing.assert_allclose(
            np.float32(g), np.float32(rg) * s, **tol, err_msg=f"gradient {i}"
        )


def test_residual_split_gradient_rule():
    x = normal(0, (4, 8))
    tau = 0.3
    (g,) = jax.grad(lambda x: jnp.sum(sum(c * t for c, t in zip((2.0, 5.0), U.residual_split(x, tau)))), argnums=(0,))(x)
    d = (1 + tau**2) ** 0.5
    np.testing.assert_allclose(g, np.full(x.shape, 2.0 * tau / d + 5.0 / d), rtol=1e-6)


def test_residual_apply_is_split_fn_add():
    x = normal(0, (4, 8))
    fn = lambda r: 3.0 * r
    manual = lambda x: U.residual_add(fn(U.residual_split(x, 0.7)[0]), U.residual_split(x, 0.7)[1], 0.7)
    np.testing.assert_allclose(U.residual_apply(fn, x, 0.7), manual(x), rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda x: U.residual_apply(fn, x, 0.7).sum())(x),
        jax.grad(lambda x: manual(x).sum())(x), rtol=1e-6,
    )


# ------------------------------------------------------------------ unit scale at scale


def stat(t, kind="rms"):
    t = np.asarray(t, np.float64)
    return float(t.std()) if kind == "std" else float(np.sqrt(np.mean(t**2)))


def measure(fn, *args, scalar_output=False):
    """`fn(*args)` and its input gradients for a unit-normal (or, for a scalar loss,
    unit) cotangent, in one jitted call."""
    shape = jax.eval_shape(fn, *args)
    cot = jnp.ones(shape.shape, shape.dtype) if scalar_output else normal(123, shape.shape, shape.dtype)

    @jax.jit
    def run(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cot)

    return run(*args)


MATMUL_CONSTRAINTS = [None, "to_output_scale", "to_left_grad_scale", "to_right_grad_scale",
                      "gmean", "hmean", "amean"]


@pytest.mark.parametrize("constraint", MATMUL_CONSTRAINTS)
def test_matmul_unit_scale(constraint):
    m, k, n = 256, 1024, 2048
    left, right = normal(0, (m, k)), normal(1, (k, n))
    out, (gl, gr) = measure(lambda a, b: U.matmul(a, b, constraint), left, right)
    ideal = (k**-0.5, n**-0.5, m**-0.5)  # each gives RMS 1 on its own
    chosen = apply_constraint(constraint, *ideal)
    for t, c, i, what in zip((out, gl, gr), chosen, ideal, ("out", "g_left", "g_right")):
        predicted = c / i
        assert stat(t) == pytest.approx(predicted, rel=0.1), what


@pytest.mark.parametrize("constraint", [None, "to_output_scale", "to_grad_input_scale",
                                        "gmean", "hmean", "amean"])
def test_linear_unit_scale(constraint):
    x, w, b = normal(0, (256, 1024)), normal(1, (1024, 4096)), normal(2, (4096,))
    out, (gx, gw, gb) = measure(lambda *a: U.linear(*a, constraint=constraint), x, w, b)
    ideal = (1024**-0.5, 4096**-0.5)
    chosen = apply_constraint(constraint, *ideal)
    # The bias (RMS 1) is inside the scale: output variance is 1 + 1/fan_in.
    assert stat(out) == pytest.approx(chosen[0] / ideal[0] * (1 + 1 / 1024) ** 0.5, rel=0.1)
    assert stat(gx) == pytest.approx(chosen[1] / ideal[1], rel=0.1)
    assert stat(gw) == pytest.approx(1.0, abs=0.1)
    assert stat(gb) == pytest.approx(1.0, abs=0.1)


def test_linear_readout_scale():
    """The readout's output is `fan_in^-1/2` (the μP readout), its gradients unit."""
    x, w = normal(0, (256, 1024)), normal(1, (1024, 4096))
    out, (gx, gw) = measure(U.linear_readout, x, w)
    assert stat(out) == pytest.approx(1024**-0.5, rel=0.1)
    assert stat(gx) == pytest.approx(1.0, abs=0.1)
    assert stat(gw) == pytest.approx(1.0, abs=0.1)


def test_embedding_unit_grad():
    ids = jax.random.randint(jax.random.key(0), (64, 128), 0, 1024)
    table = normal(1, (1024, 256))
    out, (g,) = measure(lambda t: U.embedding(ids, t), table)
    assert stat(out) == pytest.approx(1.0, abs=0.1)
    assert stat(g) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("count", [1, 10, 64])
def test_gather_positions_unit_grad(count):
    """P distinct positions of L (BERT's MLM positions; [CLS] is P = 1): the gradient
    over the whole sequence tensor has unit RMS."""
    length = 128
    x = normal(0, (32, length, 64))
    positions = jnp.argsort(jax.random.uniform(jax.random.key(1), (32, length)), axis=1)
    positions = positions[:, :count]
    out, (g,) = measure(lambda t: U.gather_positions(t, positions), x)
    assert out.shape == (32, count, 64)
    assert stat(out) == pytest.approx(1.0, abs=0.1)
    assert stat(g) == pytest.approx(1.0, abs=0.1)


def test_gather_positions_rejects_unbatched_positions():
    with pytest.raises(ValueError, match=r"\[batch, P\]"):
        U.gather_positions(normal(0, (2, 8, 4)), jnp.zeros((3, 1), jnp.int32))


# The fitted rules of the nonlinearities target unit standard deviation of the output
# (their mean is not zero) and unit RMS of the gradient, as in the reference.
@pytest.mark.parametrize("mult", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("op", ["gelu", "gelu_tanh", "silu"])
def test_activation_unit_scale(op, mult):
    x = normal(0, (256, 4096))
    fn = {
        "gelu": lambda a: U.gelu(a, mult, constraint=None),
        "gelu_tanh": lambda a: U.gelu(a, mult, constraint=None, approximate=True),
        "silu": lambda a: U.silu(a, mult, constraint=None),
    }[op]
    out, (g,) = measure(fn, x)
    assert stat(out, "std") == pytest.approx(1.0, abs=0.1)
    assert stat(g) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("mult", [0.25, 1.0, 4.0])
def test_silu_glu_unit_scale(mult):
    x, gate = normal(0, (256, 4096)), normal(1, (256, 4096))
    out, grads = measure(lambda a, b: U.silu_glu(a, b, mult), x, gate)
    for t in (out, *grads):
        assert stat(t) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("n,mult", [(4096, 0.25), (128, 0.25), (128, 1.0), (512, 2.0), (4096, 4.0)])
def test_softmax_unit_scale(n, mult):
    """Softmax's fitted rule is within 0.1 in these regimes. It is looser elsewhere
    (RMS 0.71 at n=4096, mult=1; see `U.softmax`), as in the reference, whose tests use
    mult=1/4."""
    x = normal(0, (256, n))
    out, (g,) = measure(lambda a: U.softmax(a, mult=mult, constraint=None), x)
    assert stat(out) == pytest.approx(1.0, abs=0.1)
    assert stat(g) == pytest.approx(1.0, abs=0.1)


def test_dropout_unit_scale():
    x = normal(0, (256, 4096))
    out, (g,) = measure(lambda a: U.dropout(a, 0.25, jax.random.key(1)), x)
    assert stat(out) == pytest.approx(1.0, abs=0.1)
    assert stat(g) == pytest.approx(1.0, abs=0.1)
    # Eval mode keeps the training expectation: E[train out] = x (1-p)^1/2.
    x = jnp.ones((256, 4096))
    train = U.dropout(x, 0.25, jax.random.key(2))
    evaluated = U.dropout(x, 0.25, deterministic=True)
    assert float(train.mean()) == pytest.approx(float(evaluated.mean()), rel=0.01)


@pytest.mark.parametrize("broadcast", [False, True])
def test_add_unit_scale(broadcast):
    a = normal(0, (256, 4096))
    b = normal(1, (4096,) if broadcast else (256, 4096))
    out, (ga, gb) = measure(lambda a, b: U.add(a, b, constraint=None), a, b)
    for t in (out, ga, gb):
        assert stat(t) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("tau", [0.2, 1.0, 3.0])
def test_residual_unit_scale(tau):
    """A unit-scaled branch in `residual_apply` keeps forward and backward unit."""
    x, w = normal(0, (256, 1024)), normal(1, (1024, 1024))
    out, (g,) = measure(lambda a: U.residual_apply(lambda r: U.linear(r, w), a, tau), x)
    assert stat(out) == pytest.approx(1.0, abs=0.1)
    assert stat(g) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_norm_unit_scale(norm):
    x = normal(0, (256, 1024)) * 3 + 1
    params = (jnp.ones((1024,)), jnp.zeros((1024,)))[: 2 if norm == "layer_norm" else 1]
    out, grads = measure(getattr(U, norm), x, *params)
    assert stat(out) == pytest.approx(1.0, abs=0.1) or norm == "rms_norm"
    for g in grads[1:]:  # weight and bias gradients
        assert stat(g) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_scale(causal, implementation):
    """Output and value gradient unit; query/key gradients at their predicted value.

    In the flat regime (mult^2 << 4 d) the logits gradient of query `i` over its `n_i`
    visible keys has mean square `d/n_i (1 - 1/n_i)`; so
    `RMS(g_q) = RMS(g_k) = s * mult * (mean_i[(1/n_i)(1-1/n_i)] / d)^1/2`.
    """
    b, s_len, h, d = 4, 256, 4, 64
    q, k, v = (normal(i, (b, s_len, h, d)) for i in range(3))
    out, (gq, gk, gv) = measure(
        lambda *a: U.scaled_dot_product_attention(*a, causal=causal,
                                                  implementation=implementation), q, k, v
    )
    assert stat(out) == pytest.approx(1.0, abs=0.1)
    assert stat(gv) == pytest.approx(1.0, abs=0.1)
    n = np.arange(1, s_len + 1) if causal else np.full(s_len, s_len)
    predicted = attention_scale(d, s_len, causal=causal) * (np.mean((1 / n) * (1 - 1 / n)) / d) ** 0.5
    assert stat(gq) == pytest.approx(predicted, rel=0.1)
    assert stat(gk) == pytest.approx(predicted, rel=0.1)


def test_cross_entropy_unit_grad():
    logits = normal(0, (4096, 256))
    labels = jax.random.randint(jax.random.key(1), (4096,), 0, 256)
    for reduction in ("mean", "sum"):
        loss, (g,) = measure(lambda l: U.cross_entropy(l, labels, reduction=reduction),
                             logits, scalar_output=True)
        assert stat(g, "std") == pytest.approx(1.0, abs=0.1)
    plain = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))
    np.testing.assert_allclose(U.cross_entropy(logits, labels), plain, rtol=1e-6)


def test_cross_entropy_weights_mean_over_counted_rows():
    logits = normal(0, (8, 5))
    labels = jnp.arange(8) % 5
    mask = jnp.array([1, 1, 0, 1, 0, 0, 1, 1], jnp.float32)
    per_row = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]
    loss = U.cross_entropy(logits, labels, weights=mask)
    np.testing.assert_allclose(loss, jnp.sum(per_row * mask) / 5, rtol=1e-6)
    # The gradient is that of the weighted *sum* loss, scaled: masked rows get none.
    g = jax.grad(lambda l: U.cross_entropy(l, labels, weights=mask))(logits)
    g_sum = jax.grad(lambda l: jnp.sum(per_row_fn(l, labels) * mask))(logits)
    np.testing.assert_allclose(g, g_sum * 5 / 4**0.5, rtol=1e-5)
    assert np.all(np.asarray(g)[mask == 0] == 0)


def test_cross_entropy_weighted_mean_is_exact_at_scale():
    """The forward value is the mean itself, not rounded to the spacing of the sum."""
    logits = normal(0, (1 << 20, 2))
    labels = jnp.zeros((1 << 20,), jnp.int32)
    weights = jnp.ones((1 << 20,))
    loss = jax.jit(lambda l: U.cross_entropy(l, labels, weights=weights))(logits)
    exact = np.mean(np.logaddexp(np.float64(logits[:, 0]), np.float64(logits[:, 1])) - np.float64(logits[:, 0]))
    assert float(loss) == pytest.approx(exact, rel=1e-5)


def per_row_fn(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]


def test_mse_unit_grad():
    a, b = normal(0, (256, 1024)), normal(1, (256, 1024))
    loss, grads = measure(U.mse_loss, a, b, scalar_output=True)
    for g in grads:
        assert stat(g) == pytest.approx(1.0, abs=0.1)


# ------------------------------------------------------------------------ attention masks


def test_attention_padding_and_segments():
    """Masked keys get no weight: changing them leaves the output unchanged."""
    q, k, v = (normal(i, (2, 6, 2, 8)) for i in range(3))
    pad = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    out = U.scaled_dot_product_attention(q, k, v, mask=pad[:, None, None, :])
    k2 = k.at[0, 4:].set(100.0)
    v2 = v.at[0, 4:].set(-50.0)
    np.testing.assert_allclose(
        U.scaled_dot_product_attention(q, k2, v2, mask=pad[:, None, None, :]), out, atol=1e-6
    )
    seg = jnp.array([[1, 1, 1, 2, 2, 2]] * 2)
    packed = U.scaled_dot_product_attention(q, k, v, causal=True, segment_ids=seg, scale_seq_len=6)
    first = U.scaled_dot_product_attention(q[:, :3], k[:, :3], v[:, :3], causal=True, scale_seq_len=6)
    second = U.scaled_dot_product_attention(q[:, 3:], k[:, 3:], v[:, 3:], causal=True, scale_seq_len=6)
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), atol=1e-5)


def test_attention_dropout():
    q, k, v = (normal(i, (2, 16, 2, 8)) for i in range(3))
    args = dict(dropout_rate=0.5, dropout_key=jax.random.key(0))
    train = U.scaled_dot_product_attention(q, k, v, deterministic=False, **args)
    same = U.scaled_dot_product_attention(q, k, v, deterministic=False, **args)
    evaluated = U.scaled_dot_product_attention(q, k, v, deterministic=True, **args)
    np.testing.assert_array_equal(train, same)
    assert not np.allclose(train, evaluated)
    with pytest.raises(ValueError, match="dropout_key"):
        U.scaled_dot_product_attention(q, k, v, dropout_rate=0.5, deterministic=False)


def test_attention_cached_decode_matches_full():
    """One query at the end of a cache, with the training `scale_seq_len`, equals the
    last row of the full causal attention."""
    q, k, v = (normal(i, (1, 10, 2, 8)) for i in range(3))
    full = U.scaled_dot_product_attention(q, k, v, causal=True, scale_seq_len=16)
    last = U.scaled_dot_product_attention(q[:, -1:], k, v, causal=True, scale_seq_len=16)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-6)


# ---------------------------------------------------------------------- fused attention

SEGMENTS = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [3] * 12])
PADDING = (jnp.arange(12)[None, :] < jnp.array([[9], [12]]))[:, None, None, :]
FUSED_CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "padding": dict(mask=PADDING),
    "causal_segments": dict(causal=True, segment_ids=SEGMENTS),
    "padding_segments": dict(mask=PADDING, segment_ids=SEGMENTS),
    "umup_mult": dict(causal=True, mult=2.0, scale_seq_len=32),
}


def attention_and_grads(implementation, dtype, q_len=12, **kwargs):
    """The scaled attention's output and its (query, key, value) gradients."""
    q = normal(0, (2, q_len, 3, 16), dtype)
    k, v = (normal(i, (2, 12, 3, 16), dtype) for i in (1, 2))
    return measure(lambda *a: U.scaled_dot_product_attention(
        *a, implementation=implementation, **kwargs), q, k, v)


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_attention_matches_reference(case, dtype):
    """jax.nn.dot_product_attention inside the unit scales: the reference's output and
    gradients, to 1e-5 in float32. In bf16 the fused kernel keeps the logits in float32
    where the reference rounds q k^T to bf16 first: within a few bf16 steps."""
    ref_out, ref_grads = attention_and_grads("reference", dtype, **FUSED_CASES[case])
    out, grads = attention_and_grads("xla", dtype, **FUSED_CASES[case])
    tol = 1e-5 if dtype == jnp.float32 else 4e-2
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=tol * max(stat(want), 1.0), rtol=tol)


def test_fused_attention_of_a_cache_block_and_of_the_sp_ops():
    """A block of queries at the end of a longer key sequence (KV-cache decoding: the
    causal mask aligned at the end), and the standard parametrization's attention."""
    from unit_scaling.ops import StandardOps

    ref = attention_and_grads("reference", jnp.float32, q_len=4, causal=True, scale_seq_len=16)
    got = attention_and_grads("xla", jnp.float32, q_len=4, causal=True, scale_seq_len=16)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    q, k, v = (normal(i, (2, 12, 3, 16)) for i in range(3))
    sp = {impl: StandardOps().attention(q, k, v, causal=True, segment_ids=SEGMENTS,
                                        implementation=impl) for impl in ("reference", "xla")}
    np.testing.assert_allclose(sp["xla"], sp["reference"], atol=1e-5, rtol=1e-5)


def test_fused_attention_only_where_exact():
    """Attention dropout at work and FP8 formats take the reference path (the fused
    kernel has neither): the same numbers as implementation="reference". "cudnn" off
    a GPU runs the XLA kernel; an unknown name is an error naming the choices."""
    q, k, v = (normal(i, (2, 12, 3, 16)) for i in range(3))
    for kwargs in (dict(dropout_rate=0.5, dropout_key=DROP_KEY, deterministic=False),
                   dict(formats=formats.FP8, causal=True)):
        ref, fused = (U.scaled_dot_product_attention(q, k, v, implementation=impl, **kwargs)
                      for impl in ("reference", "xla"))
        np.testing.assert_array_equal(fused, ref)
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(
            U.scaled_dot_product_attention(q, k, v, causal=True, implementation="cudnn"),
            U.scaled_dot_product_attention(q, k, v, causal=True, implementation="xla"))
    with pytest.raises(ValueError, match="'reference', 'xla', 'cudnn'"):
        U.scaled_dot_product_attention(q, k, v, implementation="flash")


# --------------------------------------------------------------------------- FP8 switch


def test_formats_policy_is_one_switch():
    """`formats=FP8` quantises the inputs of every matmul-like op, and only changes
    numerics within FP8 precision."""
    x, w = normal(0, (32, 64)), normal(1, (64, 48))
    q, k, v = (normal(i, (2, 16, 2, 8)) for i in range(3))
    for fn in (
        lambda f: U.matmul(x, w, formats=f),
        lambda f: U.linear(x, w, formats=f),
        lambda f: U.linear_readout(x, w, formats=f),
        lambda f: U.scaled_dot_product_attention(q, k, v, causal=True, formats=f),
    ):
        exact, fp8 = fn(None), fn(formats.FP8)
        assert not np.array_equal(exact, fp8)
        np.testing.assert_allclose(fp8, exact, atol=0.15, rtol=0.15)
    expected = U.matmul(formats.quantise(x, formats.E4M3FN), formats.quantise(w, formats.E4M3FN))
    np.testing.assert_allclose(U.matmul(x, w, formats=formats.FP8), expected, rtol=1e-6)


# --------------------------------------------------------------------- transformations


def block(params, x):
    """A small unit-scaled residual block using several ops."""
    h = U.layer_norm(x, params["g"], params["b"])
    h = U.gelu(U.linear(h, params["w1"]))
    return U.residual_add(U.linear(h, params["w2"]), x, 0.5)


def block_params(dtype=jnp.float32):
    return {
        "g": jnp.ones((16,), dtype), "b": jnp.zeros((16,), dtype),
        "w1": normal(1, (16, 32), dtype), "w2": normal(2, (32, 16), dtype),
    }


def block_loss(params, x):
    return jnp.mean(block(params, x) ** 2)


def test_jit_and_grad_compose():
    params, x = block_params(), normal(0, (8, 16))
    g = jax.grad(block_loss)(params, x)
    g_jit = jax.jit(jax.grad(block_loss))(params, x)
    g_of_jit = jax.grad(jax.jit(block_loss))(params, x)
    for a, b_, c in zip(jax.tree.leaves(g), jax.tree.leaves(g_jit), jax.tree.leaves(g_of_jit)):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_vmap_composes():
    params, x = block_params(), normal(0, (4, 8, 16))
    per_example = jax.vmap(lambda xi: block(params, xi))(x)
    np.testing.assert_allclose(per_example, jnp.stack([block(params, xi) for xi in x]),
                               rtol=1e-5, atol=1e-6)
    # Per-example gradients used one by one: the lanes are independent ("none"); without
    # saying so, the shared weights' gradient scale is ambiguous and raises.
    per_example_grads = jax.vmap(jax.grad(block_loss), in_axes=(None, 0))
    with pytest.raises(ValueError, match="vmap_reduction"):
        per_example_grads(params, x)
    with U.vmap_reduction("none"):
        grads = per_example_grads(params, x)
    np.testing.assert_allclose(grads["w1"][1], jax.grad(block_loss)(params, x[1])["w1"],
                               rtol=1e-5, atol=1e-6)


def test_checkpoint_composes():
    params, x = block_params(), normal(0, (8, 16))
    remat = jax.checkpoint(block_loss, policy=jax.checkpoint_policies.nothing_saveable)
    for a, b_ in zip(jax.tree.leaves(jax.grad(block_loss)(params, x)),
                     jax.tree.leaves(jax.grad(remat)(params, x))):
        np.testing.assert_allclose(a, b_, rtol=1e-6, atol=1e-7)


def test_scan_composes():
    layers = jax.tree.map(lambda *a: jnp.stack(a), *[block_params() for _ in range(3)])
    x = normal(0, (8, 16))

    def scanned(layers, x):
        y, _ = jax.lax.scan(lambda h, p: (block(p, h), None), x, layers)
        return jnp.mean(y**2)

    def unrolled(layers, x):
        for i in range(3):
            x = block(jax.tree.map(lambda a: a[i], layers), x)
        return jnp.mean(x**2)

    for a, b_ in zip(jax.tree.leaves(jax.grad(scanned)(layers, x)),
                     jax.tree.leaves(jax.grad(unrolled)(layers, x))):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)


def test_sharded_jit_matches_single_device():
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    params, x = block_params(), normal(0, (16, 16))
    spec = {"g": P(), "b": P(), "w1": P(None, "tensor"), "w2": P("tensor", None)}
    sharded_params = jax.device_put(params, {k: NamedSharding(mesh, s) for k, s in spec.items()})
    sharded_x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    grads = jax.jit(jax.grad(block_loss))(sharded_params, sharded_x)
    assert grads["w1"].sharding.spec == P(None, "tensor")
    for a, b_ in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.grad(block_loss)(params, x))):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)


def test_bfloat16_in_bfloat16_out():
    params, x = block_params(jnp.bfloat16), normal(0, (8, 16), jnp.bfloat16)
    assert block(params, x).dtype == jnp.bfloat16
    grads = jax.grad(lambda p, x: block_loss(p, x).astype(jnp.float32))(params, x)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))


def test_float16_runs_finite():
    params, x = block_params(jnp.float16), normal(0, (8, 16), jnp.float16)
    grads = jax.grad(lambda p, x: block_loss(p, x).astype(jnp.float32))(params, x)
    assert all(g.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(g)))
               for g in jax.tree.leaves(grads))


def test_linear_scales_multiply_gemm_outputs_outside_fp16():
    # XLA fuses a scalar multiply on a GEMM's output into the op that consumes it; one
    # on an operand (the kernel, the activation) is a pass of its own every step.
    x, w, b = normal(0, (4, 16, 8)), normal(1, (8, 32)), normal(2, (32,))

    def step(x, w, b):
        y, vjp = jax.vjp(lambda x, w, b: U.linear(x, w, b), x, w, b)
        return y, vjp(jnp.ones_like(y))

    inner = [e for outer in jax.make_jaxpr(step)(x, w, b).jaxpr.eqns for e in _sub_eqns(outer)]
    made_by = {v: e.primitive.name for e in inner for v in e.outvars}
    scales = [e for e in inner if e.primitive.name == "mul"]
    assert len(scales) == 4, scales  # y, g_x, g_kernel, g_bias
    for e in scales:
        var = next(v for v in e.invars if not hasattr(v, "val"))  # not the literal scale
        assert made_by.get(var) in ("dot_general", "reduce_sum", "add"), e


def _sub_eqns(eqn):
    """`eqn` and, recursively, the equations of the jaxprs it calls."""
    yield eqn
    for param in eqn.params.values():
        for sub in (param if isinstance(param, (list, tuple)) else [param]):
            jaxpr = getattr(sub, "jaxpr", sub)
            for inner in getattr(jaxpr, "eqns", []):
                yield from _sub_eqns(inner)


def test_readout_logits_do_not_overflow_fp16():
    # fan_in 4096, inputs and weights 4: logits 4 * 4 * 4096 / 4096 = 16, but the
    # unscaled x @ kernel (65536) is past fp16's 65504.
    x = jnp.full((2, 4096), 4.0, jnp.float16)
    w = jnp.full((4096, 2), 4.0, jnp.float16)
    y, vjp = jax.vjp(U.linear_readout, x, w)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.full((2, 2), 16.0))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in vjp(jnp.ones_like(y)))


def test_linear_weight_gradient_does_not_overflow_fp16():
    # 4096 tokens whose output gradients all agree: the unscaled weight-gradient sum
    # (4096 * 30 = 122880) is past fp16's 65504, the B^-1/2-scaled one (1920) is not.
    x = jnp.ones((4096, 8), jnp.float16)
    w = jnp.ones((8, 4), jnp.float16)
    b = jnp.zeros((4,), jnp.float16)
    g = jnp.full((4096, 4), 30.0, jnp.float16)
    _, vjp = jax.vjp(lambda x, w, b: U.linear(x, w, b), x, w, b)
    gx, gw, gb = vjp(g)
    np.testing.assert_array_equal(np.asarray(gw, np.float32), np.full((8, 4), 1920.0))
    np.testing.assert_array_equal(np.asarray(gb, np.float32), np.full((4,), 1920.0))
    assert gx.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(gx)))
