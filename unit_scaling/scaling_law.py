r"""A Chinchilla-form scaling law: the fit, its bootstrap, and what it predicts.

    L(N, D) = E + A / N**alpha + B / D**beta

`N` is the number of **non-embedding** parameters (every parameter except the token
embedding table and the untied readout matrix; norms are counted), `D` the number of
training tokens (steps x global batch x sequence length: packed rows, so padding is
counted as tokens), and the compute `C = 6 N D` FLOPs (forward + backward of the
non-embedding matmuls; attention's `seq x seq` work and the readout are left out, as in
Kaplan et al. 2020). `E` is the irreducible loss: no model and no amount of data of this
family gets below it, so a target loss at or below `E` has no answer.

The fit follows Hoffmann et al. 2022 (Chinchilla, approach 3): minimise the Huber loss
(delta 1e-3) between `log L` and `logsumexp(a - alpha log N, b - beta log D, e)` (with
`A = exp(a)`, `B = exp(b)`, `E = exp(e)`) by L-BFGS from several initial points, keep
the best. The initial points are the best of a grid over the exponents with `E, A, B`
solved by non-negative least squares at each (where Chinchilla uses a grid over all five). The bootstrap refits on runs resampled with replacement; its samples give the
intervals of everything the law predicts.

Shapes grow by one rule (`shape`): depth `L` layers, `d_model = head_dim * (L + 1)`
(so the heads, `L + 1` of them, grow with depth and the head dimension is fixed),
`mlp_dim = mlp_ratio * d_model`; `non_embedding_params` counts such a model of
`configs/causal_lm.py` (pre-norm RMSNorm, SwiGLU, no biases, untied readout).

The law's file (`fit.json`, written by `experiments/scaling_law.py`, read by
`unit_scaling.plan`) is a JSON object:

    schema       "unit_scaling.scaling_law/1"
    params       {"E", "A", "B", "alpha", "beta"}: the fit on every run
    bootstrap    a list of such objects, one per bootstrap refit
    shape_rule   {"head_dim", "mlp_ratio"}: the growth rule above
    launch       {"config", "lr", "global_batch_size", "seq_len", "vocab_size"}: how the
                 runs were trained (the planner's launch command repeats it)
    fitted_on    {"runs", "N": [min, max], "D": [min, max]}: the range of the data
    (other keys, e.g. the held-out check, are for readers and are not required)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from unit_scaling.errors import InputError

SCHEMA = "unit_scaling.scaling_law/1"
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3


class LawError(InputError):
    """A law file that cannot be used, or a request the law cannot answer."""


@dataclasses.dataclass(frozen=True)
class Law:
    """`L(N, D) = E + A / N**alpha + B / D**beta` (see the module docstring)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        """The predicted loss at `n` non-embedding parameters and `d` tokens (arrays broadcast)."""
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def compute_optimal(self, compute: float) -> tuple[float, float]:
        """`(N, D)` minimising the loss at `6 N D = compute` FLOPs (Chinchilla eq. 4):
        `N = G (C/6)^(beta/(alpha+beta))`, `G = (alpha A / (beta B))^(1/(alpha+beta))`."""
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        n = g * (compute / 6.0) ** (self.beta / s)
        return n, compute / (6.0 * n)

    def for_target(self, target: float) -> tuple[float, float]:
        """`(N, D)` reaching loss `target` with the least compute `6 N D`. At that point
        the two terms are in the ratio `alpha A N^-alpha = beta B D^-beta` (the
        Lagrange condition), so with `r = target - E` the parameter term is
        `beta r/(alpha+beta)` and the data term `alpha r/(alpha+beta)`. `LawError` if
        `target <= E`: the irreducible loss cannot be reached at any size."""
        excess = target - self.E
        if not excess > 0:
            raise LawError(
                f"--target_loss {target:g} is not above the fitted irreducible loss E = "
                f"{self.E:.4g}: no model size or token count reaches it under this law; "
                f"ask for a target above {self.E:.4g} (or refit on data that lowers E)")
        s = self.alpha + self.beta
        n = (self.A / (self.beta * excess / s)) ** (1.0 / self.alpha)
        d = (self.B / (self.alpha * excess / s)) ** (1.0 / self.beta)
        return n, d

    def as_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in PARAM_NAMES}


# ---------------------------------------------------------------------------- fitting
def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray,
               log_loss: np.ndarray) -> tuple[float, np.ndarray]:
    """Chinchilla's Huber loss of the log-space residuals and its gradient in
    `theta = (a, b, e, alpha, beta)` (the prediction is a logsumexp of three terms, so
    each term's gradient is its softmax weight)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    residual = top + np.log(total) - log_loss
    weights /= total
    small = np.abs(residual) <= HUBER_DELTA
    value = np.where(small, 0.5 * residual ** 2, HUBER_DELTA * (np.abs(residual) - 0.5 * HUBER_DELTA))
    slope = np.where(small, residual, HUBER_DELTA * np.sign(residual))
    grad = np.array([np.sum(slope * weights[0]), np.sum(slope * weights[1]),
                     np.sum(slope * weights[2]), -np.sum(slope * weights[0] * log_n),
                     -np.sum(slope * weights[1] * log_d)])
    # In units of delta^2: the values are ~1e-6 otherwise, below L-BFGS-B's tolerances.
    return float(value.sum()) / HUBER_DELTA ** 2, grad / HUBER_DELTA ** 2


def _inits(log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
           keep: int = 4) -> list[np.ndarray]:
    """Starting points: for fixed exponents the law is linear in `(E, A, B)`, so a grid
    of `(alpha, beta)` with a non-negative least-squares fit of the rest at each point
    (variable projection) finds the basin cheaply; the `keep` best start the Huber fit."""
    from scipy.optimize import nnls

    loss, floor = np.exp(log_loss), 1e-6
    scored = []
    for alpha, beta in itertools.product(np.linspace(0.05, 1.5, 15), repeat=2):
        design = np.stack([np.ones_like(loss), np.exp(-alpha * log_n), np.exp(-beta * log_d)], 1)
        (e, a, b), residual = nnls(design, loss)
        e = min(e, float(loss.min()) * (1 - 1e-6))
        scored.append((residual, np.log(np.maximum([a, b, e], floor)).tolist() + [alpha, beta]))
    scored.sort(key=lambda x: x[0])
    return [np.array(theta) for _, theta in scored[:keep]]


def fit(n: Sequence[float], d: Sequence[float], loss: Sequence[float],
        inits: Sequence[np.ndarray] | None = None) -> Law:
    """The law fitted to runs at `n` parameters, `d` tokens and final `loss` (see the
    module docstring); `inits` (points `(a, b, e, alpha, beta)`) replace the default
    grid. Needs at least 5 runs with at least 2 values each of `n` and `d`."""
    from scipy.optimize import minimize

    log_n, log_d, log_loss = (np.log(np.asarray(x, dtype=np.float64)) for x in (n, d, loss))
    if len(log_loss) < 5 or len(set(log_n)) < 2 or len(set(log_d)) < 2:
        raise LawError(f"a fit needs >= 5 runs over >= 2 sizes and >= 2 token budgets; got "
                       f"{len(log_loss)} runs, {len(set(log_n))} sizes, {len(set(log_d))} budgets")
    # e below the smallest loss (E cannot exceed a measured loss); exponents in [0, 3].
    low = np.array([-10.0, -10.0, -30.0, 0.0, 0.0])
    high = np.array([40.0, 40.0, float(np.min(log_loss)), 3.0, 3.0])
    best = None
    for x0 in (inits if inits is not None else _inits(log_n, log_d, log_loss)):
        res = minimize(_objective, np.clip(x0, low, high), args=(log_n, log_d, log_loss),
                       jac=True, method="L-BFGS-B", bounds=list(zip(low, high)),
                       options={"ftol": 1e-12, "gtol": 1e-8, "maxiter": 1000})
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))


def _theta(law: Law) -> np.ndarray:
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


def bootstrap(n: Sequence[float], d: Sequence[float], loss: Sequence[float], samples: int,
              seed: int = 0, start: Law | None = None) -> list[Law]:
    """`samples` refits on the runs resampled with replacement (resamples with fewer than
    2 sizes or budgets are drawn again). Each refit starts from the full fit `start`
    (fitted here if None) and one perturbation of it, not the whole grid (cheap)."""
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    start = start or fit(n, d, loss)
    rng = np.random.default_rng(seed)
    theta = _theta(start)
    inits = [theta, theta + rng.normal(0, [1.0, 1.0, 0.1, 0.1, 0.1])]
    laws: list[Law] = []
    while len(laws) < samples:
        idx = rng.integers(0, len(loss), len(loss))
        if len(set(n[idx])) < 2 or len(set(d[idx])) < 2:
            continue
        laws.append(fit(n[idx], d[idx], loss[idx], inits=inits))
    return laws


def interval(values: Sequence[float], level: float = 0.9) -> tuple[float, float]:
    """The central `level` interval (percentiles) of `values`, NaNs dropped."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)])
    if not len(v):
        return (math.nan, math.nan)
    q = (1 - level) / 2 * 100
    return float(np.percentile(v, q)), float(np.percentile(v, 100 - q))


# ----------------------------------------------------------------------- shape rule
def shape(depth: int, head_dim: int, mlp_ratio: int) -> dict[str, int]:
    """The growth rule: `num_layers = depth`, `d_model = head_dim * (depth + 1)`,
    `num_heads = depth + 1`, `mlp_dim = mlp_ratio * d_model`."""
    if depth < 1:
        raise LawError(f"depth {depth}: the growth rule needs at least 1 layer")
    width = head_dim * (depth + 1)
    return {"num_layers": depth, "d_model": width, "num_heads": depth + 1,
            "mlp_dim": mlp_ratio * width}


def non_embedding_params(depth: int, head_dim: int, mlp_ratio: int) -> int:
    """Parameters of the causal LM of `shape(depth, ...)` without the token embedding
    and the readout: per layer the q, k, v, o projections (`4 d^2`), the SwiGLU MLP
    (`3 d m`) and two RMSNorm scales (`2 d`); the final norm (`d`)."""
    s = shape(depth, head_dim, mlp_ratio)
    d, m = s["d_model"], s["mlp_dim"]
    return depth * (4 * d * d + 3 * d * m + 2 * d) + d


def depth_for(n: float, head_dim: int, mlp_ratio: int) -> int:
    """The depth whose `non_embedding_params` is nearest to `n` in log scale (>= 1)."""
    depth = 1
    while non_embedding_params(depth + 1, head_dim, mlp_ratio) < n:
        depth += 1
    above = depth + 1
    if math.log(non_embedding_params(above, head_dim, mlp_ratio) / n) < abs(
            math.log(n / non_embedding_params(depth, head_dim, mlp_ratio))):
        return above
    return depth


# ----------------------------------------------------------------------------- file
def save(path: str, law: Law, samples: Sequence[Law], shape_rule: Mapping[str, int],
         launch: Mapping[str, Any], fitted_on: Mapping[str, Any], **extra: Any) -> dict:
    """Writes the law file (schema in the module docstring); returns its contents."""
    content = {"schema": SCHEMA, "law": "L(N, D) = E + A / N**alpha + B / D**beta",
               "params": law.as_dict(), "bootstrap": [s.as_dict() for s in samples],
               "shape_rule": dict(shape_rule), "launch": dict(launch),
               "fitted_on": dict(fitted_on), **extra}
    with open(path, "w") as f:
        json.dump(content, f, indent=1)
    return content


REQUIRED = {"params": PARAM_NAMES, "shape_rule": ("head_dim", "mlp_ratio"),
            "launch": ("config", "lr", "global_batch_size", "seq_len", "vocab_size"),
            "fitted_on": ("runs", "N", "D")}


def load(path: str) -> tuple[Law, list[Law], dict]:
    """`(law, bootstrap samples, the whole file)`; `LawError` naming `--law` and the
    problem when the file is missing, not JSON, or lacks a field of the schema."""
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        raise LawError(f"--law {path}: no such file; pass the fit.json written by "
                       "`python -m experiments.scaling_law`") from None
    except (OSError, ValueError) as e:
        raise LawError(f"--law {path}: cannot be read as JSON ({e})") from None
    if not isinstance(content, dict) or content.get("schema") != SCHEMA:
        raise LawError(f"--law {path}: not a scaling-law file (expected \"schema\": "
                       f"\"{SCHEMA}\"); pass the fit.json of experiments/scaling_law.py")
    for section, keys in REQUIRED.items():
        missing = [k for k in keys if k not in (content.get(section) or {})]
        if missing:
            raise LawError(f"--law {path}: {section} lacks {', '.join(missing)}; "
                           "rewrite it with `python -m experiments.scaling_law --report_only`")
    law = Law(**{k: float(content["params"][k]) for k in PARAM_NAMES})
    samples = [Law(**{k: float(s[k]) for k in PARAM_NAMES}) for s in content.get("bootstrap", [])]
    return law, samples, content
