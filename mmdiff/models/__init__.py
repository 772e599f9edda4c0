"""mmdiff.models."""
