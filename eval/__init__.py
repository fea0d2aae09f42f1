"""Evaluation of DPSN-R: perplexity, reasoning analytics, benchmarks, plots."""
