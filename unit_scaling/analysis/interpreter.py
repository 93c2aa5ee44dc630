"""The jaxpr side of scale tracking (`tracking.py` says what is tracked and how).

`Graph` walks a jaxpr once, statically, and describes every tracked value (`Value`):
its op, scope, shape, enclosing scans, the `unit_scaling.functional` call it was traced
in (its group) and its consumers. `Interpreter` evaluates the jaxpr equation by
equation, adding a zero probe to every tracked value and collecting the values, so that
the gradients with respect to the probes are those of the values. `Trace` is what a
run measured. This module uses `jax._src` (`core`, `source_info_util`), checked against
jax 0.10.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as jax_core
from jax._src import source_info_util

# Primitives whose body is evaluated in place (their values are the body's values).
_INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint"})
_CORE_FILES = tuple(
    os.path.join("unit_scaling", *f.split("/"))
    for f in ("scale.py", "formats/quantisation.py", "formats/policy.py")
)
_FUNCTIONAL_DIR = os.path.join("unit_scaling", "functional")  # the ops, one file per family
_SCALE_FILE = os.path.join("unit_scaling", "scale.py")
# `scale.share_over_vmap`: identity in both passes outside vmap; not a tensor of its own.
_SHARE_OP = "custom_vjp:share_over_vmap"


# --------------------------------------------------------------------- static graph


@dataclasses.dataclass
class Value:
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


def is_float(aval) -> bool:
    """Whether an abstract value (or array) has a floating-point dtype."""
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
        in_functional = os.path.dirname(frame.file_name).endswith(_FUNCTIONAL_DIR)
        if not (in_functional or frame.file_name.endswith(_CORE_FILES)):
            break
        if in_functional and not frame.function_name.startswith("_"):
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


class Graph:
    """Walks a jaxpr once (statically) and describes every tracked value."""

    def __init__(self, descend_scan: bool):
        self.descend_scan = descend_scan
        self.values: dict[str, Value] = {}
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
                    if live and is_float(v.aval) and not isinstance(v, jax_core.DropVar):
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

    def _new_value(self, key, eqn, info, path, i, scope, scans, gid, inputs) -> Value:
        if gid >= 0:
            source = _functional_call(info)[1]
        else:
            source = _frame_str(source_info_util.user_frame(info.traceback))
        return Value(
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
        self.values[key] = Value(
            key=key,
            order=order,
            op="arg",
            role="input",
            scope=name_parts,
            shape=tuple(aval.shape),
            dtype=str(aval.dtype),
        )


# --------------------------------------------------------------------- interpreter


class Interpreter:
    """Evaluates a jaxpr with probes added to the tracked values, collecting them."""

    def __init__(self, graph: Graph):
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


@dataclasses.dataclass
class Trace:
    """Everything `track_scales` measured, before it is turned into records.

    `values[key]` describes a tracked value; `forward[key]`/`backward[key]` map each
    statistic to a numpy array with one entry per scan iteration (one entry outside
    scans). Views (`track_scales`, `track_model_scales`) select and name values.
    """

    values: dict[str, Value]
    forward: dict[str, dict[str, np.ndarray]]
    backward: dict[str, dict[str, np.ndarray]]
    group_ops: dict[int, str]
    group_inputs: dict[int, list[str]]
    outputs: Any
