"""Models: BERT (MLM+NSP, classification) and a decoder-only causal LM."""

from unit_scaling._extras import require

require("flax", "unit_scaling.models", "flax")
