"""mmdiff.systems."""
