"""Drop rules (data.filters, data.min_size) and several captions per sample: what is dropped, how it
is counted (batches, DataStatsCallback, checkpoints, W&B), the warnings and errors before training,
and the seeded caption draw (also across an exact resume)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import lightning as L
import pytest
import torch
from torch import nn

from datakit import data_cfg, image_bytes, write_tar
from mmdiff.callbacks.data_stats import DataStatsCallback
from mmdiff.config import DataConfig
from mmdiff.config.filter_rules import drop_names, parse_filter, parse_filters
from mmdiff.data.datamodule import ShardDataModule
from mmdiff.errors import ConfigError, DataError

FILTERS = ["aesthetic >= 5", "pwatermark < 0.5", "caption_len >= 3"]
MIN_SIZE = 20


def _sample(i: int) -> Tuple[str, Dict[str, bytes], Dict[str, Any]]:
    """Sample ``i``: a mix of passing and failing metadata, caption lengths and image sizes."""
    words = 2 + i % 3  # 2, 3, 4 words
    caption = " ".join(["word"] * words)
    size = (24, 40) if i % 5 else (40, 12)  # every 5th is 12 px tall
    meta: Dict[str, Any] = {"caption": caption, "key": f"{i:05d}", "status": "success",
                            "width": size[0], "height": size[1], "pwatermark": (i % 4) / 4}
    if i % 7:  # every 7th lacks the field
        meta["aesthetic"] = 3 + i % 6
    members = {"jpg": image_bytes(i, size), "txt": caption.encode(), "json": json.dumps(meta).encode()}
    return f"{i:05d}", members, meta


def _expected_drop(meta: Dict[str, Any]) -> str | None:
    """The rule that drops a sample, computed from its json alone (rules in their checking order)."""
    if meta.get("aesthetic") is None or meta["aesthetic"] < 5:
        return "aesthetic"
    if not meta["pwatermark"] < 0.5:
        return "pwatermark"
    if len(meta["caption"].split()) < 3:
        return "caption_len"
    if min(meta["width"], meta["height"]) < MIN_SIZE:
        return "min_size"
    return None


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Dict[str, int], int]:
    """One shard whose last sample is kept (a pass of all kept samples then reads every sample
    exactly once); the drop counts expected from the json, and the number kept."""
    rows = [_sample(i) for i in range(80)]
    kept = [i for i, (_, _, meta) in enumerate(rows) if _expected_drop(meta) is None]
    rows = rows[:kept[-1] + 1]
    expected = {name: 0 for name in drop_names(parse_filters(FILTERS), MIN_SIZE)}
    for _, _, meta in rows:
        reason = _expected_drop(meta)
        if reason:
            expected[reason] += 1
    shard = write_tar(tmp_path_factory.mktemp("filtered") / "00000.tar", [(k, m) for k, m, _ in rows])
    return shard, expected, len(kept)


def _cfg(shard: Path, **overrides):
    base = dict(train_shards=[str(shard)], image_size=16, shuffle_buffer=0, filters=FILTERS, min_size=MIN_SIZE)
    base.update(overrides)
    return data_cfg(**base)


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("text, message", [
    ("aesthetic >> 5", "is not 'FIELD OP NUMBER'"),
    ("aesthetic >= high", "which is not a number"),
    ("5 <= aesthetic", "is not 'FIELD OP NUMBER'"),
    ("aesthetic >= nan", "use a finite number"),
    ("min_size >= 3", "set data.min_size instead"),
])
def test_a_bad_filter_is_one_config_error(text: str, message: str) -> None:
    cfg = data_cfg(filters=["caption_len >= 3", text])
    with pytest.raises(ConfigError, match=message) as info:
        DataConfig.check(cfg, None)
    assert "\n" not in str(info.value)


def test_filters_parse_and_share_a_counter_per_field() -> None:
    f = parse_filter("  meta.aesthetic>=5.5 ")
    assert (f.field, f.op, f.value, f.keeps(5.5), f.keeps(5.4)) == ("meta.aesthetic", ">=", 5.5, True, False)
    rules = parse_filters(["width >= 64", "width <= 4096", "caption_len > 2"])
    assert drop_names(rules, 0) == ["width", "caption_len"]
    assert drop_names(rules, 32) == ["min_size", "width", "caption_len"]
    with pytest.raises(ConfigError, match="needs images"):
        DataConfig.check(data_cfg(min_size=8, load_images=False, array_keys=["latent"]), None)


# ------------------------------------------------------------------------ the streams
def test_validation_drops_become_placeholders_counted_per_rule(filtered) -> None:
    shard, expected, kept = filtered
    dm = ShardDataModule(_cfg(shard, val_shards=[str(shard)], val_batch_size=7), seed=0)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert sum(int(b["valid"].sum()) for b in batches) == kept
    assert dict(zip(drop_names(parse_filters(FILTERS), MIN_SIZE), batches[-1]["dropped"][0].tolist())) == expected
    assert int(batches[-1]["skipped"][0]) == 0  # drops are not corrupt samples


def test_without_rules_batches_are_unchanged(filtered) -> None:
    shard, _, _ = filtered
    plain = next(iter(ShardDataModule(data_cfg(train_shards=[str(shard)], image_size=16), seed=0).train_dataloader()))
    assert "dropped" not in plain


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.keys: List[str] = []

    def training_step(self, batch, batch_idx):
        self.keys += batch["key"]
        return self.lin(batch["image"].mean(dim=(2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.timeout(180)
def test_drop_counts_in_data_stats_and_wandb_equal_the_json(filtered, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger
    from wandb_offline import read_run

    shard, expected, kept = filtered
    batch_size = next(b for b in (5, 4, 3, 2, 1) if kept % b == 0)
    steps = kept // batch_size  # one pass over the shard: every sample read once
    cfg = _cfg(shard, batch_size=batch_size, steps_per_epoch=steps)
    stats = DataStatsCallback(drop_names(parse_filters(FILTERS), MIN_SIZE))
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="filters")
    model = _Tiny()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[stats])
    trainer.fit(model, datamodule=ShardDataModule(cfg, seed=0))
    logger.experiment.finish()
    assert len(model.keys) == len(set(model.keys)) == kept
    assert stats.dropped_train == expected
    assert {k: int(trainer.callback_metrics[f"data/dropped/{k}"].item()) for k in expected} == expected
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history = [row for row in read_run(run_dir)["history"] if "data/dropped/aesthetic" in row]
    assert {k: int(history[-1][f"data/dropped/{k}"]) for k in expected} == expected
    # checkpointed per rank, and restored
    state = stats.state_dict()
    assert state["dropped"] == {k: [v] for k, v in expected.items()}
    again = DataStatsCallback(stats.drop_names)
    again.load_state_dict(state)
    assert again.dropped_train == expected and again.skipped_train == stats.skipped_train


# ------------------------------------------------------------- before training starts
def test_a_field_some_samples_lack_is_one_warning_with_counts(filtered, caplog) -> None:
    shard, expected, kept = filtered
    with caplog.at_level(logging.WARNING, logger="mmdiff.data.probe"):
        ShardDataModule(_cfg(shard, filters=["aesthetic >= 0"], min_size=0), seed=0).setup("fit")
    warnings = [r.getMessage() for r in caplog.records if "aesthetic" in r.getMessage()]
    rows = sum(expected.values()) + kept  # all probed: fewer than the probe's 1000
    lacking = len([i for i in range(rows) if i % 7 == 0])
    assert warnings == [f"data.filters 'aesthetic >= 0': {lacking} of the first {rows} training samples have no "
                        "numeric json field 'aesthetic' and are dropped (json fields seen: aesthetic, caption, "
                        "height, key, pwatermark, status, width)"]


def test_a_field_no_sample_has_warns_then_stops_before_training(filtered, caplog) -> None:
    shard, _, _ = filtered
    with caplog.at_level(logging.WARNING, logger="mmdiff.data.probe"):
        with pytest.raises(DataError, match=r"drop all \d+ usable samples .*\(aesthtic: \d+\)") as info:
            ShardDataModule(_cfg(shard, filters=["aesthtic >= 5"], min_size=0), seed=0).setup("fit")
    assert "\n" not in str(info.value)
    assert any("json fields seen: aesthetic, caption, height" in r.getMessage() for r in caplog.records)


def test_images_all_below_min_size_stop_before_training(filtered) -> None:
    shard, _, _ = filtered
    with pytest.raises(DataError, match=r"\(min_size: \d+\); loosen them"):
        ShardDataModule(_cfg(shard, filters=[], min_size=41), seed=0).setup("fit")


def test_a_worker_dropping_everything_stops_with_one_line(filtered, tmp_path: Path, monkeypatch) -> None:
    """The probe sees kept samples in the first shard; a later shard the rules drop whole stops the
    worker (after a run of drops, here shortened) instead of reading for ever."""
    import mmdiff.data.train_stream as train_stream

    shard, _, _ = filtered
    tiny = [(f"t{i:04d}", {"jpg": image_bytes(i, (8, 8)), "txt": b"a tiny one"}) for i in range(12)]
    late = write_tar(tmp_path / "z-tiny.tar", tiny)
    monkeypatch.setattr(train_stream, "_DROPS_IN_A_ROW", 6)
    cfg = _cfg(shard, filters=[], train_shards=[str(shard), str(late)], batch_size=4, steps_per_epoch=40)
    with pytest.raises(DataError, match="dropped 6 samples in a row; loosen data.filters / data.min_size"):
        list(ShardDataModule(cfg, seed=0).train_dataloader())


def test_min_size_drops_only_images_below_it(filtered) -> None:
    shard, _, _ = filtered
    dm = ShardDataModule(_cfg(shard, filters=[], min_size=13, val_shards=[str(shard)]), seed=0)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    n = sum(len(b["key"]) for b in batches)
    small = sum(1 for i in range(n) if i % 5 == 0)  # the 12-px-tall ones; 24 px is kept at 13
    assert int(batches[-1]["dropped"][0, 0]) == small
    assert sum(int(b["valid"].sum()) for b in batches) == n - small


# ------------------------------------------------------------------- several captions
@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = []
    for i in range(24):
        captions = [f"s{i} first caption", f"s{i} second caption here", f"s{i} third"]
        rows.append((f"{i:05d}", {"jpg": image_bytes(i), "json": json.dumps({"captions": captions}).encode()}))
    return write_tar(tmp_path_factory.mktemp("multi") / "multi.tar", rows)


def _captions(shard: Path, seed: int, steps: int = 6, **overrides) -> List[str]:
    cfg = data_cfg(train_shards=[str(shard)], caption_key="json:captions", image_size=16, batch_size=4,
                   steps_per_epoch=steps, shuffle_buffer=8, **overrides)
    return [c for b in ShardDataModule(cfg, seed=seed).train_dataloader() for c in b["caption"]]


def test_one_caption_is_drawn_per_sample_seeded(multi) -> None:
    first = _captions(multi, seed=1)
    assert first == _captions(multi, seed=1)
    assert first != _captions(multi, seed=2)
    kinds = {c.split(" ", 1)[1] for c in first}
    assert kinds == {"first caption", "second caption here", "third"}  # all three drawn, not only the first
    # caption_len removes the short captions from the draw; validation takes the first of those left
    assert {c.split(" ", 1)[1] for c in _captions(multi, seed=1, filters=["caption_len >= 3"])} == {
        "first caption", "second caption here"}
    dm = ShardDataModule(data_cfg(val_shards=[str(multi)], caption_key="json:captions", image_size=16), seed=0)
    dm.setup("validate")
    assert all(c.endswith("first caption") for b in dm.val_dataloader() for c in b["caption"])


def test_the_caption_draw_resumes_exactly(multi) -> None:
    cfg = data_cfg(train_shards=[str(multi)], caption_key="json:captions", image_size=16, batch_size=3,
                   steps_per_epoch=5, shuffle_buffer=6)
    straight = [b["caption"] for b in ShardDataModule(cfg, seed=4).train_dataloader()]
    first = ShardDataModule(cfg, seed=4)
    loader = first.train_dataloader()
    head = []
    for batch in loader:
        head.append(batch["caption"])
        if len(head) == 2:
            break
    second = ShardDataModule(cfg, seed=4)
    second.restore_position(loader.position())
    assert head + [b["caption"] for b in second.train_dataloader()] == straight


def test_a_fit_config_counts_its_rules(filtered, tmp_path: Path) -> None:
    """`mmdiff fit` builds its DataStatsCallback with the drop counters of the config's rules."""
    from types import SimpleNamespace

    from mmdiff.config import load_config
    from mmdiff.run.training import build_callbacks
    from tiny_configs import tiny_t2i_config

    shard, _, _ = filtered
    path = tiny_t2i_config(tmp_path, shard.parent, data={"train_shards": str(shard), "val_shards": [],
                                                         "filters": FILTERS, "min_size": MIN_SIZE})
    cfg = load_config(path)
    (stats,) = [c for c in build_callbacks(cfg, tmp_path, SimpleNamespace(ema_target=None))
                if isinstance(c, DataStatsCallback)]
    assert stats.drop_names == ["min_size", "aesthetic", "pwatermark", "caption_len"]
