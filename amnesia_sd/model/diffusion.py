"""The denoising loss shared by the Fisher, forgetting and the attacks: L_simple for DDPM-trained
UNets, the flow-matching loss for SD3's and Flux's transformers (the family says which)."""

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


def corrupt(family, scheduler, latents, noise, timesteps):
    """(noisy latents, the denoiser's timestep values, the target, per-sample loss weights or None)
    for timestep indices `timesteps` in [0, num_train_timesteps).

    Flow matching, as diffusers' SD3 and Flux training scripts: sigma = the scheduler's training
    sigmas at the index (shift included), x_t = (1 - sigma) x0 + sigma noise, target noise - x0,
    the denoiser fed the scheduler's timestep (sigma x 1000) and the loss weighted by the family's
    weighting scheme (1 for the scripts' defaults)."""
    if family.objective == "flow":
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigmas = scheduler.sigmas.to(latents.device)[timesteps]
        s = sigmas.view(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)
        noisy = (1.0 - s) * latents + s * noise
        weights = compute_loss_weighting_for_sd3(family.weighting_scheme, sigmas)
        return noisy, scheduler.timesteps.to(latents.device)[timesteps], noise - latents, weights
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return noisy, timesteps, diffusion_target(scheduler, latents, noise, timesteps), None


def per_sample_loss(family, denoiser, scheduler, latents, noise, timesteps, cond) -> torch.Tensor:
    """Mean squared error per sample, averaged over latent elements (and weighted as the family's
    training weights it); shape [batch]. `cond` is the family's conditioning of each sample
    (families.py)."""
    noisy, model_timesteps, target, weights = corrupt(family, scheduler, latents, noise, timesteps)
    prediction = family.predict(denoiser, noisy, model_timesteps, cond)
    loss = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, latents.ndim)))
    return loss if weights is None else weights.float() * loss
