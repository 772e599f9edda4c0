"""Write text-to-image samples to disk: one PNG per sample in prompt order, plus a grid."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

from mmdiff.eval.generative import generate
from mmdiff.io.atomic import write_text_atomic
from mmdiff.io.images import grid, save_png, to_pil


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
