"""Write text-to-image samples to disk: one PNG per sample in prompt order, plus a grid."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List

import torch
from tqdm import tqdm

from mmdiff.io.atomic import write_text_atomic
from mmdiff.io.images import grid, save_png, to_pil

log = logging.getLogger(__name__)


def warn_cut_prompts(system: Any, prompts: List[str]) -> List[int]:
    """Log a warning naming the prompts the text encoder's context cuts off; return their indices."""
    clip = getattr(system, "clip", None)
    if clip is None or not prompts:
        return []
    cut = clip.prompts_cut_off(prompts)
    if cut:
        first = prompts[cut[0]]
        log.warning("%d of %d prompt(s) are longer than the text encoder's %d-token context and are cut off "
                    "(prompt %d: '%s…')", len(cut), len(prompts), clip.context_length, cut[0] + 1, first[:60])
    return cut


def generate(system: Any, prompts: List[str], n_per_prompt: int, batch_size: int, seed: int, **options: Any) -> torch.Tensor:
    """``n_per_prompt`` images for each prompt, prompt-major, in batches; seeded per batch."""
    warn_cut_prompts(system, prompts)
    expanded = [p for p in prompts for _ in range(n_per_prompt)]
    chunks = [expanded[i : i + batch_size] for i in range(0, len(expanded), batch_size)]
    images = [
        system.sample(chunk, seed=seed + index, **options).cpu()
        for index, chunk in enumerate(tqdm(chunks, desc="sampling", unit="batch", disable=len(chunks) < 2))
    ]
    return torch.cat(images)


def write_samples(
    system: Any,
    prompts: List[str],
    *,
    n_per_prompt: int,
    out_dir: str | Path,
    batch_size: int = 64,
    seed: int = 0,
    **options: Any,
) -> Path:
    """Sample and write ``OUT/0000.png …`` and ``OUT/grid.png`` (a row per prompt); returns OUT."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # fails here, not after the sampling, if OUT cannot be a folder
    options = {k: v for k, v in options.items() if v is not None}
    images = generate(system, prompts, n_per_prompt, batch_size, seed, **options)
    for index, picture in enumerate(to_pil(images)):
        save_png(picture, out / f"{index:04d}.png")
    save_png(grid(images, nrow=n_per_prompt), out / "grid.png")
    write_text_atomic(out / "prompts.txt", "".join(f"{i:04d}\t{p}\n" for i, p in enumerate(p for p in prompts for _ in range(n_per_prompt))))
    return out
