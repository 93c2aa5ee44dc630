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
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as jax_core
from jax._src import source_info_util

from unit_scaling.analysis.records import STAT_FIELDS, ScaleRecord, segment_stats

# Primitives whose body is evaluated in place (their values are the body's values).
_INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint"})
_CORE_FILES = tuple(
    os.path.join("unit_scaling", *f.split("/"))
    for f in ("functional.py", "scale.py", "formats/quantisation.py", "formats/policy.py")
)
_FUNCTIONAL_FILE = os.path.join("unit_scaling", "functional.py")
_SCALE_FILE = os.path.join("unit_scaling", "scale.py")
# `scale.share_over_vmap`: identity in both passes outside vmap; not a tensor of its own.
_SHARE_OP = "custom_vjp:share_over_vmap"
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
DEFAULT_LAYER_REGEX = r"^(?:layers?|blocks?|h)_?\d+$"


# --------------------------------------------------------------------- static graph


@dataclasses.dataclass
class _Value:
    """Static description of one tracked value (shapes without the scan axes)."""

    key: str
    order: tuple  # sort key in graph order; scan iterations are inserted at `scan_pos`
    op: str
    role: str
    scope: tuple[str, ...]
    stack: tuple[int, ...] = ()  # lengths of the enclosing scans, outermost first
    scan_pos: tuple[int, ...] = ()  # per scan: where its iteration goes in `order`
    scan_slots: tuple[tuple[int, bool], ...] = ()  # per scan: scope slot of its label
    shape: tuple[int, ...] = ()
    dtype: str = ""
    source: str = ""
    group: int = -1
    group_op: str = ""
    inputs: tuple[str, ...] = ()
    consumers: list = dataclasses.field(default_factory=list)  # (scope, group)
    is_output: bool = False
    is_differentiated: bool = False  # an output that gets a non-zero cotangent
    tag: Optional[str] = None


def _is_float(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _body(eqn) -> tuple[Any, Sequence[Any]]:
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(body, jax_core.ClosedJaxpr):
        return body.jaxpr, body.consts
    return body, ()


def _split_scope(name_stack: str) -> tuple[str, ...]:
    return tuple(p for p in str(name_stack).split("/") if p)


def _frame_str(frame) -> str:
    if frame is None:
        return ""
    parts = frame.file_name.replace(os.sep, "/").split("/")
    return f"{'/'.join(parts[-2:])}:{frame.start_line} ({frame.function_name})"


def _functional_call(source_info) -> Optional[tuple[str, str, int]]:
    """(op name, calling frame, line inside the op) when the equation was traced inside
    a public function of `unit_scaling.functional` called from outside the core."""
    frames = list(source_info_util.user_frames(source_info.traceback))
    op_index = None
    for i, frame in enumerate(frames):  # innermost first
        if not frame.file_name.endswith(_CORE_FILES):
            break
        if frame.file_name.endswith(_FUNCTIONAL_FILE) and not frame.function_name.startswith("_"):
            if "<" not in frame.function_name:
                op_index = i
    if op_index is None:
        return None
    caller = frames[op_index + 1] if op_index + 1 < len(frames) else None
    frame = frames[op_index]
    return frame.function_name, _frame_str(caller), frame.start_line


def _eqn_op(eqn) -> str:
    name = eqn.primitive.name
    if name in ("custom_vjp_call", "custom_jvp_call", "custom_vjp_call_jaxpr"):
        frame = source_info_util.user_frame(eqn.source_info.traceback)
        if frame is not None and frame.file_name.endswith(_SCALE_FILE):
            return f"custom_vjp:{frame.function_name}"
        body = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
        debug = getattr(getattr(body, "jaxpr", body), "debug_info", None)
        fn_name = getattr(debug, "func_name", None) or "?"
        return f"{name.replace('_call', '').replace('_jaxpr', '')}:{fn_name}"
    if name == "name":
        return f"tag:{eqn.params['name']}"
    return name


def _live_outs(jaxpr, in_live: Sequence[bool], descend_scan: bool) -> list[bool]:
    """Which outputs of `jaxpr` depend on a live input (fixpoint through scan carries)."""
    env: dict = {}

    def read(v):
        return False if isinstance(v, jax_core.Literal) else env.get(v, False)

    for v, live in zip(jaxpr.invars, in_live):
        env[v] = live
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _INLINE:
            outs = _live_outs(_body(eqn)[0], ins, descend_scan)
        elif name == "scan" and descend_scan:
            outs = _scan_live(eqn, ins, descend_scan)[0]
        else:
            outs = [any(ins)] * len(eqn.outvars)
        for v, live in zip(eqn.outvars, outs):
            env[v] = live
    return [read(v) for v in jaxpr.outvars]


def _scan_live(eqn, ins, descend_scan):
    n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    body = eqn.params["jaxpr"].jaxpr
    carry = list(ins[n_consts : n_consts + n_carry])
    while True:
        body_in = ins[:n_consts] + carry + ins[n_consts + n_carry :]
        outs = _live_outs(body, body_in, descend_scan)
        new = [a or b for a, b in zip(carry, outs[:n_carry])]
        if new == carry:
            return [*carry, *outs[n_carry:]], body_in
        carry = new


def _key(path: tuple[int, ...], i: int) -> str:
    return ".".join(map(str, path)) + f"#{i}"


class _Graph:
    """Walks a jaxpr once (statically) and describes every tracked value."""

    def __init__(self, descend_scan: bool):
        self.descend_scan = descend_scan
        self.values: dict[str, _Value] = {}
        self.group_ops: dict[int, str] = {}
        self.group_inputs: dict[int, list[str]] = {}
        self._group_state: Optional[tuple] = None
        self._groups = 0

    def _group(self, source_info, scope: tuple[str, ...]) -> int:
        call = _functional_call(source_info)
        if call is None:
            self._group_state = None
            return -1
        fn_name, caller, line = call
        sig = (fn_name, caller, scope)
        state = self._group_state
        if state is not None and state[0] == sig and line >= state[2]:
            gid = state[1]
        else:
            gid = self._groups
            self._groups += 1
            self.group_ops[gid] = f"U.{fn_name}"
            self.group_inputs[gid] = []
        self._group_state = (sig, gid, line)
        return gid

    def walk(
        self, jaxpr, in_keys, in_live, prefix, scope, scans, outer_info=None
    ) -> tuple[list, list]:
        """Returns the (key, live) of `jaxpr`'s outputs. `scans` describes the enclosing
        scans: a tuple of (length, order position, scope slot). `outer_info`: the source
        info of the inlined equation whose body this is; the body's equations that kept
        no user frame (a jitted library function traced earlier) inherit it."""
        env: dict = {}

        def read(v):
            if isinstance(v, jax_core.Literal):
                return None, False
            return env.get(v, (None, False))

        for v, k, live in zip(jaxpr.invars, in_keys, in_live):
            env[v] = (k, live)
        for j, eqn in enumerate(jaxpr.eqns):
            path = prefix + (j,)
            ins = [read(v) for v in eqn.invars]
            in_keys_j = [k for k, _ in ins]
            live = any(lv for _, lv in ins)
            eqn_scope = scope + _split_scope(eqn.source_info.name_stack)
            info = eqn.source_info
            if outer_info is not None and source_info_util.user_frame(info.traceback) is None:
                info = outer_info
            name = eqn.primitive.name
            if _eqn_op(eqn) == _SHARE_OP:  # an identity: its output is its input
                outs = [ins[0] if ins else (None, False)]
            elif name in _INLINE:
                body, _ = _body(eqn)
                outs = self.walk(
                    body, in_keys_j, [lv for _, lv in ins], path, eqn_scope, scans, info
                )
                outs = list(zip(*outs)) if outs[0] else []
            elif name == "scan" and self.descend_scan and live:
                outs = self._walk_scan(eqn, ins, path, eqn_scope, scans)
            else:
                gid = self._group(info, eqn_scope)
                for k in in_keys_j:
                    if k is not None:
                        self.values[k].consumers.append((eqn_scope, gid))
                        if gid >= 0:
                            self.group_inputs[gid].append(k)
                outs = []
                for i, v in enumerate(eqn.outvars):
                    key = None
                    if live and _is_float(v.aval) and not isinstance(v, jax_core.DropVar):
                        key = _key(path, i)
                        self.values[key] = self._new_value(
                            key, eqn, info, path, i, eqn_scope, scans, gid,
                            tuple(k for k in in_keys_j if k is not None),
                        )
                    outs.append((key, live))
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jax_core.DropVar):
                    env[v] = o
        outs = [read(v) for v in jaxpr.outvars]
        return [k for k, _ in outs], [lv for _, lv in outs]

    def _new_value(self, key, eqn, info, path, i, scope, scans, gid, inputs) -> _Value:
        if gid >= 0:
            source = _functional_call(info)[1]
        else:
            source = _frame_str(source_info_util.user_frame(info.traceback))
        return _Value(
            key=key,
            order=path + (i,),
            op=_eqn_op(eqn),
            role="activation",
            scope=scope,
            stack=tuple(s[0] for s in scans),
            scan_pos=tuple(s[1] for s in scans),
            scan_slots=tuple(s[2] for s in scans),
            shape=tuple(eqn.outvars[i].aval.shape),
            dtype=str(eqn.outvars[i].aval.dtype),
            source=source,
            group=gid,
            group_op=self.group_ops.get(gid, ""),
            inputs=inputs,
            tag=eqn.params["name"] if eqn.primitive.name == "name" else None,
        )

    def _walk_scan(self, eqn, ins, path, scope, scans):
        self._group_state = None
        params = eqn.params
        n_consts = params["num_consts"]
        body = params["jaxpr"].jaxpr
        outer_live, body_live = _scan_live(eqn, [lv for _, lv in ins], self.descend_scan)
        for k, _ in ins:
            if k is not None:
                self.values[k].consumers.append((scope, -1))
        # Constants keep their outer key; carries and xs change every iteration.
        body_keys = [k for k, _ in ins[:n_consts]] + [None] * (len(ins) - n_consts)
        # The label of this scan's iterations: the first scope component inside it.
        first = [_split_scope(e.source_info.name_stack) for e in body.eqns]
        has_label = any(first)
        slot = (len(scope), has_label)
        inner = scans + ((params["length"], len(path), slot),)
        out_keys, _ = self.walk(body, body_keys, body_live, path, scope, inner)
        for k in out_keys:
            if k is not None:
                self.values[k].consumers.append((scope, -1))
        self._group_state = None
        return [(None, lv) for lv in outer_live]

    def add_arg(self, key, name_parts, aval, order) -> None:
        self.values[key] = _Value(
            key=key,
            order=order,
            op="arg",
            role="input",
            scope=name_parts,
            shape=tuple(aval.shape),
            dtype=str(aval.dtype),
        )


# --------------------------------------------------------------------- interpreter


class _Interpreter:
    """Evaluates a jaxpr with probes added to the tracked values, collecting them."""

    def __init__(self, graph: _Graph):
        self.graph = graph

    def eval(self, jaxpr, consts, args, prefix, probes, values) -> list:
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jax_core.Literal) else env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        for j, eqn in enumerate(jaxpr.eqns):
            path = prefix + (j,)
            invals = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            if name in _INLINE:
                body, body_consts = _body(eqn)
                outs = self.eval(body, body_consts, invals, path, probes, values)
            elif name == "scan" and self.graph.descend_scan and _scan_has_values(path, probes):
                outs = self._scan(eqn, invals, path, probes, values)
            else:
                bind_params = eqn.primitive.get_bind_params(eqn.params)
                with source_info_util.user_context(eqn.source_info.traceback), eqn.ctx.manager:
                    outs = eqn.primitive.bind(*invals, **bind_params)
                outs = list(outs) if eqn.primitive.multiple_results else [outs]
                for i in range(len(outs)):
                    key = _key(path, i)
                    if key in probes:
                        outs[i] = outs[i] + probes[key]
                        values[key] = outs[i]
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jax_core.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def _scan(self, eqn, invals, path, probes, values) -> list:
        params = eqn.params
        n_consts, n_carry = params["num_consts"], params["num_carry"]
        body = params["jaxpr"]
        consts = invals[:n_consts]
        init = invals[n_consts : n_consts + n_carry]
        xs = invals[n_consts + n_carry :]
        prefix = ".".join(map(str, path)) + "."
        scan_probes = {k: p for k, p in probes.items() if k.startswith(prefix)}

        def step(carry, x_and_probes):
            x, step_probes = x_and_probes
            step_values: dict = {}
            outs = self.eval(
                body.jaxpr, body.consts, [*consts, *carry, *x], path, step_probes, step_values
            )
            carry = [o.astype(c.dtype) for o, c in zip(outs[:n_carry], carry)]
            return carry, (outs[n_carry:], step_values)

        carry, (ys, scan_values) = jax.lax.scan(
            step,
            list(init),
            (list(xs), scan_probes),
            length=params["length"],
            reverse=params["reverse"],
            unroll=params.get("unroll", 1),
        )
        values.update(scan_values)
        return [*carry, *ys]


def _scan_has_values(path, probes) -> bool:
    prefix = ".".join(map(str, path)) + "."
    return any(k.startswith(prefix) for k in probes)


# -------------------------------------------------------------------------- running


@dataclasses.dataclass
class Trace:
    """Everything `track_scales` measured, before it is turned into records.

    `values[key]` describes a tracked value; `forward[key]`/`backward[key]` map each
    statistic to a numpy array with one entry per scan iteration (one entry outside
    scans). Views (`track_scales`, `track_model_scales`) select and name values.
    """

    values: dict[str, _Value]
    forward: dict[str, dict[str, np.ndarray]]
    backward: dict[str, dict[str, np.ndarray]]
    group_ops: dict[int, str]
    group_inputs: dict[int, list[str]]
    outputs: Any


def _path_part(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _default_cotangent(out_avals, n_differentiated: int, seed: int) -> list:
    cotangents = []
    key = jax.random.key(seed)
    for i, aval in enumerate(out_avals):
        if not _is_float(aval):
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

    graph = _Graph(descend_scan=scan == "iterations")
    arg_keys = []
    for i, (path, var) in enumerate(zip(arg_paths, jaxpr.invars)):
        argnum = int(_path_part(path[0]))
        key = None
        if _is_float(var.aval) and (argnums is None or argnum in argnums):
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
    interp = _Interpreter(graph)
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


# ---------------------------------------------------------------------------- views


def escapes(value: _Value, unit) -> bool:
    """Whether `value` is used outside the unit `unit(scope, group) -> hashable`."""
    own = unit(value.scope, value.group)
    return value.is_output or any(unit(s, g) != own for s, g in value.consumers)


def iteration_names(
    value: _Value, strip_root: Optional[str] = None
) -> list[tuple[tuple[str, ...], Optional[int], tuple]]:
    """Per iteration of the enclosing scans: (scope components with `[i]` labels,
    outermost iteration index or None, graph-order key)."""
    out = []
    for flat, its in enumerate(np.ndindex(*value.stack) if value.stack else [()]):
        comps = list(value.scope)
        for (pos, has_label), t in reversed(list(zip(value.scan_slots, its))):
            if has_label and pos < len(comps):
                comps[pos] = f"{comps[pos]}[{t}]"
            else:
                comps.insert(min(pos, len(comps)), f"scan[{t}]")
        if strip_root and comps and comps[0] == strip_root:
            comps = comps[1:]
        if strip_root and comps and comps[0].startswith(strip_root + "."):
            comps[0] = comps[0][len(strip_root) + 1 :]  # a method of the root module
        order = list(value.order)
        for pos, t in reversed(list(zip(value.scan_pos, its))):
            order.insert(pos, t)
        out.append((tuple(comps), its[0] if its else None, tuple(order)))
    return out


def layer_of(comps: Sequence[str], regex: str = DEFAULT_LAYER_REGEX) -> str:
    """The layer a tensor belongs to: the first scope component that is a scan
    iteration (`name[i]`) or matches `regex` (`layers_3`, `block2`, `h_0`), else the
    first component, else ""."""
    pattern = re.compile(regex)
    for c in comps:
        if c.endswith("]") or pattern.match(c):
            return c
    return comps[0] if comps else ""


def make_records(
    trace: Trace,
    entries: Sequence[tuple[str, str, Optional[str], Sequence[str]]],
    *,
    strip_root: Optional[str] = None,
    layer_regex: str = DEFAULT_LAYER_REGEX,
) -> list[ScaleRecord]:
    """Records for `entries` = (value key, op, suffix or None, input keys), graph order.

    The record name is the value's scope (with `[i]` scan labels, `strip_root`
    removed) followed by `/<suffix>` (by `:k` alone if the suffix starts with `:`);
    with no suffix, by `/<op>:<k>` where k counts that op in that scope in graph order.
    """
    rows = []
    for key, op, suffix, inputs in entries:
        for flat, (comps, it, order) in enumerate(iteration_names(trace.values[key], strip_root)):
            rows.append((order, key, flat, op, suffix, comps, it, inputs))
    rows.sort(key=lambda r: r[0])
    counts: dict[tuple, int] = {}
    names: dict[tuple[str, int], str] = {}
    for order, key, flat, op, suffix, comps, it, inputs in rows:
        if suffix is None:
            count_key = (comps, op)
            counts[count_key] = counts.get(count_key, -1) + 1
            suffix = f"{op}:{counts[count_key]}"
        name = "/".join(comps)
        if suffix.startswith(":") or not name:
            name += suffix
        elif suffix:
            name += "/" + suffix
        names[(key, flat)] = name

    def input_name(k, flat, stack):
        if (k, flat) in names and trace.values[k].stack == stack:
            return names[(k, flat)]
        return names.get((k, 0))

    records = []
    for index, (order, key, flat, op, _, comps, it, inputs) in enumerate(rows):
        v = trace.values[key]
        input_names = [input_name(k, flat, v.stack) for k in inputs]
        for kind, stats in (("forward", trace.forward[key]), ("backward", trace.backward[key])):
            records.append(
                ScaleRecord(
                    name=names[(key, flat)],
                    kind=kind,
                    op=op,
                    role=v.role,
                    index=index,
                    shape=v.shape,
                    dtype=v.dtype,
                    **{f: float(stats[f][flat]) for f in STAT_FIELDS},
                    scope="/".join(comps) if v.role == "activation" else "",
                    source=v.source,
                    layer=layer_of(comps, layer_regex),
                    iteration=it,
                    inputs=tuple(n for n in input_names if n is not None),
                )
            )
    return records


def _same_scale(trace: Trace, a: str, b: str, rtol: float = 1e-6) -> bool:
    """Whether values `a` and `b` have equal forward and backward RMS everywhere."""
    if trace.values[a].stack != trace.values[b].stack:
        return False
    return all(
        np.allclose(s[a]["rms"], s[b]["rms"], rtol=rtol, atol=0.0, equal_nan=True)
        for s in (trace.forward, trace.backward)
    )


def op_entries(
    trace: Trace, granularity: str = "op", prune_same_scale: bool = True
) -> list[tuple[str, str, Optional[str], tuple[str, ...]]]:
    """The entries (see `make_records`) of the `track_scales` view: arguments, then one
    entry per unit output (see the module docstring for what a unit is)."""
    if granularity not in ("op", "eqn"):
        raise ValueError(f"granularity must be 'op' or 'eqn', got {granularity!r}")
    redirect: dict[str, str] = {}
    entries = []

    def resolve(keys):
        out = []
        for k in keys:
            while k in redirect:
                k = redirect[k]
            if k not in out:
                out.append(k)
        return tuple(out)

    for key, v in sorted(trace.values.items(), key=lambda kv: kv[1].order):
        if key not in trace.forward:  # not measured (empty, or not selected)
            continue
        if v.role == "input":
            entries.append((key, "arg", "", ()))
            continue
        if granularity == "op" and v.group >= 0:
            if not escapes(v, lambda scope, group: group):
                continue
            op = trace.group_ops[v.group]
            inputs = resolve(
                k for k in trace.group_inputs[v.group] if trace.values[k].group != v.group
            )
        else:
            op = v.op
            inputs = resolve(v.inputs)
            if (
                prune_same_scale
                and len(inputs) == 1
                and not v.is_output
                and v.tag is None
                and _same_scale(trace, key, inputs[0])
            ):
                redirect[key] = inputs[0]
                continue
        entries.append((key, op, None, inputs))
    return entries


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
