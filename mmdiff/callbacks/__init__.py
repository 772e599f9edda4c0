"""mmdiff.callbacks."""
