"""Generative families, pure torch: each exposes ``loss``, ``sample`` and optional ``nll_bpd``/``reconstruct``."""
