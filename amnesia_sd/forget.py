"""Selective Amnesia training of the UNet, top to bottom (METHOD.md):

    L(theta) = E_{x~q(x|c_f)} L_simple(x, c_f)  +  gamma * E_{(x,c)~replay} L_simple(x, c)
             + lambda * sum_i F_i (theta_i - theta*_i)^2

Every batch (indices, timesteps, noise) is drawn from a generator seeded by the run's seed and the
micro-step, for the global batch of all processes at once; each process takes its slice. So a
resumed run continues exactly, and N processes x batch b see the same data as 1 process x N*b.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoints import (broken_run, check_paths, check_resume, find_checkpoint, open_run, save_checkpoint,
                          training_settings, weights_finite)
from .config import ForgetConfig
from .cost import first_batch
from .diffusion import encode_prompts, per_sample_loss
from .errors import Interrupted, UserError
from .ewc import EWCPenalty
from .fisher import load_fisher
from .generate import image_seed
from .imageset import ImageSet, check_fits, load_image_set
from .models import DTYPES, ModelRef, load_on_device, make_accelerator, origin, origin_mismatches
from .paths import partial_of, publish
from .prompts import concept_prompts
from .result import recorded_path, write_result
from .sources import Plan

LOG_EVERY = 10  # steps between readings of the penalty's value (its gradient is added every step)


def trainable_names(unet, method: str) -> list[str]:
    """Which UNet parameters train: everything, all but cross-attention/time embedding/output, or
    cross-attention only (the paper's 'full' for celebrities and 'noxattn' for nudity)."""
    names = [name for name, _ in unet.named_parameters()]
    if method == "full":
        return names
    if method == "xattn":
        return [n for n in names if ".attn2." in n]
    frozen_prefixes = ("time_embedding.", "conv_norm_out.", "conv_out.")
    return [n for n in names if ".attn2." not in n and not n.startswith(frozen_prefixes)]


def embed_all(tokenizer, text_encoder, prompts: list[str], progress: bool, batch: int = 64) -> torch.Tensor:
    """Text embeddings of `prompts`, computed once in batches, kept on the training device."""
    chunks = [encode_prompts(tokenizer, text_encoder, prompts[i : i + batch])
              for i in tqdm(range(0, len(prompts), batch), desc="text embeddings", unit="batch", disable=not progress)]
    return torch.cat(chunks)


def enable_xformers(unet) -> None:
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise UserError("--enable-xformers needs xformers: pip install 'amnesia-sd[xformers]'") from None
    unet.enable_xformers_memory_efficient_attention()


def make_optimizer(params: list[torch.Tensor], config: ForgetConfig, lr: float):
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in a quarter of the memory)."""
    if not config.use_8bit_adam:
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.adam_weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("--use-8bit-adam needs bitsandbytes: pip install 'amnesia-sd[bitsandbytes]'") from None
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=config.adam_weight_decay)


def preflight(unet, params, config: ForgetConfig, replay_embeddings, ema: bool) -> str:
    """What the run will hold on the accelerator, before the long work starts."""
    gib = 2**30
    n_all, n_train = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in params)
    store = 2 if config.fim_dtype != "fp32" else 4
    parts = {
        "weights": 4 * n_all,
        "grads": 4 * n_train,
        "optimizer": (2 if config.use_8bit_adam else 8) * n_train,
        "fisher+anchor": 2 * store * n_train,
        "ema": 4 * n_all if ema else 0,
        "text cache": replay_embeddings.numel() * replay_embeddings.element_size(),
    }
    detail = ", ".join(f"{k} {v / gib:.2f}" for k, v in parts.items() if v)
    return (f"preflight: {n_train / 1e6:.1f}M of {n_all / 1e6:.1f}M UNet parameters train; about "
            f"{sum(parts.values()) / gib:.2f} GiB before activations ({detail} GiB); "
            f"{config.max_train_steps} steps x {config.train_batch_size}+{config.train_batch_size} images "
            f"x {config.gradient_accumulation_steps} accumulation; the progress bar's ETA follows the first steps")


def draw_batch(seed: int, micro_step: int, world: int, rank: int, batch: int, sizes: dict, shapes: dict, num_t: int):
    """This process's slice of the global batch of one micro-step."""
    g = torch.Generator("cpu").manual_seed(image_seed(seed, micro_step, "train"))
    total, part = batch * world, slice(rank * batch, (rank + 1) * batch)
    drawn = {}
    for term in ("surrogate", "replay"):
        drawn[f"{term}_index"] = torch.randint(sizes[term], (total,), generator=g)[part]
        drawn[f"{term}_t"] = torch.randint(num_t, (total,), generator=g)[part]
        drawn[f"{term}_noise"] = torch.randn((total, *shapes[term]), generator=g)[part]
    drawn["concept_index"] = torch.randint(sizes["concept"], (total,), generator=g)[part]
    return drawn


def check_origins(config: ForgetConfig, ref: ModelRef, pipe, fisher_meta: dict, sets: dict[str, ImageSet]) -> list[str]:
    """The Fisher and the image sets must come from the model being trained, unless the user says
    otherwise (--allow-origin-mismatch), which is recorded."""
    expected = origin(ref, pipe)
    found = origin_mismatches(f"--fim {config.fim}", fisher_meta, expected)
    for name, image_set in sets.items():
        found += origin_mismatches(f"{name} set {image_set.path}", image_set.manifest, expected)
    if found and not config.allow_origin_mismatch:
        raise UserError("made from another model: " + "; ".join(found) + ". Make them with this model, or pass "
                        "--allow-origin-mismatch to use them anyway (recorded in amnesia.json)")
    return found


def forget(config: ForgetConfig) -> Path:
    """Train the UNet to map the concept to the surrogate while remembering everything else;
    write a diffusers pipeline folder to config.output_dir."""
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    started = time.time()
    out = Path(config.output_dir)
    work = partial_of(out)
    # Cheap checks first, so bad input fails in a second and leaves nothing behind.
    if config.fim and not Path(config.fim).is_file():  # a given Fisher that is not there is a mistake
        raise UserError(
            f"no Fisher file at {config.fim}: compute it once per base model with "
            f"`amnesia-sd fim --model {config.model} --output {config.fim}`"
        )
    finished = check_paths(config, out)  # every process checks, so all fail alike
    # Given sets are read once, here, so a bad one fails before the model loads.
    given = {name: load_image_set(path) for name, path in (("replay", config.replay_dir),
                                                           ("surrogate", config.surrogate_dir)) if path}
    accelerator = make_accelerator(
        config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(work), logging_dir=str(work / "logs")),
    )
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UserError(
            f"forget runs under DDP (multi-GPU or multi-node), not {accelerator.distributed_type.value}: the EWC "
            "gradient is added to each parameter's .grad, which DeepSpeed and FSDP shard away; "
            "use an accelerate config with distributed_type: MULTI_GPU"
        )
    settings = training_settings(config, accelerator.num_processes)
    checkpoint = find_checkpoint(work, config.resume_from_checkpoint)
    if checkpoint is not None:
        check_resume(checkpoint, settings)
    set_seed(config.seed)
    weight_dtype = DTYPES[config.mixed_precision]

    # Base model; the frozen parts run in the weight dtype, the UNet trains in float32.
    ref, pipe = load_on_device(config.model, accelerator)
    unet, tokenizer, text_encoder = pipe.unet, pipe.tokenizer, pipe.text_encoder
    fisher, fisher_meta = load_fisher(config.fim, unet) if config.fim else (None, {})
    for image_set in given.values():  # given sets are checked before hours of generation
        check_fits(image_set, unet)
    check_origins(config, ref, pipe, fisher_meta, given)
    plan = Plan(config, ref, pipe, work, accelerator.num_processes, given)
    accelerator.wait_for_everyone()  # every process has checked the paths before the work folder changes
    if accelerator.is_main_process:  # only now, when everything given has been checked
        open_run(out, config, finished)
    accelerator.wait_for_everyone()
    replay, surrogate = plan.sets(accelerator)
    fim_path = Path(config.fim) if config.fim else plan.fisher(replay, accelerator)
    if fisher is None:
        fisher, fisher_meta = load_fisher(fim_path, unet)
    mismatches = check_origins(config, ref, pipe, fisher_meta, {"replay": replay, "surrogate": surrogate})
    concepts = concept_prompts(config.concept_list(), config.templates)
    # Text embeddings of every prompt are computed once; then neither the VAE nor the text
    # encoder runs during training, and both leave the accelerator.
    text_encoder.requires_grad_(False)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    concept_embeddings = encode_prompts(tokenizer, text_encoder, concepts)
    replay_texts = sorted(set(replay.prompts))
    replay_embeddings = embed_all(tokenizer, text_encoder, replay_texts, accelerator.is_main_process)
    position = {text: i for i, text in enumerate(replay_texts)}
    replay_text_index = torch.tensor([position[p] for p in replay.prompts])
    pipe.vae.to("cpu")
    text_encoder.to("cpu")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # What trains, its anchor theta* and its Fisher, all kept on the training device.
    train_names = set(trainable_names(unet, config.train_method))
    unet.requires_grad_(False)
    named = [(n, p) for n, p in unet.named_parameters() if n in train_names]
    for _, p in named:
        p.requires_grad_(True)
    params = [p for _, p in named]
    # fp16 anchors are lossless for fp16 checkpoints, but Fisher values overflow fp16: bf16 then.
    anchor_dtype = DTYPES[config.fim_dtype]
    fisher_dtype = torch.bfloat16 if config.fim_dtype == "fp16" else anchor_dtype
    penalty = EWCPenalty(
        params,
        [fisher[n].to(accelerator.device, fisher_dtype) for n, _ in named],
        [p.detach().to(anchor_dtype, copy=True) for p in params],
        config.lambda_ewc,
    )
    with torch.no_grad():  # start exactly at the stored anchor (a no-op in fp32): the penalty starts at zero
        for p, anchor in zip(params, penalty.anchors):
            p.copy_(anchor)
    del fisher
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.enable_xformers:
        enable_xformers(unet)
    # Never scaled silently by the number of processes (the reference code's pitfall); --scale-lr
    # opts in to the linear scaling rule for the larger global batch.
    learning_rate = config.learning_rate * (accelerator.num_processes if config.scale_lr else 1)
    optimizer = make_optimizer(params, config, learning_rate)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay) if config.ema_decay else None
    if accelerator.is_main_process:
        print(preflight(unet, params, config, replay_embeddings, ema is not None), flush=True)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    global_step = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        global_step = int(checkpoint.name.split("-")[-1])
        accelerator.print(f"resumed from {checkpoint} at step {global_step}")
    elif config.resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {work / 'checkpoints'}: starting from step 0")

    sizes = {"surrogate": len(surrogate.latents), "replay": len(replay.latents), "concept": len(concepts)}
    shapes = {"surrogate": tuple(surrogate.latents.shape[1:]), "replay": tuple(replay.latents.shape[1:])}
    device, b = accelerator.device, config.train_batch_size
    last = {}
    bar = tqdm(total=config.max_train_steps, initial=global_step, desc="forgetting", unit="step",
               disable=not accelerator.is_main_process)
    unet.train()
    micro_step = global_step * config.gradient_accumulation_steps
    try:
        while global_step < config.max_train_steps:
            with accelerator.accumulate(unet):
                d = draw_batch(config.seed, micro_step, accelerator.num_processes, accelerator.process_index, b,
                               sizes, shapes, noise_scheduler.config.num_train_timesteps)
                micro_step += 1
                x_s = surrogate.latents[d["surrogate_index"]].to(device)
                e_s = concept_embeddings[d["concept_index"].to(device)]
                terms = [(x_s, d["surrogate_noise"], d["surrogate_t"], e_s)]
                if config.gamma > 0:
                    x_r = replay.latents[d["replay_index"]].to(device)
                    e_r = replay_embeddings[replay_text_index[d["replay_index"]].to(device)]
                    terms.append((x_r, d["replay_noise"], d["replay_t"], e_r))
                if len(terms) == 2 and shapes["surrogate"] == shapes["replay"]:
                    # One forward over surrogate + replay: same result as two, faster.
                    x, noise, t, e = (torch.cat(parts) for parts in zip(*terms))
                    losses = per_sample_loss(unet, noise_scheduler, x, noise.to(device), t.to(device), e)
                    loss_s, loss_r = losses[:b].mean(), losses[b:].mean()
                else:
                    term_losses = [per_sample_loss(unet, noise_scheduler, x, n.to(device), t.to(device), e).mean()
                                   for x, n, t, e in terms]
                    loss_s = term_losses[0]
                    loss_r = term_losses[1] if len(term_losses) == 2 else torch.zeros((), device=device)
                data_loss = loss_s + config.gamma * loss_r
                # The global batch's losses, averaged over processes: what is logged, and a NaN check
                # that every process agrees on, so all of them stop together.
                reported = accelerator.reduce(torch.stack([loss_s.detach(), loss_r.detach()]), reduction="mean")
                if not torch.isfinite(reported).all():
                    raise broken_run(f"the loss became {(reported[0] + config.gamma * reported[1]).item()}",
                                     global_step + 1, work)
                accelerator.backward(data_loss)
                if accelerator.sync_gradients:
                    accelerator.unscale_gradients()  # the penalty's gradient is added unscaled
                    log_step = (global_step + 1) % LOG_EVERY == 0 or global_step + 1 == config.max_train_steps or not last
                    value = penalty.add_grad_(with_value=log_step)  # the value's .item() syncs: not every step
                    if value is not None:
                        ewc = value.item()
                        if not math.isfinite(ewc):  # the whole objective is checked, EWC included
                            raise broken_run(f"the EWC penalty became {ewc}", global_step + 1, work)
                    if config.max_grad_norm:
                        # Already unscaled (and synced across processes): accelerator.clip_grad_norm_
                        # would unscale a second time under fp16.
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                global_step += 1
                if ema is not None:
                    ema.step(accelerator.unwrap_model(unet).parameters())
                last = {"surrogate": reported[0].item(), "replay": reported[1].item(), "ewc": ewc}
                last["total"] = last["surrogate"] + config.gamma * last["replay"] + last["ewc"]
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()})
                first_batch(bar, 2 * b * accelerator.num_processes * config.gradient_accumulation_steps, "training")
                if global_step % config.checkpointing_steps == 0 and global_step < config.max_train_steps:
                    # Only finite weights are ever saved, so the last checkpoint is always a good one.
                    if not weights_finite(params + (ema.shadow_params if ema is not None else [])):
                        raise broken_run("the weights became non-finite (NaN or inf)", global_step, work)
                    if accelerator.is_main_process:
                        save_checkpoint(accelerator, work, global_step, config.checkpoints_total_limit, settings)
    except KeyboardInterrupt:
        kept = find_checkpoint(work, "latest")
        raise Interrupted(
            f"stopped at step {global_step}; rerun with --resume-from-checkpoint latest to continue from {kept}"
            if kept else f"stopped at step {global_step}, before the first checkpoint: a rerun starts training "
            "again (sets already made are reused)"
        ) from None
    bar.close()

    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.copy_to(trained.parameters())  # the EMA weights are the result
    if not weights_finite(list(trained.parameters())):
        raise broken_run("the trained weights are non-finite (NaN or inf)", global_step, work)
    if accelerator.is_main_process:
        summary = {
            "steps": global_step,
            "final_losses": last,
            "trainable_parameters": sum(p.numel() for p in params),
            "num_processes": accelerator.num_processes,
            "global_batch_size": config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps,
            "learning_rate": learning_rate,
            "mixed_precision": accelerator.mixed_precision,
            "replay_set": recorded_path(replay.path, work),
            "surrogate_set": recorded_path(surrogate.path, work),
            "concept_prompts": concepts,
            "fim": {"path": str(fim_path.resolve()), "cached": not config.fim, "metadata": fisher_meta},
            "origin_mismatches": mismatches,
            "seconds": round(time.time() - started, 1),
        }
        write_result(work, ref, trained, config, summary, surrogate)
        publish(work, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


