"""The denoising loss L_simple shared by the Fisher and by forgetting."""

from __future__ import annotations

import torch


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet must predict, following the scheduler's prediction_type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon and v_prediction are supported)")


def per_sample_loss(family, unet, scheduler, latents, noise, timesteps, cond) -> torch.Tensor:
    """Mean squared error per sample, averaged over latent elements; shape [batch]. `cond` is the
    family's conditioning of each sample (families.py)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = family.predict(unet, noisy, timesteps, cond)
    target = diffusion_target(scheduler, latents, noise, timesteps)
    return (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
