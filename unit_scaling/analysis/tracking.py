"""Scale tracking of any JAX function: `track_scales(fn)(*args) -> list[ScaleRecord]`.

How it works. `fn` is traced to a jaxpr (`jax.make_jaxpr`). A small interpreter
evaluates the jaxpr equation by equation and adds a zero "probe" to every tracked
value; `jax.vjp` with respect to the probes then gives, exactly, the gradient of the
output with respect to every intermediate (the probe enters additively, so
`d out / d probe = d out / d value`). Values, gradients and their statistics are computed
in one `jax.jit`-compiled call; only the statistics leave the device.

What is tracked (one record per tensor and direction, see `records.ScaleRecord`):

- every floating-point argument of `fn` (`role="input"`), and
- every floating-point value computed from the arguments (values computed only from
  constants, such as masks built with `iota`, are skipped; so are integer values).

What is reported as a unit (`granularity`):

- `"op"` (default): one call of a public function of `unit_scaling.functional`
  (`U.linear`, `U.gelu`, ...) is ONE unit named `U.<fn>`. A scaled op is several
  equations (`scale_bwd` custom_vjp's on its inputs, the plain JAX op, a `scale_fwd`
  custom_vjp on its output); only the values that leave the op are reported (its
  output), and the op's `inputs` name the tensors it consumed, whose backward records
  are the op's input gradients (with the op's backward scales applied). Equations are
  grouped by their Python traceback: consecutive equations traced inside one call
  (same op, same calling line, same name stack). Two calls of the same op from the same
  line with nothing traced between them (a Python loop around a single op) merge into
  one unit.
- Every other equation is a unit named by its primitive. A `custom_vjp_call` or
  `custom_jvp_call` (e.g. `jax.nn.relu`) is one unit: its body is not entered.
- `"eqn"`: every equation is a unit, including each `scale_fwd`/`scale_bwd` of the
  scaled ops (`op="custom_vjp:scale_fwd"`...).

Transformations:

- `jit`/`pjit`, `closed_call` and `remat`/`checkpoint` bodies are entered (inlined):
  their equations are reported as if they were written in place, and the name stacks
  nest. Values and gradients are the same as without them (remat only changes memory).
- `scan` (`jax.lax.scan`, Flax `nn.scan`): with `scan="iterations"` (default) the body
  is entered and every body value gets one record per iteration (`iteration=i`, `[i]`
  in the name after the scanned scope, e.g. `layers[3]/mlp/U.linear:0`), computed from
  the stacked per-iteration values. With `scan="unit"` the scan is one unit reporting
  its outputs (final carry and stacked `ys`, statistics over all iterations).
- `while_loop`, `cond`, `shard_map`, and any other primitive with a body are units.

Backward records. The backward record of a tensor is the gradient of the output with
respect to it: for `y = 2 * x`, `y`'s backward record is the cotangent arriving at `y`
and `x`'s backward record is `2 * cotangent`, so with unit-RMS `x` and cotangent the
`mul` unit reads RMS 2 forward and its input `x` reads RMS 2 backward. Cotangent: for a
scalar output, 1 (the gradient of the output itself); for a non-scalar output, a normal
sample (fixed seed) rescaled to RMS exactly 1; or the `cotangent` given.

Cost and limits. All measured values and gradients are alive at once inside the one
compiled call (as under a training step without remat), plus a float32 copy for the
statistics; it is compiled at XLA optimisation level 0 (`fast_compile`), since it runs
once. `inputs` are not linked across a scan boundary (a body's carry-in, a consumer of
the scan's outputs). The interpreter uses `jax._src` (`core`, `source_info_util`),
checked against jax 0.10.

Modules: `interpreter.py` walks and evaluates the jaxpr (`trace_scales`, here, runs
it); `grouping.py` turns a `Trace` into records (units, names).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling.analysis.grouping import escapes, make_records, op_entries
from unit_scaling.analysis.interpreter import Graph, Interpreter, Trace, is_float
from unit_scaling.analysis.records import ScaleRecord, segment_stats

_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _path_part(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _default_cotangent(out_avals, n_differentiated: int, seed: int) -> list:
    cotangents = []
    key = jax.random.key(seed)
    for i, aval in enumerate(out_avals):
        if not is_float(aval):
            cotangents.append(np.zeros(aval.shape, jax.dtypes.float0))
        elif i >= n_differentiated:
            cotangents.append(jnp.zeros(aval.shape, aval.dtype))
        elif math.prod(aval.shape) == 1:
            cotangents.append(jnp.ones(aval.shape, aval.dtype))
        else:
            g = jax.random.normal(jax.random.fold_in(key, i), aval.shape, jnp.float32)
            g = g / jnp.sqrt(jnp.mean(jnp.square(g)))
            cotangents.append(g.astype(aval.dtype))
    return cotangents


def trace_scales(
    fn: Callable,
    args: Sequence[Any],
    *,
    argnums: Optional[Union[int, Sequence[int]]] = None,
    cotangent: Any = None,
    has_aux: bool = False,
    scan: str = "iterations",
    seed: int = 0,
    prepare: Optional[Callable[[dict], None]] = None,
    select: Optional[Callable[[dict], set]] = None,
    fast_compile: bool = True,
    abstract: bool = False,
) -> Trace:
    """Runs `fn(*args)` forward and backward and measures every tracked value.

    The lower-level entry point of `track_scales` (same arguments); returns a `Trace`.
    `prepare(values)` may edit the static value descriptions before anything runs
    (the model view names and unstacks parameters with it); `select(values)` returns
    the keys to measure (default all), which keeps the compiled program small.
    `fast_compile`: compile with XLA backend optimisation level 0 (a one-shot
    measurement: compiling 2-3x faster matters more than running fast).
    `abstract`: trace everything (the interpreter, the probes, the backward pass, the
    statistics) with `jax.eval_shape` instead of running it: `args` may be
    `jax.ShapeDtypeStruct`s, nothing is allocated, and every statistic is NaN (a dry
    run that checks a model goes through, and names its tensors, at any size).
    """
    if scan not in ("iterations", "unit"):
        raise ValueError(f"scan must be 'iterations' or 'unit', got {scan!r}")
    if isinstance(argnums, int):
        argnums = (argnums,)
    if argnums is not None:
        bad = [a for a in argnums if not 0 <= a < len(args)]
        if bad:
            raise ValueError(f"argnums {bad} out of range for {len(args)} arguments")
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    jaxpr = closed.jaxpr
    flat_args, _ = jax.tree_util.tree_flatten(args)
    arg_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(args)[0]]
    if len(flat_args) != len(jaxpr.invars):
        raise ValueError("could not match the arguments to the traced function's inputs")

    graph = Graph(descend_scan=scan == "iterations")
    arg_keys = []
    for i, (path, var) in enumerate(zip(arg_paths, jaxpr.invars)):
        argnum = int(_path_part(path[0]))
        key = None
        if is_float(var.aval) and (argnums is None or argnum in argnums):
            key = f"arg{i}"
            name = (f"arg{argnum}",) + tuple(_path_part(p) for p in path[1:])
            graph.add_arg(key, name, var.aval, (-1, i))
        arg_keys.append(key)
    out_keys, _ = graph.walk(
        jaxpr, arg_keys, [True] * len(arg_keys), (), (), ()
    )
    for k in out_keys:
        if k is not None:
            graph.values[k].is_output = True

    if prepare is not None:
        prepare(graph.values)

    out_leaves, out_tree = jax.tree_util.tree_flatten(out_shape)
    n_diff = len(out_leaves)
    if has_aux:
        if not isinstance(out_shape, (tuple, list)) or len(out_shape) < 2:
            raise ValueError("has_aux=True needs fn to return a tuple (output, aux)")
        n_diff = len(jax.tree_util.tree_leaves(out_shape[0]))
    for k in out_keys[:n_diff]:
        if k is not None:
            graph.values[k].is_differentiated = True
    if cotangent is None:
        cotangents = _default_cotangent(out_leaves, n_diff, seed)
    else:
        target = out_shape[0] if has_aux else out_shape
        given = jax.tree_util.tree_leaves(cotangent)
        if len(given) != n_diff:
            raise ValueError(
                f"cotangent has {len(given)} leaves, the output has {n_diff}; give one "
                "array per output leaf (shape and dtype of the output)"
            )
        for g, t in zip(given, jax.tree_util.tree_leaves(target)):
            if tuple(np.shape(g)) != tuple(t.shape):
                raise ValueError(f"cotangent shape {np.shape(g)} != output shape {t.shape}")
        cotangents = [jnp.asarray(g, t.dtype) for g, t in zip(given, out_leaves)]
        cotangents += _default_cotangent(out_leaves, n_diff, seed)[n_diff:]

    values = graph.values
    chosen = set(values) if select is None else set(select(values))
    probe_specs = {
        k: (v.stack + v.shape, v.dtype) for k, v in values.items() if k in chosen
    }
    interp = Interpreter(graph)
    arg_index = {k: i for i, k in enumerate(arg_keys) if k is not None}

    def run(flat_args, consts, cotangents):
        probes = {k: jnp.zeros(s, d) for k, (s, d) in probe_specs.items()}

        def forward(probes):
            collected: dict = {}
            args_p = list(flat_args)
            for k, i in arg_index.items():
                if k not in probes:
                    continue
                args_p[i] = args_p[i] + probes[k]
                collected[k] = args_p[i]
            outs = interp.eval(jaxpr, consts, args_p, (), probes, collected)
            return outs, collected

        outs, vjp_fn, collected = jax.vjp(forward, probes, has_aux=True)
        (grads,) = vjp_fn(list(cotangents))

        def as_rows(arrays):
            return [arrays[k].reshape((r, -1)) for k, r in zip(keys, rows)]

        fwd = segment_stats(as_rows(collected)) if keys else {}
        bwd = segment_stats(as_rows(grads)) if keys else {}
        return outs, fwd, bwd

    keys = [k for k in probe_specs if math.prod(probe_specs[k][0]) > 0]
    rows = [math.prod(values[k].stack) for k in keys]
    starts = np.cumsum([0] + rows)

    def split(flat_stats):
        return {
            k: {f: v[starts[i] : starts[i + 1]] for f, v in flat_stats.items()}
            for i, k in enumerate(keys)
        }

    if abstract:
        outs, fwd, bwd = jax.tree.map(
            lambda s: np.full(s.shape, np.nan, np.float32)
            if jnp.issubdtype(s.dtype, jnp.floating) else s,
            jax.eval_shape(run, flat_args, closed.consts, cotangents),
        )
    else:
        outs, fwd, bwd = jax.device_get(
            jax.jit(run, compiler_options=_FAST_COMPILE if fast_compile else None)(
                flat_args, closed.consts, cotangents
            )
        )
    fwd, bwd = split(fwd), split(bwd)
    return Trace(
        values=values,
        forward=fwd,
        backward=bwd,
        group_ops=graph.group_ops,
        group_inputs=graph.group_inputs,
        outputs=jax.tree_util.tree_unflatten(out_tree, outs),
    )


def track_scales(
    fn: Callable,
    *,
    argnums: Optional[Union[int, Sequence[int]]] = None,
    cotangent: Any = None,
    has_aux: bool = False,
    granularity: str = "op",
    scan: str = "iterations",
    prune_same_scale: bool = True,
    seed: int = 0,
) -> Callable[..., list[ScaleRecord]]:
    """Wraps `fn` so that calling it returns the scale records of every tensor.

    `track_scales(fn, ...)(*args, **kwargs) -> list[ScaleRecord]`, forward and backward
    record of each tracked tensor (module docstring: what is tracked, what is a unit,
    how jit/custom_vjp/scan/remat are handled), in graph order: arguments first.

    Args:
      fn: any JAX-traceable function (jitted or not); keyword arguments given at call
        time are passed through untracked.
      argnums: positional arguments whose (floating) leaves get records; default all.
        Intermediate values are tracked whatever `argnums` is.
      cotangent: the output gradient (a pytree like the output, or like the first
        output with `has_aux`). Default: 1 for a scalar output, otherwise a normal
        sample (seed `seed`) rescaled to RMS exactly 1.
      has_aux: `fn` returns `(output, aux)`; only `output` is differentiated.
      granularity: "op" (a `unit_scaling.functional` call is one unit) or "eqn".
      scan: "iterations" (per-iteration records of scan bodies) or "unit".
      prune_same_scale: drop units with one input whose forward and backward RMS both
        equal that input's (reshapes, transposes, casts...), as the reference's plot
        does; their consumers then name the input directly.
      seed: seed of the default cotangent.
    """

    def tracked(*args, **kwargs) -> list[ScaleRecord]:
        f = (lambda *a: fn(*a, **kwargs)) if kwargs else fn
        def select(values):  # what op_entries can report (the op view hides the rest)
            if granularity != "op":
                return set(values)
            return {
                k for k, v in values.items()
                if v.group < 0 or escapes(v, lambda scope, group: group)
            }

        trace = trace_scales(
            f, args, argnums=argnums, cotangent=cotangent, has_aux=has_aux,
            scan=scan, seed=seed, select=select,
        )
        return make_records(trace, op_entries(trace, granularity, prune_same_scale))

    return tracked
