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
from typing import Callable, Dict

import torch
import torch_fidelity.feature_extractor_inceptionv3 as fi
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
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
    """torchmetrics' FID Inception, built from a state dict that was already read safely.

    torch-fidelity's constructor reads the weights file itself with ``torch.load(weights_only=False)``
    (or downloads it); this one builds the same layers without any file access, then loads
    ``state`` after comparing keys and shapes, so a mismatch is one sentence. The layers are
    torch-fidelity's own blocks in its order; a strict load catches any drift between versions.
    """

    def __init__(self, state: Dict[str, Tensor], path: Path) -> None:
        FeatureExtractorBase.__init__(self, "inception-v3-compat", [str(InceptionFeatures.num_features)])
        self.feature_extractor_internal_dtype = torch.float32
        self.use_antialias = True  # NoTrainInceptionV3's default
        self.Conv2d_1a_3x3 = fi.BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = fi.BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = fi.BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = fi.BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = fi.BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = fi.InceptionA(192, pool_features=32)
        self.Mixed_5c = fi.InceptionA(256, pool_features=64)
        self.Mixed_5d = fi.InceptionA(288, pool_features=64)
        self.Mixed_6a = fi.InceptionB(288)
        self.Mixed_6b = fi.InceptionC(768, channels_7x7=128)
        self.Mixed_6c = fi.InceptionC(768, channels_7x7=160)
        self.Mixed_6d = fi.InceptionC(768, channels_7x7=160)
        self.Mixed_6e = fi.InceptionC(768, channels_7x7=192)
        self.Mixed_7a = fi.InceptionD(768)
        self.Mixed_7b = fi.InceptionE_1(1280)
        self.Mixed_7c = fi.InceptionE_2(2048)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc = nn.Linear(2048, 1008)
        problem = describe_mismatch(self, state)
        if problem:
            raise CheckpointError(
                f"the FID Inception weights file '{path}' does not fit the FID Inception v3: "
                f"{problem}; download {INCEPTION_URL}."
            )
        self.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()


def _inception_net(path: Path) -> nn.Module:
    """The FID Inception with its weights read once from ``path``, by :func:`safe_torch_load`."""
    state = safe_torch_load(path)
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"the FID Inception weights file '{path}' holds a {type(state).__name__}, not a state dict of "
            f"tensors; download {INCEPTION_URL}."
        )
    return _CheckedInceptionV3(state, path)


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
