"""mmdiff.diffusion."""
