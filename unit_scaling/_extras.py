"""Optional dependencies: a clear ImportError that names the extra to install.

The core (`scale`, `functional`, `formats`, `optim` without Flax, `analysis.track_scales`)
needs only jax, numpy, ml_dtypes and optax. The rest needs an extra of the distribution:
`[flax]` (nn, models, parametrization, params, optim with boxed params), `[analysis]` (plots),
`[train]` (training stack and data), `[all]`.
"""

from __future__ import annotations

import importlib.util

DISTRIBUTION = "unit-scaling-jax"


def require(extra: str, user: str, *modules: str) -> None:
    """Raises ImportError, saying that `user` needs it and which extra of the distribution
    installs it, when one of the top-level packages `modules` cannot be found (found
    ones are not imported here)."""
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError) as e:
            found, cause = False, e
        else:
            cause = None
        if not found:
            raise ImportError(
                f"{user} needs {name!r}, which is not installed: "
                f'pip install "{DISTRIBUTION}[{extra}]"'
            ) from cause
