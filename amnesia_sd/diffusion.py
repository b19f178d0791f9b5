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


def per_sample_loss(unet, scheduler, latents, noise, timesteps, text_embeddings) -> torch.Tensor:
    """Mean squared error per sample, averaged over latent elements; shape [batch]."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, text_embeddings).sample
    target = diffusion_target(scheduler, latents, noise, timesteps)
    return (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings as the pipelines use them (last hidden state, padded to max length)."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]
