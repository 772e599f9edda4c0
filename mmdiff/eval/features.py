"""Image feature extractors for FID/KID, each with a ``name`` that goes into every metric key.

FID numbers are only comparable when computed with the same extractor, so results are always
reported as ``fid_<extractor name>`` (``fid_inception_v3``, ``fid_clip_custom_1a2b3c4d``).

- :class:`InceptionFeatures` — the standard FID network (torch-fidelity's port of the 2015
  TF Inception, 2048-d pool features) through torchmetrics, with its weights read from a **local
  file**: nothing is downloaded at run time.
- :class:`ClipFeatures` — the fallback: an open_clip image tower (pooled embedding), e.g. the
  demo's contrastive CLIP. Its name carries a fingerprint of the weights, so two different CLIPs
  never share a metric key.

Extractors take images B×3×H×W in [-1, 1] and return B×D float features.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import NoTrainInceptionV3

from mmdiff.io.weights import describe_mismatch, safe_torch_load
from mmdiff.errors import CheckpointError

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


class InceptionFeatures(nn.Module):
    """2048-d pool3 features of the FID Inception v3, weights from ``weights_path``."""

    name = "inception_v3"
    num_features = 2048

    def __init__(self, weights_path: str | Path | None) -> None:
        super().__init__()
        path = Path(str(weights_path)).expanduser() if weights_path else None
        if path is None or not path.is_file():
            raise CheckpointError(
                f"the FID Inception weights file '{weights_path}' does not exist; download "
                f"{INCEPTION_URL} (pt_inception-2015-12-05) and set eval.inception_weights to its path, "
                "or use eval.extractor=clip."
            )
        self.net = _inception_net(path)

    def forward(self, images: Tensor) -> Tensor:
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.net(pixels).reshape(images.shape[0], -1)


class _CheckedInceptionV3(NoTrainInceptionV3):
    """torchmetrics' FID Inception whose weight load reports a mismatch in one sentence.

    torch-fidelity's constructor reads the weights file itself and loads it strictly, with torch's
    multi-line key report; this override compares keys and shapes first.
    """

    def __init__(self, path: Path) -> None:
        self._weights_path = path
        super().__init__(name="inception-v3-compat", features_list=[str(InceptionFeatures.num_features)],
                         feature_extractor_weights_path=str(path))

    def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ANN001, ANN201 (torch's signature)
        problem = describe_mismatch(self, state_dict)
        if problem:
            raise CheckpointError(
                f"the FID Inception weights file '{self._weights_path}' does not fit the FID Inception v3: "
                f"{problem}; download {INCEPTION_URL}."
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _inception_net(path: Path) -> nn.Module:
    """The FID Inception with its weights from ``path``.

    torch-fidelity reads the file with ``torch.load(weights_only=False)``, so it is read here first
    with :func:`safe_torch_load`: a pickle that would run code is refused before that happens.
    """
    state = safe_torch_load(path)
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"the FID Inception weights file '{path}' holds a {type(state).__name__}, not a state dict of "
            f"tensors; download {INCEPTION_URL}."
        )
    return _CheckedInceptionV3(path)


def weights_fingerprint(module: nn.Module) -> str:
    """8 hex digits of a SHA-1 over the module's parameters and buffers (names and values)."""
    digest = hashlib.sha1()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:8]


class ClipFeatures(nn.Module):
    """Pooled image embeddings of an open_clip image tower (``encode_image(images) -> (pooled, …)``).

    ``clip`` is a :class:`~mmdiff.models.clip.ClipEncoder` (or anything with ``encode_image``,
    ``embed_dim`` and a ``model``); ``model_name`` is its open_clip name.
    """

    def __init__(self, clip: nn.Module, model_name: str) -> None:
        super().__init__()
        self.clip = clip
        self.num_features = int(clip.embed_dim)
        safe = "".join(c if c.isalnum() else "_" for c in model_name)
        self.name = f"clip_{safe}_{weights_fingerprint(clip.model)}"

    def forward(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(images)[0].float()


class FunctionFeatures(nn.Module):
    """Any ``images -> features`` function as a named extractor (tests, custom networks)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str, num_features: int) -> None:
        super().__init__()
        self.fn, self.name, self.num_features = fn, name, int(num_features)

    def forward(self, images: Tensor) -> Tensor:
        return self.fn(images).float()


def build_extractor(kind: str, *, inception_weights: str | None = None, clip: nn.Module | None = None,
                    clip_name: str = "custom") -> nn.Module:
    """``inception`` (weights from a local file) or ``clip`` (the given open_clip encoder)."""
    if kind == "inception":
        return InceptionFeatures(inception_weights)
    if kind == "clip":
        if clip is None:
            raise ValueError("the clip feature extractor needs an open_clip encoder.")
        return ClipFeatures(clip, clip_name)
    raise ValueError(f"unknown feature extractor '{kind}'; choose inception or clip.")


__all__ = ["InceptionFeatures", "ClipFeatures", "FunctionFeatures", "build_extractor", "weights_fingerprint",
           "INCEPTION_URL"]
