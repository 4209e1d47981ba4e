"""Networks in pure torch: conv encoders/decoders (and, as families arrive, DCGAN, UNet, couplings)."""
