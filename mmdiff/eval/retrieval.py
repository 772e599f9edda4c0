"""Zero-shot retrieval and classification with CLIP embeddings (pure tensors; no models here).

* :func:`recall_at_k` — image→text and text→image recall@k of paired embeddings. Items that
  share a *group* count as the same item: duplicate captions (the digits demo writes the same
  template caption for many images) are one text, so retrieving any copy of an image's own
  caption is a hit — without groups recall@1 could not exceed 1/copies for duplicated captions.
* :func:`zero_shot_accuracy` — classify images by the nearest class-prompt embedding
  ("a handwritten digit {word}").

Embeddings need not be normalised; cosine similarity is used throughout.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiff.data.digits import DIGIT_WORDS


def group_ids(texts: Sequence[str]) -> Tensor:
    """One id per distinct text (case and surrounding whitespace ignored), in first-seen order."""
    seen: Dict[str, int] = {}
    return torch.tensor([seen.setdefault(" ".join(t.lower().split()), len(seen)) for t in texts])


def similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Cosine similarities N_images × N_texts (float32)."""
    return F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T


def recall_at_k(
    image_emb: Tensor,
    text_emb: Tensor,
    k: int = 1,
    groups: Optional[Tensor] = None,
) -> Tuple[float, float]:
    """``(image→text, text→image)`` recall@k for N paired embeddings (row i of each is a pair).

    A retrieval is a hit when one of the top-k items has the query's own index, or — with
    ``groups`` (N,) — the same group id as the query's pair (e.g. :func:`group_ids` of the captions).
    """
    n = image_emb.shape[0]
    if text_emb.shape[0] != n:
        raise ValueError(f"{n} image embeddings but {text_emb.shape[0]} text embeddings; they must pair up.")
    if n == 0:
        raise ValueError("recall_at_k needs at least one pair.")
    groups = torch.arange(n) if groups is None else groups.to(torch.long).cpu()
    sim = similarity(image_emb, text_emb).cpu()
    k = min(k, n)
    i2t = sim.topk(k, dim=1).indices  # texts retrieved per image
    t2i = sim.T.topk(k, dim=1).indices  # images retrieved per text
    hit_i2t = (groups[i2t] == groups.unsqueeze(1)).any(dim=1).float().mean()
    hit_t2i = (groups[t2i] == groups.unsqueeze(1)).any(dim=1).float().mean()
    return float(hit_i2t), float(hit_t2i)


def zero_shot_predict(image_emb: Tensor, class_emb: Tensor) -> Tensor:
    """Index of the most similar class embedding per image (N,)."""
    return similarity(image_emb, class_emb).argmax(dim=1)


def zero_shot_accuracy(image_emb: Tensor, class_emb: Tensor, labels: Tensor) -> float:
    """Fraction of images whose nearest class embedding is their label."""
    if image_emb.shape[0] == 0:
        raise ValueError("zero_shot_accuracy needs at least one image.")
    predicted = zero_shot_predict(image_emb, class_emb).cpu()
    return float((predicted == labels.cpu()).float().mean())


def digit_prompts(template: str = "a handwritten digit {word}") -> List[str]:
    """The ten class prompts of the digits ({word} → "seven", {numeral} → "7")."""
    return [template.format(word=w, numeral=str(d)) for d, w in enumerate(DIGIT_WORDS)]


__all__ = ["group_ids", "similarity", "recall_at_k", "zero_shot_predict", "zero_shot_accuracy", "digit_prompts"]
