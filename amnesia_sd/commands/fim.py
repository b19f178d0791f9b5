"""`amnesia-sd fim`: the diagonal Fisher of a model's denoiser over its replay set, written once per
base model and reused for every concept (with --lora-targets: of the layers LoRA adapts, for LoRA
runs)."""

from __future__ import annotations

from pathlib import Path

from amnesia_sd.core.cost import announce
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.paths import Output, check_output, check_overlap
from amnesia_sd.data.imageset import MANIFEST, generate_image_set, is_cached, is_finished, load_image_set, set_record
from amnesia_sd.data.prompts import repeat_to, replay_prompts
from amnesia_sd.method.fisher import FORMAT, fisher_cost, replay_cost, timestep_set, write_fisher_of_set
from amnesia_sd.model.families import family_of
from amnesia_sd.model.loading import check_sharding, load_on_device, make_accelerator, model_path
from amnesia_sd.model.trainable import base_dtype, lora_weights


def compute_fim(config) -> Path:
    """`amnesia-sd fim`: the Fisher of the base UNet over a replay set, written as safetensors."""
    output = Path(config.output)
    replay_dir = None if config.replay_dir else output.with_name(output.name.removesuffix(".safetensors") + "-replay")
    outputs = [Output("--output", output, None, "Fisher", (FORMAT,))]
    if replay_dir:  # a cache of ours beside the Fisher, reused when its settings match
        outputs.append(Output("--output's replay set", replay_dir, MANIFEST, "image set"))
    check_overlap(outputs, {"--model": model_path(config.model), "--replay-dir": config.replay_dir,
                            "--prompts": config.prompts_file})
    check_output(outputs[0], config.overwrite)
    if replay_dir and not is_finished(replay_dir):
        check_output(outputs[1], False)
    if config.replay_dir:
        load_image_set(config.replay_dir)  # a bad set fails before the model loads
    accelerator = make_accelerator(config.mixed_precision)
    check_sharding(accelerator, "fim")
    ref, pipe = load_on_device(config.model, accelerator, base_dtype(bool(config.lora_targets), config.mixed_precision))
    # --lora-targets: only the layers they adapt (anywhere in the denoiser: --train-method full)
    lora = (config.lora_targets, lora_weights(family_of(pipe).denoiser_of(pipe), "full", config.lora_target_list())) \
        if config.lora_targets else None
    steps = len(timestep_set(pipe.scheduler.config.num_train_timesteps, config.num_timesteps))
    if config.replay_dir:
        replay = load_image_set(config.replay_dir, pipe)
        announce("fim", [fisher_cost(config.num_images or len(replay.latents), steps)])
    else:
        prompts = repeat_to(replay_prompts(config.prompts_file), config.num_images)
        cached = is_cached(replay_dir, set_record(pipe, ref, prompts, config, "replay"))
        announce("fim", [replay_cost(len(prompts), config, cached), fisher_cost(len(prompts), steps)])
        replay = generate_image_set(pipe, ref, prompts, config, replay_dir, "replay", accelerator, reuse=True)
    if config.num_images and config.num_images > len(replay.latents):
        raise UserError(f"--num-images {config.num_images} is more than the {len(replay.latents)} images of {replay.path}")
    write_fisher_of_set(pipe, ref, replay, config.num_images or len(replay.latents), config.num_timesteps, config.seed,
                        config.timestep_batch_size, config.gradient_checkpointing, accelerator, output,
                        config.fim_dtype, config.max_memory, lora)
    return output
