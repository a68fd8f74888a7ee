"""Evaluations of trained MSA language models: held-out loss by position, synthetic retrieval in
real code, and indexer recall / per-layer KL (see the modules)."""
