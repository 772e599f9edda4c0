"""mmdiff: training framework for multimodal diffusion models on PyTorch Lightning."""
__version__ = "0.1.0"
