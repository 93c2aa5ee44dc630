"""Models: BERT (MLM+NSP, classification) and a decoder-only causal LM."""
