"""mmdiff: training framework for multimodal diffusion models on PyTorch Lightning."""
from typing import Any

__version__ = "0.1.0"


def load(ckpt_path: Any, **kwargs: Any) -> Any:
    """Rebuild a trained system from a checkpoint (see :func:`mmdiff.inference.api.load`)."""
    # Imported here: imported on first use, so `import mmdiff` stays light (no torch).
    from mmdiff.inference.api import load as _load

    return _load(ckpt_path, **kwargs)
