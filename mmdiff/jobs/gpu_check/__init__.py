"""``bash tools/gpu_check.sh OUT.json``: the GPU proof of mmdiff in one run of at most 9 minutes.

Each section runs in its own subprocess (``python -m mmdiff.jobs.gpu_check --section NAME``) with its own
time budget, so a CUDA failure (OOM, NCCL, compile) becomes that section's ``error`` and the rest
still run; the JSON is rewritten after every section, so a run killed part-way keeps what it had.

Sections (:data:`SECTIONS`):

* ``demo`` — the demo text-to-image config (random weights) in fp32 and bf16-mixed: steps/s of
  (a) ``Trainer.fit`` and (b) the plain loop, online and precomputed, and (a)/(b);
* ``sd_unet_eager`` / ``sd_unet_regional`` — the SD-2-size U-Net (865.9 M parameters) at 256² with
  random weights, bf16-mixed, channels_last, precomputed latents, ``compile`` none / regional:
  images/s, MFU and peak memory at the largest batch that fits (found by doubling then bisecting
  until ``torch.cuda.OutOfMemoryError``; the regional run starts from the eager run's batch, or 64, and steps down on OOM);
* ``sampling`` — DPM++2M, 20 steps, batch 1 and 16 on the SD-2-size system: s/image;
* ``fsdp`` — one ``mmdiff fit`` step under FSDP2 on one rank (NCCL), bf16-mixed, channels_last;
* ``fp16_scaler`` — one fit step in ``16-mixed`` (GradScaler);
* ``fp16_vae`` — one training step with an fp16 VAE whose encoder overflows (the fp32 fallback);
* ``resume`` — exact resume: 20 steps straight, and 10 + resume from the step-10 checkpoint, with
  ``trainer.deterministic: true``; the losses of steps 11–20 must match.

Every section's entry has ``status``: ``ok`` (with its figures), ``skipped`` (with ``reason``) or
``error`` (with ``error``). ``--dry-run`` runs every section at toy size on the CPU (tiny U-Net,
gloo, bf16 autocast on the CPU; ``16-mixed`` is skipped there, since it needs a GPU), so the script
is tested where no GPU is.
"""
from mmdiff.jobs.gpu_check.runner import format_table, main, run_all
from mmdiff.jobs.gpu_check.sections import NO_GPU, RUNNERS, SECTIONS, is_oom, largest_batch, run_section

__all__ = ["NO_GPU", "RUNNERS", "SECTIONS", "format_table", "is_oom", "largest_batch", "main", "run_all",
           "run_section"]
