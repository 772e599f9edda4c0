"""Speed switches: each is a config key, off/auto by default, and training still works with it on."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from mmdiff.cli import main
from mmdiff.config import load_config
from mmdiff.errors import ConfigError
from mmdiff.models.unet import build_unet
from mmdiff.systems.base import System
from mmdiff.systems.optim import configure_adamw, fused_adamw_setting, use_fused_adamw
from mmdiff.systems.speed import prepare_unet


def _unet(cfg):
    return build_unet(cfg.model.unet, latent_channels=4, sample_size=8, cross_attention_dim=64,
                      pooled_dim=64, learned_variance=False)


def test_defaults_are_safe(tiny_cfg_path: Path) -> None:
    cfg = load_config(tiny_cfg_path)
    u, t = cfg.model.unet, cfg.trainer
    assert (u.channels_last, u.compile, u.gradient_checkpointing) == (None, "none", False)
    assert (t.fused_adamw, t.tf32) == (None, True)
    unet = _unet(cfg)
    applied = prepare_unet(unet, u, torch.device("cpu"))
    assert applied == {"channels_last": False, "gradient_checkpointing": False, "compile": "none"}
    # diffusers runs attention through torch's scaled_dot_product_attention
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_switches_on_still_train(tiny_cfg_path: Path) -> None:
    cfg = load_config(tiny_cfg_path, ["model.unet.channels_last=true",
                                      "model.unet.gradient_checkpointing=true"])
    unet = _unet(cfg).train()
    applied = prepare_unet(unet, cfg.model.unet, torch.device("cpu"))
    assert applied["channels_last"] and applied["gradient_checkpointing"]
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert unet.is_gradient_checkpointing
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    out = unet(x, torch.tensor([3, 500]), encoder_hidden_states=torch.randn(2, 5, 64),
               class_labels=torch.randn(2, 64)).sample
    out.square().mean().backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_regional_compile_wraps_each_block_in_place(tiny_cfg_path: Path) -> None:
    cfg = load_config(tiny_cfg_path, ["model.unet.compile=regional"])
    unet = _unet(cfg)
    keys = list(unet.state_dict())
    prepare_unet(unet, cfg.model.unet, torch.device("cpu"))
    blocks = list(unet.down_blocks) + list(unet.up_blocks) + [unet.mid_block]
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert unet._compiled_call_impl is None
    assert list(unet.state_dict()) == keys  # checkpoints keep their keys


def test_fused_adamw_on_cpu_and_cuda_unless_asked(tiny_cfg_path: Path) -> None:
    cfg = load_config(tiny_cfg_path)
    params = list(torch.nn.Linear(2, 2).parameters())
    assert use_fused_adamw(params)  # CPU parameters, auto
    assert not use_fused_adamw(list(torch.nn.Linear(2, 2, device="meta").parameters()))
    assert use_fused_adamw(params, True) and not use_fused_adamw(params, False)
    assert configure_adamw(params, cfg.optim, 10, fused=None)["optimizer"].defaults.get("fused")
    assert not configure_adamw(params, cfg.optim, 10, fused=False)["optimizer"].defaults.get("fused")


def test_fused_adamw_steps_like_the_default_loop(tiny_cfg_path: Path) -> None:
    cfg = load_config(tiny_cfg_path)
    torch.manual_seed(0)
    nets = [torch.nn.Linear(16, 8) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [configure_adamw(n.parameters(), cfg.optim, 10, fused=f)["optimizer"] for n, f in zip(nets, (True, False))]
    x = torch.randn(4, 16)
    for _ in range(5):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(nets[0].weight, torch.nn.Linear(16, 8).weight)


def test_fused_adamw_auto_is_off_only_for_fp16_with_clipping(tiny_cfg_path: Path) -> None:
    def setting(*overrides: str):
        return fused_adamw_setting(load_config(tiny_cfg_path, list(overrides)).trainer)

    assert setting() is None and setting("trainer.precision=bf16-mixed") is None
    assert setting("trainer.precision=16-mixed") is False  # clipping is on by default
    assert setting("trainer.precision=16-mixed", "trainer.gradient_clip_val=0") is None
    assert setting("trainer.fused_adamw=false") is False
    with pytest.raises(ConfigError, match="cannot clip gradients under fp16"):
        load_config(tiny_cfg_path, ["trainer.precision=16-mixed", "trainer.fused_adamw=true"])


class _Clipped(System):
    def __init__(self) -> None:
        super().__init__(None)
        self.layer = torch.nn.Linear(8, 8)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fused_adamw_clips_under_bf16(algorithm: str) -> None:
    """Lightning's plugin refuses to clip for a fused optimiser even without a GradScaler."""
    module = _Clipped()
    module._trainer = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"))
    opt = torch.optim.AdamW(module.parameters(), fused=True)
    for p in module.parameters():
        p.grad = torch.full_like(p, 100.0)
    module.configure_gradient_clipping(opt, 0.5, algorithm)
    grads = [p.grad for p in module.parameters()]
    if algorithm == "norm":
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) == pytest.approx(0.5, rel=1e-4)
    else:
        assert max(g.abs().max().item() for g in grads) == 0.5


def test_bf16_mixed_fit_with_fused_adamw_and_clipping(tiny_cfg_path: Path, tmp_path: Path) -> None:
    """The recommended GPU setting (bf16-mixed, fused AdamW, clipping at 1.0) trains end to end."""
    assert main(["fit", str(tiny_cfg_path), f"run_dir={tmp_path / 'run'}", "trainer.precision=bf16-mixed",
                 "trainer.max_steps=2", "trainer.val_every_n_steps=2", "trainer.checkpoint_every_n_steps=2"]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["fused"]
