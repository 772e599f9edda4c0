"""GaussianDiffusion: the object systems use — training loss, VLB/bits-per-dim and sampling."""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from mmdiff.diffusion.guidance import Cond, Denoiser, ModelFn
from mmdiff.diffusion.objectives import (
    LOSS_WEIGHTINGS,
    PREDICTION_TYPES,
    TIMESTEP_SAMPLINGS,
    edm_scalings,
    loss_weight,
    offset_noise,
    prediction_target,
    randn_like,
    sample_timesteps,
    split_prediction,
)
from mmdiff.diffusion.options import SAMPLER_GRIDS, SamplingOptions
from mmdiff.diffusion.samplers import SAMPLERS, VARIANCE_TYPES, StepHook, langevin_corrector
from mmdiff.diffusion.schedules import NoiseSchedule, expand_like
from mmdiff.diffusion.spacing import make_grid
from mmdiff.diffusion.vlb import (
    LOG2,
    discretized_gaussian_log_likelihood,
    learned_range_log_variance,
    mean_flat,
    normal_kl,
)

log = logging.getLogger(__name__)
TrainModelFn = Callable[[Tensor, Tensor], Tensor]


def _get(cfg: Any, key: str, default: Any) -> Any:
    if callable(getattr(cfg, "get", None)):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} '{value}'; choose one of: {', '.join(choices)}.")


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion: schedule + objective + variance model.

    ``model_fn(x_t, t)`` (training) or ``model_fn(x_t, t, cond)`` (sampling) returns the network
    output: x_0's channels, or twice as many when ``variance_type == "learned_range"`` (mean
    output first, then the variance interpolation v ∈ [-1, 1]).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        prediction_type: str = "epsilon",
        loss_weighting: str = "uniform",
        snr_gamma: float = 5.0,
        noise_offset: float = 0.0,
        timestep_sampling: str = "uniform",
        variance_type: str = "fixed_small",
        vlb_weight: float = 0.001,
        sigma_data: Optional[float] = None,
    ) -> None:
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("loss weighting", loss_weighting, LOSS_WEIGHTINGS)
        _check_choice("timestep sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        if sigma_data is not None and prediction_type != "sample":
            raise ValueError("EDM preconditioning needs prediction_type 'sample' (the network predicts x0).")
        if sigma_data is not None and variance_type == "learned_range":
            raise ValueError("EDM preconditioning cannot be combined with a learned variance.")
        if float(schedule.alphas_cumprod[-1]) == 0.0 and prediction_type == "epsilon":
            log.warning(
                "zero terminal SNR with epsilon prediction: x0 is undefined at the last timestep; "
                "use v_prediction (Lin et al. 2023)."
            )
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.snr_gamma = float(snr_gamma)
        self.noise_offset = float(noise_offset)
        self.timestep_sampling = timestep_sampling
        self.variance_type = variance_type
        self.vlb_weight = float(vlb_weight)
        self.sigma_data = sigma_data

    @classmethod
    def from_config(cls, cfg: Any) -> "GaussianDiffusion":
        """Build from the ``diffusion:`` config section (DictConfig, dataclass or dict)."""
        betas = _get(cfg, "betas", None)
        kind = _get(cfg, "beta_schedule", "scaled_linear")
        schedule = NoiseSchedule.make(
            kind=kind,
            num_timesteps=int(_get(cfg, "num_train_timesteps", 1000)),
            beta_start=float(_get(cfg, "beta_start", 0.00085)),
            beta_end=float(_get(cfg, "beta_end", 0.012)),
            betas=list(betas) if kind == "custom" and betas else None,
            zero_terminal_snr=bool(_get(cfg, "zero_terminal_snr", False)),
            resolution_shift=float(_get(cfg, "resolution_shift", 1.0)),
        )
        edm = bool(_get(cfg, "edm_preconditioning", False))
        return cls(
            schedule,
            prediction_type=str(_get(cfg, "prediction_type", "epsilon")),
            loss_weighting=str(_get(cfg, "loss_weighting", "uniform")),
            snr_gamma=float(_get(cfg, "snr_gamma", 5.0)),
            noise_offset=float(_get(cfg, "noise_offset", 0.0)),
            timestep_sampling=str(_get(cfg, "timestep_sampling", "uniform")),
            variance_type=str(_get(cfg, "variance_type", "fixed_small")),
            vlb_weight=float(_get(cfg, "vlb_weight", 0.001)),
            sigma_data=float(_get(cfg, "sigma_data", 0.5)) if edm else None,
        )

    # ------------------------------------------------------------------------------ basics
    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def learned_variance(self) -> bool:
        return self.variance_type == "learned_range"

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Forward process ``x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε`` (per-sample integer t)."""
        return self.schedule.q_sample(x0, t, noise)

    def model_input(self, x_t: Tensor, t: Tensor) -> Tensor:
        """What the network sees for x_t: x_t itself, or c_in·x under EDM preconditioning."""
        if self.sigma_data is None:
            return x_t
        c_in, _, _ = edm_scalings(expand_like(self.schedule.alpha_bar(t), x_t), self.sigma_data)
        return x_t * c_in

    def _split(self, out: Tensor, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        c = x.shape[1]
        expected = 2 * c if self.learned_variance else c
        if out.ndim != x.ndim or out.shape[1] != expected or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} but {expected} channels are expected for "
                f"samples of shape {tuple(x.shape)}."
            )
        return (out[:, :c], out[:, c:]) if self.learned_variance else (out, None)

    # ------------------------------------------------------------------------------ training
    def training_loss(
        self,
        model_fn: TrainModelFn,
        x0: Tensor,
        generator: Optional[torch.Generator] = None,
        *,
        t: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """Weighted regression loss (+ λ·T·L_t when the variance is learned).

        Returns ``{"loss", "mse"}`` and ``"vlb"`` (mean L_t in bits/dim) for learned variance.
        The hybrid loss is ``L_simple + vlb_weight · T · L_t`` with the mean output detached in
        the L_t term (Nichol & Dhariwal 2021; vlb_weight = 0.001 reproduces their λ).
        """
        if x0.dtype in (torch.float16, torch.bfloat16):  # the noising math needs float32's precision
            x0 = x0.float()
        batch = x0.shape[0]
        if t is None:
            t = sample_timesteps(batch, self.num_timesteps, self.timestep_sampling, generator)
        t = t.to(x0.device)
        if noise is None:
            noise = offset_noise(randn_like(x0, generator), self.noise_offset, generator)
        ab = expand_like(self.schedule.alpha_bar(t), x0)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        out = model_fn(self.model_input(x_t, t), t)
        mean_out, var_out = self._split(out, x0)
        target = prediction_target(self.prediction_type, x0, noise, ab, x_t, self.sigma_data)
        mse = mean_flat((mean_out.float() - target.float()) ** 2)
        snr = self.schedule.snr(t).to(device=x0.device, dtype=torch.float32)
        weight = loss_weight(self.loss_weighting, snr, self.prediction_type, self.snr_gamma, self.sigma_data)
        loss = (weight * mse).mean()
        result = {"mse": mse.mean().detach()}
        if self.learned_variance:
            vb = self._vb_terms(mean_out.detach(), var_out, x0, x_t, t)
            loss = loss + self.vlb_weight * self.num_timesteps * vb.mean()
            result["vlb"] = vb.mean().detach()
        result["loss"] = loss
        return result

    # ------------------------------------------------------------------------------ VLB
    def model_log_variance(self, var_out: Optional[Tensor], t: Tensor, like: Tensor, variance_type: Optional[str] = None) -> Tensor:
        """log σ² of p(x_{t-1} | x_t): fixed_small = log β̃ (clipped at t = 0 as improved-diffusion),
        fixed_large = log β (β̃_1 at t = 0), learned_range = interpolation by the model's v."""
        kind = variance_type or self.variance_type
        s = self.schedule
        min_log = expand_like(s.lookup(s.posterior_log_variance_clipped, t), like)
        if kind == "fixed_small":
            return min_log.expand_as(like)
        if kind == "fixed_large":
            return expand_like(s.lookup(s.log_variance_fixed_large, t), like).expand_as(like)
        if var_out is None:
            raise ValueError("a learned variance needs a model with 2x output channels.")
        max_log = expand_like(s.lookup(s.log_betas, t), like)
        return learned_range_log_variance(var_out, min_log, max_log)

    def _vb_terms(
        self,
        mean_out: Tensor,
        var_out: Optional[Tensor],
        x0: Tensor,
        x_t: Tensor,
        t: Tensor,
        variance_type: Optional[str] = None,
    ) -> Tensor:
        """L_t per sample in bits/dim: KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)), or the decoder NLL at t = 0."""
        ab = expand_like(self.schedule.alpha_bar(t), x_t)
        x0_hat, _ = split_prediction(mean_out, x_t, self.prediction_type, ab, self.sigma_data)
        model_mean, _ = self.schedule.q_posterior(x0_hat, x_t, t)
        true_mean, true_logvar = self.schedule.q_posterior(x0, x_t, t)
        model_logvar = self.model_log_variance(var_out, t, x_t, variance_type)
        kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / LOG2
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / LOG2
        return torch.where(t == 0, nll, kl)

    def prior_bits_per_dim(self, x0: Tensor) -> Tensor:
        """KL(q(x_{T-1} | x_0) ‖ N(0, I)) per sample, in bits/dim."""
        ab = float(self.schedule.alphas_cumprod[-1])
        mean = math.sqrt(ab) * x0
        logvar = torch.full_like(x0, math.log(max(1 - ab, 1e-300)))
        return mean_flat(normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0))) / LOG2

    @torch.no_grad()
    def vlb_bits_per_dim(
        self,
        model_fn: TrainModelFn,
        x0: Tensor,
        generator: Optional[torch.Generator] = None,
        variance_type: Optional[str] = None,
    ) -> Dict[str, Tensor]:
        """The full variational bound −log p(x_0) ≤ Σ_t L_t + L_prior, in bits/dim, per sample.

        Runs the model at every one of the T timesteps. ``x0`` should lie on the 256-level grid in
        [-1, 1] (8-bit data) for the decoder term to be a likelihood. ``variance_type`` overrides
        the configured one (e.g. to score a fixed-variance model with ``fixed_large``).
        Returns ``total_bpd`` (B,), ``prior_bpd`` (B,), ``vb`` (B, T) and ``mse`` (B, T) of ε̂.
        """
        if variance_type is not None:
            _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        batch, T = x0.shape[0], self.num_timesteps
        vb = torch.zeros(batch, T, dtype=torch.float64, device=x0.device)
        mse = torch.zeros_like(vb)
        for step in reversed(range(T)):
            t = torch.full((batch,), step, dtype=torch.long, device=x0.device)
            noise = randn_like(x0, generator)
            x_t = self.q_sample(x0, t, noise)
            mean_out, var_out = self._split(model_fn(self.model_input(x_t, t), t), x0)
            vb[:, step] = self._vb_terms(mean_out, var_out, x0, x_t, t, variance_type).double()
            ab = expand_like(self.schedule.alpha_bar(t), x_t)
            _, eps = split_prediction(mean_out, x_t, self.prediction_type, ab, self.sigma_data)
            mse[:, step] = mean_flat((eps - noise) ** 2).double()
        prior = self.prior_bits_per_dim(x0).double()
        return {"total_bpd": vb.sum(1) + prior, "prior_bpd": prior, "vb": vb, "mse": mse}

    # ------------------------------------------------------------------------------ sampling
    def denoiser(
        self,
        model_fn: ModelFn,
        *,
        cond: Cond = None,
        uncond: Cond = None,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        clip_denoised: Optional[float] = None,
    ) -> Denoiser:
        """The ``denoise(x_t, t, ᾱ)`` callable samplers use, for this objective."""
        return Denoiser(
            model_fn,
            self.prediction_type,
            learned_variance=self.learned_variance,
            sigma_data=self.sigma_data,
            cond=cond,
            uncond=uncond,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            clip_denoised=clip_denoised,
        )

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: Sequence[int],
        *,
        cond: Cond = None,
        uncond: Cond = None,
        options: Optional[SamplingOptions] = None,
        x_init: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
        **changes: Any,
    ) -> Tensor:
        """Draw samples of ``shape`` with ``options`` (defaults: :class:`SamplingOptions`'), each
        keyword in ``changes`` replacing one of them (see :mod:`mmdiff.diffusion.samplers`).

        * Guidance: with ``uncond`` and ``guidance_scale != 1`` both branches run in one batch.
        * img2img: ``x_init`` with ``strength`` s < 1 starts from ``x_init`` noised to the grid point
          ``N - int(N·s)`` (at least one step runs); s = 1 starts from pure noise.
        * Inpainting: ``mask`` (1 = known, taken from ``x_init``; 0 = generated, broadcastable to
          ``shape``) re-imposes the known region, noised to the current level, after every step;
          ``resample_steps`` r > 0 adds RePaint resampling (Lugmayr et al. 2022, jump length 1):
          each step is redone r more times after re-noising its result back by one step
          (single-step samplers only; (r+1)× the network evaluations).
        * ``corrector_steps`` Langevin steps with target ``snr`` after every step but the last
          (predictor-corrector, Song et al. 2021).
        * ``temperature`` scales the noise injected by DDPM, DDIM (η > 0) and the corrector.
        Raises ``ValueError`` with one sentence on bad arguments.
        """
        o = (options or SamplingOptions()).replace(**changes)
        o.validate(num_train_timesteps=self.num_timesteps)
        sampler, steps, strength, resample_steps = o.sampler, o.steps, o.strength, o.resample_steps
        shape = tuple(int(s) for s in shape)
        if resample_steps and mask is None:
            raise ValueError("resample_steps is only used for inpainting (with a mask).")
        if x_init is not None and tuple(x_init.shape) != shape:
            raise ValueError(f"x_init has shape {tuple(x_init.shape)} but samples of shape {shape} were requested.")
        if mask is not None:
            if x_init is None:
                raise ValueError("inpainting with a mask needs x_init, the image whose known region is kept.")
            if mask.ndim != len(shape) or any(m not in (1, s) for m, s in zip(mask.shape, shape)):
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not match samples of shape {shape}; "
                    "each mask dimension must be 1 or the sample's."
                )
        if device is None:
            device = x_init.device if x_init is not None else torch.device("cpu")
        device = torch.device(device)

        grid = make_grid(self.schedule, SAMPLER_GRIDS[sampler], steps, o.timestep_spacing, o.steps_offset)
        if sampler == "ddim" and not o.set_alpha_to_one:
            grid = grid.end_at(float(self.schedule.alphas_cumprod[0]))
        if x_init is not None and strength < 1.0:
            grid = grid.tail(steps - max(1, min(int(steps * strength), steps)))
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)
        known = x_init.to(device=device, dtype=dtype) if x_init is not None else None
        ab0 = float(grid.alphas_bar[0])
        if known is not None and strength < 1.0:
            x = math.sqrt(ab0) * known + math.sqrt(1 - ab0) * noise
        else:
            x = noise
        den = self.denoiser(
            model_fn,
            cond=cond,
            uncond=uncond,
            guidance_scale=o.guidance_scale,
            guidance_rescale=o.guidance_rescale,
            clip_denoised=o.clip_denoised,
        )
        hook = self._step_hook(den, grid, known, mask, o.corrector_steps, o.snr, generator, o.temperature, dtype, device)
        if mask is not None:
            x = self._paste(x, known, mask.to(device=device, dtype=dtype), ab0, generator)
        run = SAMPLERS[sampler]
        kwargs = dict(generator=generator, temperature=o.temperature, eta=o.eta, variance_type=self.variance_type)
        if not resample_steps:
            return run(den, x, grid, on_step=hook, progress=progress, **kwargs)
        ab = grid.alphas_bar.tolist()
        for i in range(len(grid)):
            step_hook = (lambda xx, j, i=i: hook(xx, i + j)) if hook is not None else None
            for r in range(resample_steps + 1):
                x_next = run(den, x, grid.step(i), on_step=step_hook, **kwargs)
                if r == resample_steps or ab[i + 1] >= 1:
                    break
                ratio = ab[i] / ab[i + 1]  # forward from level i+1 back to level i
                x = math.sqrt(ratio) * x_next + math.sqrt(1 - ratio) * randn_like(x_next, generator)
            x = x_next
        return x

    @staticmethod
    def _paste(x: Tensor, known: Tensor, mask: Tensor, alpha_bar: float, generator: Optional[torch.Generator]) -> Tensor:
        noised = known if alpha_bar >= 1 else math.sqrt(alpha_bar) * known + math.sqrt(1 - alpha_bar) * randn_like(known, generator)
        return mask * noised + (1 - mask) * x

    def _step_hook(
        self,
        den: Denoiser,
        grid: Any,
        known: Optional[Tensor],
        mask: Optional[Tensor],
        corrector_steps: int,
        snr: float,
        generator: Optional[torch.Generator],
        temperature: float,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Optional[StepHook]:
        if mask is None and corrector_steps == 0:
            return None
        m = mask.to(device=device, dtype=dtype) if mask is not None else None
        ab = grid.alphas_bar.tolist()
        n = len(grid)

        def hook(x: Tensor, i: int) -> Tensor:
            if m is not None:
                x = self._paste(x, known, m, ab[i], generator)
            if corrector_steps and i < n:
                t = grid.timesteps[i]
                alpha = float(self.schedule.alphas[min(int(round(float(t))), self.num_timesteps - 1)])
                x = langevin_corrector(
                    den, x, t, ab[i], steps=corrector_steps, snr=snr, alpha=alpha,
                    generator=generator, temperature=temperature,
                )
                if m is not None:
                    x = self._paste(x, known, m, ab[i], generator)
            return x

        return hook

