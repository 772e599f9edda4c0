"""Security faults: code-running pickles at every weights entry point, config resolvers and
registry names, secrets in configs and run folders, and sample keys that climb out of folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from datakit import image_bytes, write_tar
from faultkit import errors, good, tar_names, tiny_t2i_config, toy_config
from mmdiff.cli import main
from mmdiff.config import load_config, save_config, schema
from mmdiff.errors import CheckpointError, ConfigError, DataError

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
SECRET = "secret123-abcdef-7890"


# --------------------------------------------------------------------------------- pickles
class _Payload:
    """Creates ``marker`` when unpickled: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def evil(tmp_path: Path):
    """(a torch checkpoint file that runs code when unpickled, the marker it would create)."""
    marker = tmp_path / "pwned"

    def make(name: str = "evil.ckpt") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"config": {}},
                    "payload": _Payload(marker)}, path)
        return path

    return make, marker


def test_the_payload_really_runs_when_unpickled_unsafely(evil) -> None:
    make, marker = evil
    torch.load(make(), weights_only=False)
    assert marker.is_dir()  # so the tests below prove something


def test_mmdiff_load_refuses_a_code_pickle(evil) -> None:
    import mmdiff

    make, marker = evil
    with pytest.raises(CheckpointError, match="refused for safety"):
        mmdiff.load(make())
    assert not marker.exists()


@pytest.mark.parametrize("command", ["sample", "caption", "eval-digits"])
def test_cli_commands_refuse_a_code_pickle_in_one_line(evil, tmp_path: Path, capsys, command: str) -> None:
    make, marker = evil
    ckpt = str(make())
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    argv = {"sample": ["sample", ckpt, "--prompt", "a digit", "--out", str(tmp_path / "out")],
            "caption": ["caption", ckpt, str(image)],
            "eval-digits": ["eval", "digits", ckpt]}[command]
    assert main(argv) == 1
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "refused for safety" in err[0] and ckpt in err[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_resume_refuses_a_code_pickle(evil, tmp_path: Path, capsys) -> None:
    make, marker = evil
    shard = write_tar(tmp_path / "train.tar", [good(i) for i in range(4)])
    config = toy_config(tmp_path, [str(shard)], max_steps=2)
    assert main(["fit", str(config), "--resume", str(make())]) == 1
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "refused for safety" in err[0]
    assert not marker.exists()


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.pt", "folder/vae/diffusion_pytorch_model.bin"])
def test_vae_pretrained_refuses_a_code_pickle(evil, tmp_path: Path, name: str) -> None:
    from mmdiff.models.vae import build_vae

    make, marker = evil
    path = make(name)
    if path.name.endswith(".bin"):
        (path.parent / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
        path = path.parent.parent
    cfg = OmegaConf.merge(schema().model.vae, {"pretrained": str(path)})
    with pytest.raises(CheckpointError):
        build_vae(cfg)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["evil.pt", "folder/unet/diffusion_pytorch_model.bin"])
def test_unet_pretrained_refuses_a_code_pickle(evil, name: str) -> None:
    from mmdiff.models.unet import build_unet

    make, marker = evil
    path = make(name)
    if path.name.endswith(".bin"):
        (path.parent / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
        path = path.parent.parent
    cfg = OmegaConf.merge(schema().model.unet, {"pretrained": str(path)})
    with pytest.raises(CheckpointError):
        build_unet(cfg, latent_channels=4, sample_size=8, cross_attention_dim=32)
    assert not marker.exists()


def test_clip_pretrained_refuses_a_code_pickle(evil) -> None:
    from mmdiff.models.clip import ClipEncoder

    make, marker = evil
    cfg = OmegaConf.merge(schema().model.clip, {"name": "custom", "pretrained": str(make("clip.pt"))})
    with pytest.raises(CheckpointError, match="refused for safety"):
        ClipEncoder.from_config(cfg)
    assert not marker.exists()


# --------------------------------------------------------------------------------- configs
def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("value", ["${oc.env:WANDB_API_KEY}", "${oc.env:HOME,x}", "${oc.decode:${seed}}",
                                   "${oc.create:{}}", "x-${ oc.env :USER}", "${oc.select:seed,${oc.env:X}}"])
def test_unsafe_resolvers_are_refused_in_files_and_overrides(tmp_path: Path, monkeypatch, value: str) -> None:
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    with pytest.raises(ConfigError, match=r"'name' in .*cfg.yaml calls the interpolation resolver 'oc\.") as err:
        load_config(_yaml(tmp_path, yaml.safe_dump({"name": value})))
    assert SECRET not in str(err.value)
    with pytest.raises(ConfigError, match="'name' in the command line calls the interpolation resolver"):
        load_config(_yaml(tmp_path, "seed: 1\n"), [f"name={value}"])


def test_a_custom_resolver_is_refused_and_never_called(tmp_path: Path) -> None:
    calls = []
    OmegaConf.register_new_resolver("fault_probe", lambda *a: calls.append(a) or "x")
    try:
        with pytest.raises(ConfigError, match="resolver 'fault_probe'"):
            load_config(_yaml(tmp_path, "name: ${fault_probe:1}\n"))
    finally:
        OmegaConf.clear_resolver("fault_probe")
    assert calls == []


def test_plain_references_and_oc_select_still_work(tmp_path: Path) -> None:
    cfg = load_config(_yaml(tmp_path, "name: n\nrun_dir: out/${name}-${oc.select:seed,0}\n"))
    assert cfg.run_dir == "out/n-0"


@pytest.mark.parametrize("system", ["os.system", "mmdiff.systems.text_to_image.TextToImageSystem",
                                    "subprocess:Popen"])
def test_system_accepts_registry_names_only(tmp_path: Path, system: str) -> None:
    with pytest.raises(ConfigError, match="unknown system"):
        load_config(_yaml(tmp_path, "seed: 1\n"), [f"system={system}"])


def test_a_checkpoint_naming_an_unknown_system_or_a_resolver_is_refused(tmp_path: Path) -> None:
    import mmdiff

    bad_system = tmp_path / "a.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {"system": "os.system"}}}, bad_system)
    with pytest.raises(CheckpointError, match="unknown system 'os.system'"):
        mmdiff.load(bad_system)
    bad_resolver = tmp_path / "b.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {"name": "${oc.env:HOME}"}}}, bad_resolver)
    with pytest.raises(ConfigError, match="resolver 'oc.env'"):
        mmdiff.load(bad_resolver)


# --------------------------------------------------------------------------------- secrets
def test_a_secret_in_a_config_value_is_refused_without_echoing_it(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    shard = write_tar(tmp_path / "train.tar", [good(i) for i in range(4)])
    config = toy_config(tmp_path, [str(shard)], max_steps=2)
    for override in (f"logger.project={SECRET}", f"name=run-{SECRET}", "name=${oc.env:WANDB_API_KEY}"):
        assert main(["fit", str(config), override]) == 2
        err = errors(capsys.readouterr().err)
        assert len(err) == 1 and SECRET not in err[0], err
    assert "WANDB_API_KEY" in err[0] or "oc.env" in err[0]
    assert not (tmp_path / "run").exists()


def test_save_config_refuses_a_secret_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    cfg = OmegaConf.merge(schema(), {"logger": {"tags": ["ok", SECRET]}})
    with pytest.raises(ConfigError, match=r"'logger.tags\[1\]' holds the value of the environment variable HF_TOKEN"):
        save_config(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_no_secret_reaches_the_run_folder_or_the_logs(tmp_path: Path, monkeypatch, capfd, caplog) -> None:
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    shard = write_tar(tmp_path / "train.tar", [good(i) for i in range(4)])
    config = toy_config(tmp_path, [str(shard)], max_steps=3, logger="wandb")
    with caplog.at_level("DEBUG"):
        assert main(["-v", "fit", str(config), "logger.project=faults", "logger.mode=offline"]) == 0
    run = tmp_path / "run"
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any("wandb" in p.parts for p in files)
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []
    out = capfd.readouterr()
    assert SECRET not in out.out + out.err + caplog.text


# ----------------------------------------------------------------------------- paths/keys
UNSAFE_KEYS = ["../escape", "../../escape", "/tmp/faults-absolute-escape", "a/../../escape"]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_skipped_by_the_data_pipeline(tmp_path: Path, key: str) -> None:
    from datakit import data_cfg
    from mmdiff.data.datamodule import ShardDataModule
    from mmdiff.data.skips import count_skipped

    shard = write_tar(tmp_path / "s.tar", [good(0), (key, {"jpg": image_bytes(1), "txt": b"x"}), good(1)])
    assert key in [n.rsplit(".", 1)[0] for n in tar_names(shard)]
    dm = ShardDataModule(data_cfg(val_shards=[str(shard)]), seed=0)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert count_skipped(batches) == 1
    assert [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok] == ["good0000", "good0001"]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_shard_writer_refuses_unsafe_keys_and_leaves_nothing(tmp_path: Path, key: str) -> None:
    from mmdiff.data.writers import AtomicShardWriter

    out = tmp_path / "deep" / "out"
    with pytest.raises(DataError, match="cannot write a sample"):
        with AtomicShardWriter(out, "shard", 10) as writer:
            writer.write({"__key__": "00000000", "txt": "fine"})
            writer.write({"__key__": key, "txt": "escape"})
    assert list(out.iterdir()) == []  # the half-written shard is gone too
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "out"]


def test_shards_folder_writes_only_counter_keys_inside_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(outside)
    manifest = tmp_path / "m" / "list.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"path": "../outside.png", "caption": "../../evil"}) + "\n"
                        + json.dumps({"path": str(outside), "caption": "/etc/passwd"}) + "\n")
    out = tmp_path / "m" / "out"
    assert main(["shards", "folder", str(manifest), str(out)]) == 0
    (shard,) = out.iterdir()
    assert sorted(tar_names(shard)) == ["00000000.json", "00000000.png", "00000000.txt",
                                        "00000001.json", "00000001.png", "00000001.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "outside.png"]


def test_sample_files_are_numbered_whatever_the_prompt(tmp_path: Path) -> None:
    from mmdiff.inference.sample_files import write_samples

    class _Fake:
        def sample(self, prompts, seed, **options):
            return torch.zeros(len(prompts), 3, 8, 8)

    out = tmp_path / "a" / "out"
    write_samples(_Fake(), ["../../evil", "/tmp/evil"], n_per_prompt=1, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "grid.png", "prompts.txt"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["a", "out", "0000.png", "0001.png", "grid.png", "prompts.txt"])


def test_precompute_never_writes_an_unsafe_key(tmp_path: Path) -> None:
    from mmdiff.jobs.precompute import precompute

    src = tmp_path / "src"
    samples = [good(0), ("../../escape", {"jpg": image_bytes(1), "txt": b"x"}), good(1),
               ("/tmp/faults-abs", {"jpg": image_bytes(2), "txt": b"x"}), good(2)]
    write_tar(src / "train-000000.tar", samples)
    write_tar(src / "val-000000.tar", samples)
    cfg = load_config(tiny_t2i_config(tmp_path, src))
    out = tmp_path / "deep" / "latents"
    result = precompute(cfg, out, progress=False, batch_size=8)
    assert result.samples == {"train": 3, "val": 3}
    for shard in sorted(out.glob("*.tar")):
        assert {n.split(".", 1)[0] for n in tar_names(shard)} == {"good0000", "good0001", "good0002"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "src", "tiny.yaml"]
    assert not Path("/tmp/faults-abs.txt").exists()
