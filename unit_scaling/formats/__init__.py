"""Low-precision number formats: simulated quantisation and real FP8 casts.

Two ways to run a model in a narrow format, picked by one `FormatPolicy`:

- **Simulate** (`real=False`, works on CPU/TPU/GPU): values are rounded to the format
  with `quantise` but keep their compute dtype (float32/bfloat16), so every backend
  runs it and the numerics are exactly those of the format (round-to-nearest-even,
  saturating at the format's max). E4M3/E5M2 values are exact in bfloat16, so even a
  TPU's one-pass bf16 matmul of quantised float32 operands is exact per product.
- **Real** (`real=True`): operands are cast to `jnp.float8_e4m3fn` / `float8_e5m2`
  and the matmul takes float8 inputs (`preferred_element_type` = the compute dtype),
  which XLA on H100 lowers to FP8 GEMMs. CPU runs the same program by converting to
  float32 (emulation: same numbers, no speed-up). Simulate and real give the same
  values up to float32 accumulation order.

**Why no loss scaling or amax history.** Unit scaling keeps activations, weights and
gradients near RMS 1 by construction, i.e. in the middle of FP8's range, so a plain
cast with no per-tensor scale works: these functions are stateless (no amax history,
no delayed scaling, no loss scale) and the policy is a static, hashable Python object.

Modules: `unit_scaling.formats.quantisation` (formats, `quantise`, real casts),
`unit_scaling.formats.policy` (`FormatPolicy` and its `matmul`) and
`unit_scaling.formats.storage` (a tensor stored in fp8/int8/bf16 with optional
per-channel scales, for post-training quantisation); every name is importable from
`unit_scaling.formats`.
"""

from unit_scaling.formats import policy, quantisation, storage
from unit_scaling.formats.policy import FP8, FormatPolicy, matmul
from unit_scaling.formats.quantisation import (
    BF16,
    E2M1FN,
    E4M3FN,
    E4M3FNUZ,
    E5M2,
    E5M2FNUZ,
    FP16,
    FPFormat,
    quantise,
    quantise_bwd,
    quantise_fwd,
    saturating_cast,
)

from unit_scaling.formats.storage import (
    PLAIN_INT8_SCALE, SCALINGS, STORAGE_FORMATS, Stored, round_trip, store)

__all__ = [*quantisation.__all__, *policy.__all__, *storage.__all__]
