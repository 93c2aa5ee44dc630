"""Making a trained model smaller: weight-only quantisation (`weights`), low-rank
projections (`low_rank`) and the fine-tune that recovers from them (`recover`), chosen
by one `Compression` (`compression`: the flags of `unit_scaling.evaluate` and
`unit_scaling.generate`). The 8-bit storage itself is `unit_scaling.formats.storage`."""

from unit_scaling.compress.compression import KV_CACHES, WEIGHTS, Compression, compress
from unit_scaling.compress.low_rank import LowRank, count_params, expand, factorise
from unit_scaling.compress.recover import finetune
from unit_scaling.compress.weights import dequantise_params, params_nbytes, quantise_params

__all__ = ["KV_CACHES", "WEIGHTS", "Compression", "LowRank", "compress", "count_params",
           "dequantise_params", "expand", "factorise", "finetune", "params_nbytes",
           "quantise_params"]
