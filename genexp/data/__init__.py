"""Image datasets, pure torch: each source loads fixed train/val/test splits of 8-bit images."""
