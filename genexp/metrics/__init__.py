"""Metrics in pure torch: bits/dim now; FID/KID features arrive with the evaluation issue."""
