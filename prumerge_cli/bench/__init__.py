"""Benchmarks: timing, memory, tokens, fidelity and the LLM cost model."""
