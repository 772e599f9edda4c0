"""`mmdiff` argument errors: one line on stderr and exit code 2, before any work starts; file-system
errors during a command: one line and exit code 1."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdiff import cli
from mmdiff.cli import main, output_folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "x.ckpt", "--prompt", "a", "--n", "0"], "mmdiff sample: argument --n: must be a positive number, got 0"),
        (["sample", "x.ckpt", "--prompt", "a", "--batch-size", "-3"], "argument --batch-size: must be a positive number, got -3"),
        (["sample", "x.ckpt", "--n", "four"], "argument --n: must be a whole number, got 'four'"),
        (["bench", "c.yaml", "--rounds", "0"], "mmdiff bench: argument --rounds: must be a positive number"),
        (["bench", "c.yaml", "--threads", "0"], "argument --threads: must be a positive number"),
        (["bench", "c.yaml", "--warmup", "-1"], "argument --warmup: must be zero or more, got -1"),
        (["caption", "x.ckpt", "y.png", "--beam-size", "0"], "argument --beam-size: must be a positive number"),
        (["eval", "fid", "x.ckpt", "--n-reference", "0"], "argument --n-reference: must be a positive number"),
        (["shards", "folder", "src", "out", "--shard-size", "0"], "argument --shard-size: must be a positive number"),
        (["precompute", "c.yaml", "--out", "d", "--batch-size", "0"], "argument --batch-size: must be a positive number"),
        (["sample", "x.ckpt", "--prompt", "a", "--sampler", "nope"], "argument --sampler: unknown sampler 'nope'; choose one of: ddpm,"),
        (["eval", "roundtrip", "a.ckpt", "b.ckpt", "--decoding", "nope"], "argument --decoding: invalid choice"),
        (["sample", "x.ckpt", "--prompt", "a", "--cfg", "-5"], "argument --guidance-scale/--cfg: guidance_scale must be >= 0, got -5.0 (see"),
        (["sample", "x.ckpt", "--prompt", "a", "--temperature", "nan"], "argument --temperature: must be a finite number"),
        (["sample", "x.ckpt", "--prompt", "a", "--eta", "lots"], "argument --eta: must be a number, got 'lots'"),
        (["sample", "x.ckpt", "--prompt", "a", "--strength", "0"], "argument --strength: strength must be in (0, 1], got 0.0"),
        (["sample", "x.ckpt", "--prompt", "a", "--strength", "1.5"], "argument --strength: strength must be in (0, 1], got 1.5"),
        (["caption", "x.ckpt", "y.png", "--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
        (["caption", "x.ckpt", "y.png", "--temperature", "-1"], "argument --temperature: must be zero or more"),
        (["bench", "c.yaml", "--peak-tflops", "0"], "argument --peak-tflops: must be more than zero, got 0"),
        (["sample"], "mmdiff sample: the following arguments are required: ckpt"),
        (["nosuch"], "invalid choice: 'nosuch'"),
    ],
)
def test_argument_errors_are_one_line(argv: list, message: str, capsys) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and message in err and "--help" in err


def test_help_still_prints_usage_and_exits_zero(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--help"])
    assert exit_info.value.code == 0 and "usage: mmdiff sample" in capsys.readouterr().out


def test_output_folder_accepts_new_and_existing_folders(tmp_path: Path) -> None:
    assert output_folder(str(tmp_path)) == str(tmp_path)
    assert output_folder(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # nothing is created while parsing


@pytest.mark.parametrize("argv", [
    ["sample", "x.ckpt", "--prompt", "a", "--out", "{file}"],
    ["vary", "x.ckpt", "y.png", "--out", "{file}/sub"],
    ["shards", "demo", "{file}"],
    ["precompute", "c.yaml", "--out", "{file}"],
    ["eval", "digits", "x.ckpt", "--out", "{file}"],
    ["export", "x.ckpt", "--out", "{file}"],
])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path: Path, argv: list, capsys) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    assert main([a.replace("{file}", str(file)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("argument --out" in err[0] or "argument out" in err[0]), err
    assert str(file) in err[0] and ("is a file, not a folder" in err[0] or "cannot be created" in err[0])
    assert file.read_text() == "keep me"
    with pytest.raises(argparse.ArgumentTypeError, match="cannot be created"):
        output_folder(str(file / "sub"))


def test_file_system_errors_are_one_line_with_exit_code_1(monkeypatch, capsys) -> None:
    def full_disk(args: argparse.Namespace) -> int:
        raise OSError(28, "No space left on device", "/runs/x/checkpoints/last.ckpt.tmp")

    monkeypatch.setattr(cli, "cmd_config", full_disk)
    assert main(["config", "c.yaml"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: No space left on device: '/runs/x/checkpoints/last.ckpt.tmp' (OSError; run with -v for "
                   "the traceback)."]


@pytest.mark.parametrize("name, gpus, message", [
    ("banana", 0, "unknown device 'banana'; use cpu, cuda, cuda:N or auto."),
    ("cuda", 0, "device 'cuda': torch sees no CUDA device on this machine; use cpu or auto."),
    ("cuda:3", 2, "device 'cuda:3': this machine has 2 CUDA device(s), cuda:0 to cuda:1."),
])
def test_a_device_that_is_not_here_is_one_line(monkeypatch, name: str, gpus: int, message: str) -> None:
    import torch

    from mmdiff.run.devices import resolve_device
    from mmdiff.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(UsageError) as err:
        resolve_device(name)
    assert str(err.value) == message
    assert resolve_device("auto", local_rank=3) == (torch.device("cuda", 1) if gpus else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")


def test_sample_on_a_missing_gpu_fails_before_reading_the_checkpoint(monkeypatch, tmp_path: Path, capsys) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    garbage = tmp_path / "x.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["sample", str(garbage), "--prompt", "a", "--device", "cuda", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.strip() == ("error: device 'cuda': torch sees no CUDA device on this machine; "
                                               "use cpu or auto.")


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe a prompt\n", "is not UTF-8 text (byte 0xff at offset 0); save it as UTF-8."),
    (None, "is not a file."),
])
def test_an_unreadable_prompts_file_is_one_line(tmp_path: Path, content, message: str, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    if content is None:
        prompts.mkdir()
    else:
        prompts.write_bytes(content)
    for argv in (["sample", "x.ckpt", "--prompts-file", str(prompts)],
                 ["eval", "clipscore", "x.ckpt", "--prompts", str(prompts)]):
        assert main(argv) == 2  # before the (missing) checkpoint is opened
        assert capsys.readouterr().err.strip() == f"error: prompts file '{prompts}' {message}"


# ------------------------------------------------------------------------- img2img and inpainting
def _png(path: Path, size: int = 16, left: int = 255) -> Path:
    """A greyscale-looking RGB square: ``left`` in the left half, 40 in the right half."""
    pixels = torch.full((size, size, 3), 40, dtype=torch.uint8)
    pixels[:, : size // 2] = left
    Image.fromarray(pixels.numpy()).save(path)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--init-image", "{tmp}/nowhere.png"], "init image '{tmp}/nowhere.png' does not exist; pass the path of an image file."),
    (["--init-image", "{tmp}/notes.txt"],
     "init image '{tmp}/notes.txt' is not a readable image (UnidentifiedImageError); pass a PNG or JPEG file."),
    (["--init-image", "{tmp}/img.png", "--mask", "{tmp}/notes.txt"],
     "mask '{tmp}/notes.txt' is not a readable image (UnidentifiedImageError); pass a PNG or JPEG file."),
    (["--init-image", "{tmp}/img.png", "--mask", "{tmp}/small.png"],
     "mask '{tmp}/small.png' is 8x8 pixels but init image '{tmp}/img.png' is 16x16; pass a mask of the image's size."),
    (["--mask", "{tmp}/img.png"], "--mask needs --init-image IMG, the image to start from."),
    (["--strength", "0.5"], "--strength needs --init-image IMG, the image to start from."),
    (["--init-image", "{tmp}/img.png", "--prior", "{tmp}/prior.ckpt"],
     "--init-image is for one-stage sampling; leave out --prior."),
])
def test_bad_init_image_or_mask_is_one_line_before_any_work(tmp_path: Path, extra: list, message: str, capsys) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    _png(tmp_path / "img.png")
    _png(tmp_path / "small.png", size=8)
    garbage = tmp_path / "x.ckpt"
    garbage.write_bytes(b"not a checkpoint")  # read, it would be another error (exit code 1)
    out = tmp_path / "out"
    argv = ["sample", str(garbage), "--prompt", "a", "--out", str(out), *(a.replace("{tmp}", str(tmp_path)) for a in extra)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: " + message.replace("{tmp}", str(tmp_path))]
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_t2i_ckpt(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> Path:
    from tiny_configs import tiny_t2i_config

    tmp = tmp_path_factory.mktemp("t2i")
    assert main(["fit", str(tiny_t2i_config(tmp, demo_shards, trainer={"max_steps": 1}))]) == 0
    return tmp / "run" / "checkpoints" / "last.ckpt"


def test_strength_sets_how_many_sampler_steps_run(tiny_t2i_ckpt: Path) -> None:
    from mmdiff.inference.api import load

    system = load(tiny_t2i_ckpt, expect="text_to_image", device="cpu")
    calls = []
    denoise = system.denoise
    system.denoise = lambda *a, **k: (calls.append(1), denoise(*a, **k))[1]
    image = torch.zeros(3, 16, 16)
    for strength, steps in ((0.3, 3), (0.55, 5), (0.99, 9), (1.0, 10)):
        calls.clear()
        system.sample(["a handwritten digit one"], init_image=image, strength=strength, steps=10, sampler="ddim")
        assert len(calls) == steps, strength


def test_inpainting_keeps_the_init_images_latents_outside_the_mask(tiny_t2i_ckpt: Path) -> None:
    """Latent cells with no pixel to regenerate end as the init image's latents exactly (the known
    region is re-imposed at the noise level of every step, the last one noiseless); the others are new."""
    from mmdiff.inference.api import load

    system = load(tiny_t2i_ckpt, expect="text_to_image", device="cpu")
    ends = []
    decode = system.decode_latents
    system.decode_latents = lambda latents: (ends.append(latents.clone()), decode(latents))[1]
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    mask = torch.zeros(16, 16)
    mask[:, :9] = 1  # regenerate pixel columns 0-8: latent columns 0-4 (8 latents of 2 pixels)
    images = system.sample(["a handwritten digit one", "a handwritten digit two"], init_image=image, mask=mask,
                           steps=4, sampler="ddpm", seed=1)
    init = system.encode_images(image, sample=False)
    (latents,) = ends
    assert images.shape == (2, 3, 16, 16) and latents.shape[-1] == 8
    assert torch.equal(latents[..., 5:], init.expand(2, -1, -1, -1)[..., 5:])
    assert not torch.isclose(latents[..., :5], init.expand(2, -1, -1, -1)[..., :5]).any()


def test_sample_cli_img2img_and_inpainting_end_to_end(tiny_t2i_ckpt: Path, tmp_path: Path) -> None:
    image, mask = _png(tmp_path / "img.png", size=24), _png(tmp_path / "mask.png", size=24)
    for extra in (["--strength", "0.5"], ["--mask", str(mask)]):
        out = tmp_path / extra[0].strip("-")
        assert main(["sample", str(tiny_t2i_ckpt), "--prompt", "a handwritten digit one", "--n", "2", "--steps", "4",
                     "--device", "cpu", "--out", str(out), "--init-image", str(image), *extra]) == 0
        assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png", "grid.png"]
        assert Image.open(out / "0000.png").size == (16, 16)
