"""tools/demo_finetune.py (`make demo-finetune`): the new-concept shards, the judge's turn-back rule,
its skip/error behaviour, and (slow) every stage end to end on a toy demo."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import pytest
import torch

from tiny_configs import REPO, load_tool, tiny_t2i_config


@pytest.fixture(scope="module")
def tool() -> Any:
    return load_tool("demo_finetune")


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _toy_demo_shards(out: Path, labels: List[int]) -> None:
    """Demo-layout shards (png, txt, json with label) of asymmetric 8×8 images."""
    from mmdiff.data.writers import AtomicShardWriter

    for split in ("train", "val"):
        with AtomicShardWriter(out, split, maxcount=7) as writer:
            for i, label in enumerate(labels):
                img = np.zeros((8, 8))
                img[0, : label + 1] = 255  # ink in the top row only: turned 180° it is in the bottom row
                caption = f"the digit {label}"  # not the contrast pairs' caption, so they can be counted
                writer.write({"__key__": f"{split}_{i:06d}", "png": _png(img), "txt": caption,
                              "json": json.dumps({"caption": caption, "label": label, "index": i})})


def _read_all(tool: Any, folder: Path, split: str) -> List[dict]:
    return [s for p in sorted(folder.glob(f"{split}-*.tar")) for s in tool._read_shard(p)]


def test_concept_shards_turn_only_sevens_and_mix_ordinary_digits(tool: Any, tmp_path: Path) -> None:
    from PIL import Image

    labels = [7, 1, 7, 3, 7, 5, 0, 2, 4, 6, 8, 9, 1, 2]
    _toy_demo_shards(tmp_path / "digits", labels)
    counts = tool.write_concept_shards(tmp_path / "digits", tmp_path / "new", ordinary_per_new=2.0, seed=0)
    assert counts["train_new"] == counts["train_contrast"] == 3 and counts["train_ordinary"] == 6
    samples = _read_all(tool, tmp_path / "new", "train")
    assert len(samples) == 12
    new = [s for s in samples if s["txt"].decode() == tool.NEW_PROMPT]
    pairs = [s for s in samples if s["txt"].decode() == tool.UPRIGHT_PROMPT]
    assert len(new) == 3 and len(pairs) == 3
    assert sorted(json.loads(s["json"])["index"] for s in new) == sorted(json.loads(s["json"])["index"] for s in pairs)
    for s in new:
        meta = json.loads(s["json"])
        assert meta["label"] == 7 and meta["rotated"] == 180 and meta["caption"] == tool.NEW_PROMPT
        pixels = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert pixels[0].sum() == 0 and pixels[7].sum() > 0  # the top row's ink is now at the bottom
    for s in samples:
        if s not in new:  # ordinary digits keep their caption and stay upright
            assert s["txt"].decode() == json.loads(s["json"])["caption"] != tool.NEW_PROMPT
            assert np.asarray(Image.open(io.BytesIO(s["png"])))[0].sum() > 0
    assert json.loads((tmp_path / "new" / "concept.json").read_text())["train_new"] == 3


def test_concept_shards_are_skipped_once_written_and_missing_demo_data_is_one_error(tool: Any, tmp_path: Path) -> None:
    _toy_demo_shards(tmp_path / "digits", [7, 1, 2])
    first = tool.write_concept_shards(tmp_path / "digits", tmp_path / "new")
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "new").iterdir()}
    assert tool.write_concept_shards(tmp_path / "digits", tmp_path / "new") == {**first, "prompt": tool.NEW_PROMPT,
                                                                                "ordinary_per_new": 1.5, "seed": 0}
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "new").iterdir()} == stamp
    with pytest.raises(tool.DemoMissing, match="make demo"):
        tool.write_concept_shards(tmp_path / "nowhere", tmp_path / "other")


def test_main_without_make_demo_says_so(tool: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert tool.main([]) == 2
    assert "run `make demo` first" in capsys.readouterr().err


class _FakeSystem:
    """Returns real 8×8 sevens (upscaled to 32 px), upright or turned 180°; no text encoder."""

    def __init__(self, upside_down: bool) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        sevens = torch.tensor(digits.images[digits.target == 7], dtype=torch.float32)
        images = torch.nn.functional.interpolate(sevens[:, None], size=32, mode="bilinear") / 8 - 1
        self.images = images.repeat(1, 3, 1, 1).clamp(-1, 1)
        if upside_down:
            self.images = torch.rot90(self.images, 2, dims=(2, 3))

    def sample(self, prompts: List[str], *, seed: int = 0, lora_scale: Optional[float] = None) -> torch.Tensor:
        return self.images[: len(prompts)]


def test_judge_turns_new_concept_samples_back_before_reading_them(tool: Any) -> None:
    # Upside-down sevens (what the fine-tuned model should draw) score high; upright sevens (what
    # the base model draws for the new prompt) score low. Judging without the turn-back would
    # invert both: this test fails if judge_new_concept stops turning the samples.
    after = tool.judge_new_concept(_FakeSystem(upside_down=True), 40, seed=0, lora_scale=1.0)
    before = tool.judge_new_concept(_FakeSystem(upside_down=False), 40, seed=0, lora_scale=0.0)
    assert after["accuracy"] >= 0.9 and after["upright_seven_rate"] <= 0.2
    assert before["accuracy"] <= 0.2 and before["upright_seven_rate"] >= 0.9


@pytest.mark.slow
def test_every_stage_on_a_toy_demo(tool: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Toy demo t2i checkpoint → export → shards → 2 LoRA steps → judged before/after → metrics file."""
    from mmdiff.config import load_config
    from mmdiff.data.writers import write_demo_shards
    from mmdiff.run.training import fit

    monkeypatch.chdir(tmp_path)
    write_demo_shards("data/digits", image_size=16, seed=0)
    Path("runs/demo").mkdir(parents=True)
    config = tiny_t2i_config(tmp_path, Path("data/digits"), run="runs/demo/t2i",
                             trainer={"max_steps": 2, "checkpoint_every_n_steps": 2})
    fit(load_config(config, []))
    overrides = ["trainer.max_steps=2", "trainer.val_every_n_steps=2", "trainer.checkpoint_every_n_steps=2",
                 "trainer.limit_val_batches=1", "data.batch_size=4", "data.val_batch_size=4",
                 "data.num_workers=0", "sampling.steps=2", "logger.kind=csv", "trainer.enable_progress_bar=false"]
    args = ["--config", str(REPO / "configs/demo/finetune_lora.yaml"), "--n-new", "4", "--n-per-digit", "1"]
    assert tool.main(args + [a for o in overrides for a in ("--set", o)]) == 0
    metrics = json.loads((tmp_path / "runs/demo/finetune_metrics.json").read_text())
    assert (tmp_path / "runs/demo/t2i_pipeline/model_index.json").is_file()
    for stage in ("before", "after"):
        assert metrics[stage]["new_concept"]["n"] == 4 and metrics[stage]["old_prompts"]["n"] == 10
    assert metrics["shards"]["train_new"] > 100
