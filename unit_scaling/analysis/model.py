"""Model view: the scales of a Flax model's named tensors, grouped by layer.

`track_model_scales(model, variables, *batch)` runs `model.apply(variables, *batch)`
(which must return a scalar loss, or a tuple whose first element is the loss) forward
and backward through `track_scales`'s machinery and reports:

- every parameter (each leaf of `variables`, named by its path without the `params/`
  prefix, `op="param"`), forward = its value, backward = its gradient. Parameters of a
  scanned module (`nn.scan`, stacked on a leading axis of the scan length) get one
  record per iteration (`layers[3]/mlp/kernel`).
- every Flax module output (`op="module"`): a value computed inside a module's name
  scope (Flax linen wraps each module method in one) and used outside it, named by the
  outermost module it leaves (`layers_0/mlp`; `:k` when a module returns several
  tensors). Inside `nn.scan`, one record per iteration (`layers[3]`): the residual
  stream after every layer is the scanned layer's output.
- every `jax.ad_checkpoint.checkpoint_name`-tagged value (`op="tag:<name>"`), named
  `<module path>/<name>`: models tag e.g. attention logits and probabilities or the
  MLP hidden this way.
- the loss (the function output) and, with `detail="ops"`, every op-level unit of
  `track_scales` as well.

`layer` groups the records: a scan iteration (`layers[3]`), else the first path
component matching `layer_regex` (`layers_3`, `block_1`, `h_0`), else the first path
component (`embed`, `head`), else "".
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax

from unit_scaling.analysis.records import ScaleRecord
from unit_scaling.analysis.grouping import DEFAULT_LAYER_REGEX, escapes, make_records, op_entries
from unit_scaling.analysis.interpreter import Value
from unit_scaling.analysis.tracking import trace_scales


def _module_exit(value: Value, root: int) -> Optional[int]:
    """The depth of the outermost module scope (below the first `root` components)
    that `value` leaves, or None."""
    for depth in range(root + 1, len(value.scope) + 1):
        prefix = value.scope[:depth]
        if escapes(value, lambda scope, group: scope[:depth] == prefix):
            return depth
    return None


def _scan_labels(values: dict[str, Value]) -> dict[str, int]:
    """Scope component -> scan length, for the scans with a module label."""
    labels: dict[str, int] = {}
    for v in values.values():
        for (pos, has_label), length in zip(v.scan_slots, v.stack):
            if has_label and pos < len(v.scope):
                labels[v.scope[pos]] = length
    return labels


def _prepare_params(values: dict[str, Value]) -> None:
    """Names the arguments as parameters and marks scanned (stacked) ones, so their
    statistics are computed per iteration."""
    scan_labels = _scan_labels(values)
    group_start: dict[tuple, int] = {}
    for v in sorted(values.values(), key=lambda v: v.order):
        if v.role != "input":
            continue
        parts = v.scope[1:]  # drop "argN"
        if parts and parts[0] == "params":
            parts = parts[1:]
        v.role = "param"
        v.scope = parts
        # A stacked parameter of a scanned module: one record per iteration, ordered
        # layer by layer (all of iteration 0's parameters, then iteration 1's...).
        for i, part in enumerate(parts):
            length = scan_labels.get(part)
            if length is not None and v.shape and v.shape[0] == length:
                group = parts[: i + 1]
                first = group_start.setdefault(group, v.order[1])
                v.stack, v.shape = (length,), v.shape[1:]
                v.order = (v.order[0], first, v.order[1])
                v.scan_pos, v.scan_slots = (2,), ((i, True),)
                break


def track_model_scales(
    model: Union[nn.Module, Callable[..., Any]],
    variables: Any,
    *batch: Any,
    detail: str = "modules",
    layer_regex: str = DEFAULT_LAYER_REGEX,
    cotangent: Any = None,
    scan: str = "iterations",
    abstract: bool = False,
    **apply_kwargs: Any,
) -> list[ScaleRecord]:
    """Scale records of a Flax model's parameters, module outputs and tagged values.

    Args:
      model: a Flax linen module (its `apply` is called) or any
        `apply_fn(variables, *batch, **apply_kwargs)`.
      variables: the model variables (`{"params": ...}` and other collections).
      *batch: the remaining positional arguments of `apply`.
      detail: "modules" (parameters, module outputs, tags, loss) or "ops" (also every
        op-level unit of `track_scales`).
      layer_regex: which path components name a layer (see the module docstring).
      cotangent: gradient of the loss; default 1 (a scalar loss).
      scan: "iterations" (per-layer records under `nn.scan`) or "unit".
      abstract: a dry run (`trace_scales(abstract=True)`): `variables` and `batch` may
        be `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape(model.init, ...)`);
        the records name every tensor with its shape, all statistics NaN.
      **apply_kwargs: passed to `apply` (e.g. `rngs`, `deterministic=True`); untracked.

    Returns:
      Forward and backward records in graph order: parameters first, then the
      activations in execution order.
    """
    if detail not in ("modules", "ops"):
        raise ValueError(f"detail must be 'modules' or 'ops', got {detail!r}")
    is_module = isinstance(model, nn.Module)
    apply = model.apply if is_module else model

    def fn(variables, *batch):
        return apply(variables, *batch, **apply_kwargs)

    variables = nn.meta.unbox(variables)  # logical-axis boxes -> plain arrays
    out_shape = jax.eval_shape(fn, variables, *batch)
    has_aux = isinstance(out_shape, (tuple, list))
    loss_shape = out_shape[0] if has_aux else out_shape
    if getattr(loss_shape, "shape", None) != ():
        raise ValueError(
            "track_model_scales needs apply(variables, *batch) to return a scalar loss "
            f"or a tuple (loss, ...); got {out_shape}. Wrap the model in a loss function."
        )
    root = type(model).__name__ if is_module else None
    n_root = 1 if root is not None else 0
    chosen: dict[str, tuple] = {}

    def select(values: dict[str, Value]) -> set[str]:
        """The named tensors (static: from the graph, before anything runs)."""
        module_counts: dict[tuple, int] = {}
        for key, v in sorted(values.items(), key=lambda kv: kv[1].order):
            if v.role == "param":
                chosen[key] = (key, "param", "", ())
            elif v.role != "activation":
                continue
            elif v.tag is not None:
                chosen[key] = (key, f"tag:{v.tag}", v.tag, ())
            elif (depth := _module_exit(v, n_root)) is not None and (
                root is None or v.scope[:1] == (root,)
            ):
                path = v.scope[n_root:depth]
                count = module_counts.get(path, 0)
                module_counts[path] = count + 1
                v.scope = v.scope[:depth]
                chosen[key] = (key, "module", f":{count}" if count else "", ())
            elif v.is_differentiated:
                chosen[key] = (key, "loss", "loss", ())
        return set(values) if detail == "ops" else set(chosen)

    trace = trace_scales(
        fn, (variables, *batch), argnums=0, cotangent=cotangent, has_aux=has_aux,
        scan=scan, prepare=_prepare_params, select=select, abstract=abstract,
    )
    if detail == "ops":
        for entry in op_entries(trace, "op", prune_same_scale=True):
            if entry[0] not in chosen and trace.values[entry[0]].role == "activation":
                chosen[entry[0]] = entry
    entries = sorted(chosen.values(), key=lambda e: trace.values[e[0]].order)
    return make_records(
        trace, entries, strip_root=root, layer_regex=layer_regex
    )
