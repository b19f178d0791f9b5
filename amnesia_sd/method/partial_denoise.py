"""The partial-denoising attack (HUB's, ICCV 2025): images of the concept are noised to strength s
and denoised by the attacked model under the concept's prompt, with the family's diffusers
image-to-image pipeline (StableDiffusionImg2ImgPipeline; SDXL: StableDiffusionXLImg2ImgPipeline).
At strength s the last s x num_inference_steps of the DDIM steps run; what the model adds there
decides whether the concept survives. A model that only hides the concept's name from its start
of sampling lets it through; one that no longer draws it replaces it.

Below about 0.3 the output is mostly the input image, whatever the model: that measures the image,
not the model, so the default strengths start there.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from PIL import Image

from amnesia_sd.core.config import GenerationSettings
from amnesia_sd.data.generate import DEFAULT_SAMPLING_BATCH, sampling_advice
from amnesia_sd.model.families import family_of
from amnesia_sd.model.memory import out_of_memory

STRENGTHS = (0.3, 0.5, 0.7)


@torch.no_grad()
def partial_denoise(pipe, images: list[Image.Image], prompts: list[str], seeds: list[int], strength: float,
                    settings: GenerationSettings, predicted: int | None = None) -> Iterator[tuple[int, Image.Image]]:
    """Yield (position, image): image i noised to `strength` and denoised by `pipe`'s model under
    prompt i, with the generator seeded by seed i (the VAE's sample and the noise), in batches of
    settings.batch_size, with the sampler image sets use (DDIM; SD3 and Flux: their own), at the
    images' own size (the concept set's, the model's): what the family's img2img pipeline
    (StableDiffusionImg2ImgPipeline, ...) gives a user with the same arguments and batches."""
    family = family_of(pipe)
    img2img = family.img2img(pipe)
    family.sample_with(img2img)  # its scheduler is pipe's: the same config
    img2img.set_progress_bar_config(disable=True)
    batch = settings.batch_size or DEFAULT_SAMPLING_BATCH
    for start in range(0, len(prompts), batch):
        with out_of_memory("partial denoising", predicted, sampling_advice(batch)):
            end = min(start + batch, len(prompts))
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start:end]]
            out = img2img(prompts[start:end], image=images[start:end],
                          strength=strength, num_inference_steps=settings.num_inference_steps,
                          guidance_scale=settings.guidance_scale, generator=generators,
                          **family.pipeline_kwargs()).images
        for offset, image in enumerate(out):
            yield start + offset, image


def how_to_replay(family, model: str, lora_base: str | None = None) -> str:
    """The plain-diffusers lines that redo one of the attack's images (a LoRA result: its base, then
    the adapter)."""
    load = (f"pipe = diffusers.{family.img2img_pipeline}.from_pretrained(\"{lora_base}\"); "
            f"pipe.load_lora_weights(\"{model}\")" if lora_base else
            f"pipe = diffusers.{family.img2img_pipeline}.from_pretrained(\"{model}\")")
    sampler = f"; pipe.scheduler = diffusers.{family.sampler}.from_config(pipe.scheduler.config)" if family.sampler else ""
    window = f", max_sequence_length={family.max_sequence_length}" if family.max_sequence_length else ""
    return (f"{load}{sampler}; pipe(PROMPT, image=PIL.Image.open(INPUT), strength=S, num_inference_steps=N, "
            f"guidance_scale=G{window}, generator=torch.Generator().manual_seed(SEED))")
