"""``mmdiff bench CONFIG``: where the time of a text-to-image config goes, in one run.

:func:`run_bench` measures, on this machine, for the config's model, batch and precision
(docs/performance.md explains how to read the table):

* **train** — median step time (with its IQR) and images/s after warm-up, two ways side by side in
  one process on the same U-Net, batch and precision, interleaved step by step: per round and
  mode one ``Trainer.fit`` of (a) with (b) run in blocks between its steps
  (:func:`interleave_order`: ``a a b b · b b a a · …``), so both see the same machine state:

  - ``framework`` (a): ``lightning.Trainer.fit`` of the real :class:`TextToImageSystem`: Lightning's
    loop and precision plugin, automatic optimisation (zero_grad, backward, gradient clipping, AdamW,
    LR scheduler), the system's ``training_step`` (caption dropout, frozen encoders or stored
    arrays, the diffusion loss, ``self.log``) and the EMA callback (when ``model.use_ema``).
    Batches come from an in-memory loader of one fixed batch (the real loader is measured on its
    own below); no logger, checkpoints, previews or validation. A step runs from the end of what ran before it
    (the previous step or a block of (b)) to its ``on_train_batch_end``, so everything Lightning
    does between two steps counts.
  - ``plain`` (b): a minimal hand-written PyTorch loop doing the same work: batch to device,
    VAE + text encoder under ``no_grad`` (or the stored arrays), noise, U-Net, ε-MSE, backward,
    clipping, AdamW, LR schedule, EMA lerp (:class:`PlainLoop`, run from a callback of (a)'s fit).

  ``overhead`` = (a)/(b), the median over pairs of the pair's (a)/(b), with its spread, the
  ratio per round and a verdict (:func:`judge`): "too noisy to judge" when the ratio is not
  settled to ±5 % or the load exceeds the CPUs, with the rounds it would take. Each runs with
  **online** encoding (VAE + text encoder every step) and from **precomputed** latents and text states (``model.precomputed``); ``precomputed_speedup``
  is online/precomputed step time of (a).
* **loader** — the config's ``ShardDataModule`` alone: images/s decoded and augmented with no
  workers (one process: the per-worker rate) and with ``data.num_workers``, against the images/s
  the framework step consumes (``headroom``); and, interleaved in blocks without workers, the same
  shards read square and with aspect-ratio buckets (the config's set, or one of ``image_size``²
  pixels in multiples of the model's size multiple): ``buckets.throughput_ratio``.
* **flops** — ``torch.utils.flop_counter`` FLOPs per image of the U-Net's training step
  (forward + backward), of one U-Net call and of the frozen encoders; achieved FLOP/s, and on a
  GPU MFU against the device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`).
* **ddp_callbacks** (only when asked for: it starts two processes) — a 2-rank DDP ``Trainer.fit``
  on CPU (gloo) with mmdiff's per-step callbacks (NaN guard, data statistics, requeue flag, data
  position and step seed, EMA, progress log) turned on and off in interleaved blocks of steps
  within the same fit (:class:`CallbackGate`): per side median and IQR, the on/off ratio with its
  spread and verdict.
* **memory** — peak CPU RSS, and per section ``torch.cuda.max_memory_allocated`` on a GPU.
* **sampling** — ms per U-Net call and s/image of a 20-step ``dpmpp_2m`` run with the config's
  guidance scale (both branches in one U-Net call) at batch 1 and 16, VAE decode included.

Timings on a shared machine are noisy: the load average before and after is in the result.

The package, one job per module: ``timing`` (clocks, statistics), ``batches`` (the fixed inputs),
``spread`` (quartiles, paired ratios, the verdict), ``steps`` (the two step runners, the interleaving
and the ``train`` section), ``loader`` (the real data pipeline:
``loader`` and ``fit``), ``flops`` (FLOP counting, MFU), ``sampling_speed``, ``callback_gate``
(callbacks on and off per batch), ``ddp_callbacks`` (the 2-rank section), ``driver``
(:func:`run_bench`, the targets) and ``report`` (table, JSON).
"""
from mmdiff.jobs.bench.batches import bench_system, make_batch, precomputed_batch, use_stored_arrays
from mmdiff.jobs.bench.callback_gate import CallbackGate, interleaved_schedule
from mmdiff.jobs.bench.ddp_callbacks import bench_ddp_callbacks, step_callbacks
from mmdiff.jobs.bench.driver import DEFAULT_SECTIONS, PRESETS, SECTIONS, environment, pick_bench_device, run_bench, targets
from mmdiff.jobs.bench.flops import PEAK_BF16_TFLOPS, add_achieved, bench_flops, count_flops, peak_bf16_tflops
from mmdiff.jobs.bench.loader import bench_fit, bench_loader, bucket_data, bucket_rows, precomputed_data, square_data
from mmdiff.jobs.bench.report import format_table, write_json
from mmdiff.jobs.bench.sampling_speed import bench_sampling
from mmdiff.jobs.bench.spread import judge, summary
from mmdiff.jobs.bench.steps import PlainLoop, StepTimer, bench_train, framework_steps, interleave_order, interleaved_steps, plain_steps

__all__ = [
    "CallbackGate", "DEFAULT_SECTIONS", "StepTimer", "bench_ddp_callbacks", "bench_system", "interleaved_schedule",
    "step_callbacks", "PEAK_BF16_TFLOPS", "PRESETS", "PlainLoop", "interleave_order", "interleaved_steps", "judge", "summary", "SECTIONS", "add_achieved", "bench_fit", "bench_flops", "bench_loader",
    "bench_sampling", "bench_train", "bucket_data", "bucket_rows", "square_data", "count_flops", "environment", "format_table", "framework_steps",
    "make_batch", "peak_bf16_tflops", "pick_bench_device", "plain_steps", "precomputed_batch", "use_stored_arrays",
    "precomputed_data", "run_bench", "targets", "write_json",
]
