"""Metrics in pure torch: bits/dim, FID/KID/precision-recall on pluggable features, reconstruction."""
