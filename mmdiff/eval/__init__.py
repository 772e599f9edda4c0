"""mmdiff.eval."""
