"""A resumed captioning run keeps the vocabulary of its checkpoint, whatever the shards say now."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from mmdiff.cli import main
from mmdiff.data.writers import AtomicShardWriter

REPO = Path(__file__).resolve().parents[2]


def _shards(out: Path, caption: str) -> Path:
    """16 random 32-px images, all captioned ``caption``."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        with AtomicShardWriter(out, split, 100) as writer:
            for i in range(16):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png, format="PNG")
                writer.write({"__key__": f"{split}_{i:04d}", "png": png.getvalue(), "txt": caption})
    return out


def test_resume_decodes_with_the_checkpoints_words_not_the_new_shards(tmp_path: Path) -> None:
    from mmdiff.inference.api import load

    first = _shards(tmp_path / "a", "red cat sits")
    changed = _shards(tmp_path / "b", "blue dog runs")  # as many distinct words: same vocabulary size
    cfg = {
        "base": [str(REPO / "configs/demo/caption_ar.yaml")],
        "run_dir": str(tmp_path / "run"),
        "model": {"clip": {"pretrained": None},
                  "caption": {"width": 32, "layers": 1, "heads": 2, "table_rows": 0, "vocab_limit": 5}},
        "data": {"train_shards": str(first / "train-*.tar"), "val_shards": str(first / "val-*.tar"),
                 "batch_size": 8, "val_batch_size": 8, "num_workers": 0, "steps_per_epoch": 2},
        "trainer": {"max_steps": 1, "val_every_n_steps": 100, "checkpoint_every_n_steps": 100,
                    "log_every_n_steps": 1, "enable_progress_bar": False},
        "logger": {"kind": "csv"},
    }
    config = tmp_path / "cap.yaml"
    config.write_text(yaml.safe_dump(cfg))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert main(["fit", str(config)]) == 0
    vocab = torch.load(last, weights_only=True)["hyper_parameters"]["caption_vocab"]
    assert main(["fit", str(config), f"data.train_shards={changed / 'train-*.tar'}",
                 f"data.val_shards={changed / 'val-*.tar'}", "trainer.max_steps=2", "--resume", "last"]) == 0
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 2 and resumed["hyper_parameters"]["caption_vocab"] == vocab
    system = load(last, expect="captioning", device="cpu")
    words = torch.tensor([[system.vocab.sot, 2, 3, 4, system.vocab.eot]])
    assert sorted(system.vocab.decode(words)[0].split()) == ["cat", "red", "sits"]
    # The new shards' words are outside the checkpoint's vocabulary: unknown, as for any shortlist.
    assert system.vocab.encode(["blue dog runs"])[0, 1:4].tolist() == [system.vocab.unk] * 3
