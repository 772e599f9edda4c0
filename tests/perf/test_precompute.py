"""`mmdiff precompute`: shards of latents and text states, and training from them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.data.decode import decode_array
from mmdiff.data.tario import iter_samples
from mmdiff.errors import ConfigError, DataError
from mmdiff.data.precomputed import EMPTY_PROMPT, FRAGMENT, METADATA, VAE_PROBE, check_against, load_empty_prompt
from mmdiff.jobs.precompute import fragment_overrides, precompute


def _system(cfg_path: Path, *overrides: str):
    import lightning as L

    from mmdiff.systems.text_to_image import TextToImageSystem

    cfg = load_config(cfg_path, list(overrides))
    L.seed_everything(cfg.seed, verbose=False)  # as `mmdiff fit` and `mmdiff precompute` do
    return TextToImageSystem(cfg).eval()


def _pre_overrides(folder: Path):
    return fragment_overrides(folder, "distribution", ["train", "val"])


def test_folder_holds_shards_metadata_and_empty_prompt(precomputed: Path) -> None:
    names = sorted(p.name for p in precomputed.iterdir())
    assert names == sorted([EMPTY_PROMPT, FRAGMENT, METADATA, VAE_PROBE,
                            "train-000000.tar", "train-000001.tar", "val-000000.tar"])
    meta = json.loads((precomputed / METADATA).read_text())
    assert meta["latent_shape"] == [4, 8, 8] and meta["context_shape"] == [32, 64]
    assert meta["latents"] == "distribution" and meta["dtype"] == "fp16"
    assert meta["array_keys"] == ["latent", "latent_logvar", "context", "pooled", "original_size", "crop_top_left"]
    empty = load_empty_prompt(precomputed)
    assert empty["context"].shape == (1, 32, 64) and empty["pooled"].shape == (1, 64)


def test_arrays_are_the_unscaled_posterior_of_centre_crops(precomputed: Path, tiny_cfg_path: Path,
                                                           demo_shards: Path) -> None:
    from mmdiff.data.decode import DecodeSpec, decode_sample
    from mmdiff.data.transforms import ImageTransform

    samples = list(iter_samples(str(precomputed / "train-000001.tar")))
    sources = list(iter_samples(str(demo_shards / "train-000001.tar")))
    assert [s.key for s in samples] == [s.key for s in sources] and len(samples) == 200
    first = samples[0].members
    assert set(first) == {"latent.npy", "latent_logvar.npy", "context.npy", "pooled.npy", "original_size.npy",
                          "crop_top_left.npy", "txt", "json"}
    latent = decode_array(first["latent.npy"])
    assert latent.dtype == np.float16 and latent.shape == (4, 8, 8)
    assert decode_array(first["context.npy"]).shape == (32, 64)
    assert decode_array(first["pooled.npy"]).shape == (64,)

    system = _system(tiny_cfg_path)
    decoded = decode_sample(sources[0], DecodeSpec())
    image = ImageTransform(16)(decoded.image).unsqueeze(0)
    posterior = system.encode_posterior(image)
    torch.testing.assert_close(torch.from_numpy(latent).float(), posterior.mean[0], atol=2e-3, rtol=2e-3)
    logvar = torch.from_numpy(decode_array(first["latent_logvar.npy"])).float()
    torch.testing.assert_close(logvar, posterior.logvar[0], atol=2e-2, rtol=2e-3)
    context = system.encode_prompts([first["txt"].decode()])["context"][0]
    torch.testing.assert_close(torch.from_numpy(decode_array(first["context.npy"])).float(), context,
                               atol=5e-3, rtol=5e-3)


def test_fit_from_precomputed_shards_then_sample(precomputed: Path, tiny_cfg_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["fit", str(tiny_cfg_path), f"run_dir={run}", *_pre_overrides(precomputed)]) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert float(ckpt["state_dict"]["latent_scale"]) > 0
    assert ckpt["hyper_parameters"]["config"]["model"]["precomputed"] is True
    (metrics,) = (run / "csv").rglob("metrics.csv")
    text = metrics.read_text()
    assert "train/loss" in text and "val/loss" in text

    from mmdiff.inference.api import load

    system = load(run / "checkpoints" / "last.ckpt", expect="text_to_image", device="cpu")
    images = system.sample(["a handwritten digit one"], seed=0, steps=2)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_caption_dropout_uses_the_stored_empty_prompt_states(precomputed: Path, tiny_cfg_path: Path) -> None:
    system = _system(tiny_cfg_path, *_pre_overrides(precomputed), "model.caption_dropout=1.0")
    stored = load_empty_prompt(precomputed)
    system._empty_states = check_against(system, precomputed)
    batch = {"context": torch.randn(3, 32, 64), "pooled": torch.randn(3, 64), "caption": ["a", "b", "c"],
             "latent": torch.randn(3, 4, 8, 8)}
    drop = torch.tensor([True, False, True])
    cond = system.batch_condition(batch, drop)
    for key in ("context", "pooled"):
        torch.testing.assert_close(cond[key][0], stored[key][0])
        torch.testing.assert_close(cond[key][2], stored[key][0])
        torch.testing.assert_close(cond[key][1], batch[key][1])
    # model.caption_dropout=1.0: every row of a training step gets the empty prompt.
    assert bool(system._drop_mask(5).all())


def test_shards_from_another_encoder_or_vae_are_refused(precomputed: Path, tiny_cfg_path: Path,
                                                        tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(precomputed, folder)
    system = _system(tiny_cfg_path)
    check_against(system, folder)  # the same model: fine
    other = _system(tiny_cfg_path, "seed=1")  # other random text encoder and VAE
    with pytest.raises(DataError, match="different text encoder"):
        check_against(other, folder)
    np.save(folder / VAE_PROBE, np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32))
    with pytest.raises(DataError, match="different VAE"):
        check_against(system, folder)
    wider = _system(tiny_cfg_path, "data.image_size=32")
    with pytest.raises(DataError, match=r"shape \[4, 8, 8\] but this model needs \[4, 16, 16\]"):
        check_against(wider, folder)


def test_ranks_split_shards_and_reruns_continue(tiny_cfg_path: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(tiny_cfg_path)
    out = tmp_path / "ranked"
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    result = precompute(cfg, out, splits=["train"], progress=False, batch_size=64)
    assert (result.rank, result.world) == (1, 2)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000001.tar"]
    assert not (out / METADATA).exists()  # rank 0 writes the folder files
    monkeypatch.setenv("SLURM_PROCID", "0")
    result = precompute(cfg, out, splits=["train"], progress=False, batch_size=64)
    assert [p.name for p in result.written["train"]] == ["train-000000.tar"]
    assert (out / METADATA).is_file() and (out / EMPTY_PROMPT).is_file()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    again = precompute(cfg, out, splits=["train"], progress=False, batch_size=64)
    assert again.written["train"] == [] and len(again.existing["train"]) == 2
    assert again.samples["train"] == 400
    with pytest.raises(DataError, match="other settings"):
        precompute(load_config(tiny_cfg_path, ["model.precompute_dtype=fp32"]), out, splits=["train"],
                   progress=False)


def test_precomputed_config_checks(tiny_cfg_path: Path, precomputed: Path) -> None:
    with pytest.raises(ConfigError, match="data.load_images"):
        load_config(tiny_cfg_path, ["model.precomputed=true", "data.array_keys=[latent,context]"])
    with pytest.raises(ConfigError, match=r"lacks \['context', 'pooled'\]"):
        load_config(tiny_cfg_path, ["model.precomputed=true", "data.load_images=false",
                                    "data.array_keys=[latent]"])
    with pytest.raises(ConfigError, match="image config"):
        precompute(load_config(tiny_cfg_path, _pre_overrides(precomputed)), precomputed / "x")
    cfg = load_config(tiny_cfg_path, _pre_overrides(precomputed))
    assert cfg.model.precomputed and list(cfg.data.array_keys)[0] == "latent"


def test_precompute_cli_mean_latents_fp32(tiny_cfg_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mean"
    code = main(["precompute", str(tiny_cfg_path), "model.precompute_latents=mean",
                 "model.precompute_dtype=fp32", "--out", str(out), "--split", "val", "--no-progress"])
    assert code == 0
    (sample, *_) = iter_samples(str(out / "val-000000.tar"))
    assert "latent_logvar.npy" not in sample.members
    assert decode_array(sample.members["latent.npy"]).dtype == np.float32
    assert "array_keys: [latent, context, pooled, original_size, crop_top_left]" in (out / FRAGMENT).read_text()


#: Three buckets (W×H) of the tiny config: landscape, portrait, square; latents at half the size.
BUCKETS = ["data.buckets.enabled=true", "data.buckets.step=8", "data.buckets.sizes=[24x16,16x24,16x16]"]


def test_latents_of_several_shapes_are_stored_at_their_own_shape(tiny_cfg_path: Path, tmp_path: Path) -> None:
    """With data.buckets, each latent is encoded from its image's bucket and stored at that shape; a
    fit on those shards with the same buckets batches them shape by shape."""
    import io
    import tarfile

    from PIL import Image

    import mmdiff.jobs.precompute as job

    rng = np.random.default_rng(0)
    sizes = [(48, 32), (32, 48), (32, 32), (48, 32), (48, 32), (32, 48), (32, 32)]  # (w, h), interleaved
    pictures = {f"{i:03d}": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                for i, (w, h) in enumerate(sizes)}
    shards = tmp_path / "mixed"
    shards.mkdir()
    with tarfile.open(shards / "train-000000.tar", "w") as tar:
        for key, picture in pictures.items():
            buf = io.BytesIO()
            picture.save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = load_config(tiny_cfg_path, [f"data.train_shards={shards}/train-000000.tar", *BUCKETS])
    precompute(cfg, tmp_path / "out", splits=["train"], progress=False, batch_size=2)
    transform = job.image_transform(cfg)

    stored = {s.key: s.members for s in iter_samples(str(tmp_path / "out" / "train-000000.tar"))}
    assert sorted(stored) == sorted(pictures)
    system = _system(tiny_cfg_path)
    for key, picture in pictures.items():
        image = transform(picture).image
        assert image.shape[1:] == ((16, 24) if picture.width > picture.height else
                                   (24, 16) if picture.height > picture.width else (16, 16))
        latent = torch.from_numpy(decode_array(stored[key]["latent.npy"])).float()
        assert latent.shape == (4, image.shape[1] // 2, image.shape[2] // 2)
        torch.testing.assert_close(latent, system.encode_posterior(image.unsqueeze(0)).mean[0], atol=2e-3, rtol=2e-3)
        assert stored[key]["txt"].decode() == f"caption {key}"
        assert decode_array(stored[key]["original_size.npy"]).tolist() == [picture.height, picture.width]
    # The precomputed loader batches the stored shapes one at a time: the fit trains on all three.
    run = tmp_path / "run"
    overrides = [o for o in fragment_overrides(tmp_path / "out", "distribution", ["train"])
                 if not o.startswith("data.val_shards")]
    assert main(["fit", str(tiny_cfg_path), f"run_dir={run}", *overrides, *BUCKETS, "data.batch_size=2",
                 "data.num_workers=0", "data.shuffle_buffer=0", "trainer.max_steps=6",
                 "trainer.limit_val_batches=0", "trainer.checkpoint_every_n_steps=6"]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
