"""Sampling images from a pipeline, one seed per image so results do not depend on batching
(beyond float rounding: kernels may round differently per batch size)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import torch
from PIL import Image

from amnesia_sd.core.config import GenerationSettings
from amnesia_sd.core.cost import say
from amnesia_sd.core.errors import UserError
from amnesia_sd.model.families import family_of
from amnesia_sd.model.loading import image_size, latent_size
from amnesia_sd.model.memory import (budget, gib, largest_fitting, meta_copy, out_of_memory, plan_line, sampling_peak,
                                     weight_bytes)


# "attack*": `attack`'s own streams, apart from every stream training used (issue 26: an attack
# measured with the noise it trained against looks better than it is).
STREAMS = ("image", "fisher", "train", "adversary", "adversarial", "neighbor", "preserve", "attack",
           "attack-concept", "attack-prompt")


def image_seed(seed: int, index: int, stream: str = "image") -> int:
    """The generator seed of item `index` of a run seeded by `seed`, fixed by those alone.

    torch's CPU generator keeps only the low 32 bits of a seed, so the run's seed cannot sit in the
    high bits: each (stream, seed) gets its own 32-bit offset and items follow it consecutively, so
    the items of one run never share noise. Streams keep the Fisher's noise apart from the noise the
    same image was generated from (METHOD.md: salt the seed), and training batches apart from both.
    Images of seed 0 start at 0, as they always have."""
    if stream not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}")
    offset = 0 if (stream, seed) == ("image", 0) else int.from_bytes(
        hashlib.sha256(f"amnesia-sd:{stream}:{seed}".encode()).digest()[:4], "big")
    return (offset + index) % 2**32


def process_share(count: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The indices of `count` images that process `rank` of `world` generates: whole batches, batch k
    to process k mod world. Every image is then computed in the same batch as with one process,
    so the pixels do not depend on the number of processes (kernels may differ by batch)."""
    starts = range(rank * batch_size, count, world * batch_size)
    return [i for start in starts for i in range(start, min(start + batch_size, count))]


DEFAULT_SAMPLING_BATCH = 8  # images per batch when memory allows (no budget: always)


def planned_sampling(pipe, settings: GenerationSettings, accelerator) -> tuple[GenerationSettings, int | None]:
    """`settings` with the batch size the memory plan fits into the budget (--max-memory, else a
    GPU's free memory): the largest up to 8 when none is given; a given one is kept but refused when
    it does not fit. Every process takes the smallest any of them can hold: they share the images
    out in whole batches of one size. Also returns the predicted peak (None: not planned)."""
    limit = budget(settings.max_memory, accelerator.device)
    requested = settings.batch_size
    if limit is None and requested:
        return settings, None
    latent, family = latent_size(pipe, settings.resolution), family_of(pipe)
    denoiser = family.denoiser_of(pipe)
    resident = weight_bytes(denoiser, pipe.vae, *family.loaded_text_encoders(pipe))
    meta_unet, meta_vae = meta_copy(denoiser), meta_copy(pipe.vae)

    # Under autocast (image sets sample a float32 pipeline in the run's mixed precision) activations
    # are 16-bit; its per-op weight casts are freed at once without gradients.
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, denoiser.dtype)

    def peak(batch: int) -> int:
        return resident + sampling_peak(family, meta_unet, meta_vae, batch, latent, dtype,
                                        settings.guidance_scale > 1, vae_dtype(pipe.vae))

    if limit is None:
        batch = DEFAULT_SAMPLING_BATCH
    else:
        fitting = largest_fitting(peak, requested or DEFAULT_SAMPLING_BATCH, limit)
        if requested and fitting < requested:
            raise UserError(f"--batch-size {requested} needs about {gib(peak(requested))} on the device to sample, the "
                            f"budget is {gib(limit)}: " + (f"use --batch-size {fitting} ({gib(peak(fitting))}) or leave it "
                                                           "out" if fitting else "even 1 does not fit: " + _options()))
        if not fitting:
            raise UserError(f"sampling needs about {gib(peak(1))} on the device with one image at a time, the budget is "
                            f"{gib(limit)}: " + _options())
        batch = requested or fitting
    if accelerator.num_processes > 1:
        batch = int(accelerator.gather(torch.tensor([batch], device=accelerator.device)).min())
    say(plan_line("sampling", f"{batch} image(s) per batch", peak(batch), limit))
    return dataclasses.replace(settings, batch_size=batch), peak(batch)


def sampling_advice(batch: int) -> str:
    return f"pass a smaller --batch-size (this run sampled {batch} at a time)"


def _options() -> str:
    return "a lower --resolution, --mixed-precision bf16 (if it is no), raise --max-memory, or a device with more memory"


@torch.no_grad()
def generate(
    pipe, prompts: list[str], seeds: list[int], settings: GenerationSettings, predicted: int | None = None
) -> Iterator[tuple[int, torch.Tensor, Image.Image]]:
    """Yield (position, latent, image) for each prompt, in batches of settings.batch_size (None: 8,
    unplanned; commands pass planned_sampling's) (`predicted`: the plan's peak, for the message
    should the device run out).

    The latent is the denoised, scaled latent that decodes to the image; training reuses it, so
    the VAE never has to encode generated images again.
    """
    family = family_of(pipe)
    # DDIM as in the paper (flow-matching families: their own sampler); generators live on the CPU so
    # noise is identical on any device.
    family.sample_with(pipe)
    size = image_size(pipe, settings.resolution)
    micro = family.micro_conditioning(size)  # recorded with image sets: training matches it
    size_of_batch = settings.batch_size or DEFAULT_SAMPLING_BATCH
    for start in range(0, len(prompts), size_of_batch):
        with out_of_memory("sampling", predicted, sampling_advice(size_of_batch)):
            batch = prompts[start : start + size_of_batch]
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start : start + len(batch)]]
            latents = pipe(
                batch,
                height=size,
                width=size,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                generator=generators,
                output_type="latent",
                **micro,
                **family.pipeline_kwargs(),
            ).images
            latents = family.latents_of(pipe, latents, size)
            images = pipe.image_processor.postprocess(decode(pipe.vae, latents), output_type="pil")
        for offset, (latent, image) in enumerate(zip(latents, images)):
            yield start + offset, latent.float().cpu(), image


def vae_dtype(vae) -> torch.dtype:
    """The VAE's working dtype: float32 where its config says fp16 overflows (SDXL's VAE)."""
    return torch.float32 if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else vae.dtype


def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents of pixels in [-1, 1]: the distribution's mean, not a sample, so a cached
    latent is deterministic; the inverse of decode."""
    dtype = vae_dtype(vae)
    latents = _in_dtype(vae, dtype).encode(pixels.to(vae.device, dtype)).latent_dist.mean.float()
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        return (latents - torch.tensor(mean).view(shape).to(latents)) * vae.config.scaling_factor \
            / torch.tensor(std).view(shape).to(latents)
    return (latents - _shift(vae)) * vae.config.scaling_factor


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] from scaled latents, as the pipelines decode them."""
    dtype = vae_dtype(vae)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        latents = latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor \
            + torch.tensor(mean).view(shape).to(latents)
    else:
        latents = latents / vae.config.scaling_factor + _shift(vae)
    # In the VAE's own dtype even inside an autocast region (SDXL's VAE overflows in fp16).
    with torch.autocast(latents.device.type, enabled=False):
        return _in_dtype(vae, dtype).decode(latents.to(dtype)).sample


def _shift(vae) -> float:
    """SD3's and Flux's VAEs shift the latents as well as scale them (none: 0)."""
    return getattr(vae.config, "shift_factor", None) or 0.0


def _in_dtype(vae, dtype: torch.dtype):
    return vae if vae.dtype == dtype else vae.to(dtype)
