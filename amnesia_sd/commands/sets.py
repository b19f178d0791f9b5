"""`amnesia-sd replay` and `amnesia-sd surrogate`: make an image set (images, latents, prompts,
manifest) with the base model."""

from __future__ import annotations

from amnesia_sd.core.cost import announce, generation_passes
from amnesia_sd.core.paths import guard
from amnesia_sd.data.imageset import ImageSet, generate_image_set, set_output
from amnesia_sd.data.prompts import repeat_to, with_unconditional
from amnesia_sd.model.families import check_unconditional_replay, family_of
from amnesia_sd.model.loading import DTYPES, image_size, load_on_device, make_accelerator, model_path


def make_image_set(config) -> ImageSet:
    """`amnesia-sd replay` and `amnesia-sd surrogate`: generate a set with the base model."""
    guard([set_output(config.output_dir)], {"--model": model_path(config.model), "--prompts": config.prompts_file},
          config.overwrite)
    accelerator = make_accelerator()
    ref, pipe = load_on_device(config.model, accelerator, DTYPES[config.mixed_precision])
    check_unconditional_replay(family_of(pipe), pipe, config.unconditional_replay)
    prompts = with_unconditional(repeat_to(config.prompts, config.num_images), config.unconditional_replay)
    image_size(pipe, config.resolution)  # a size the model cannot make fails before anything is said or made
    announce(f"the {config.kind} set", [(f"{len(prompts)} images x {config.num_inference_steps} steps",
                                         generation_passes(len(prompts), config.num_inference_steps,
                                                           config.guidance_scale))])
    return generate_image_set(pipe, ref, prompts, config, config.output_dir, config.kind, accelerator,
                              config.overwrite)
