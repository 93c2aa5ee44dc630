"""Experiments that reproduce the papers' claims at small scale (see docs/results.md)."""
