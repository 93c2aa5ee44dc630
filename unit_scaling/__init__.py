"""unit-scaling-jax: unit scaling and u-muP for JAX.

`unit_scaling.functional` (imported as `U`) holds the scaled ops; `unit_scaling.formats`
simulated and real low-precision formats; `unit_scaling.scale` the two primitives they
are built from. These three import only jax, numpy and ml_dtypes.
"""

__version__ = "0.1.0"
