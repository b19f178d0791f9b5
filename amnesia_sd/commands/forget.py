"""Selective Amnesia training of the denoiser (a UNet, or SD3's and Flux's transformers), top to
bottom (METHOD.md):

    L(theta) = E_{x~q(x|c_f)} L_simple(x, c_f)  +  gamma * E_{(x,c)~replay} L_simple(x, c)
             + lambda * sum_i F_i (theta_i - theta*_i)^2

forget() is the method as a page: check every input, make or reuse the image sets, the Fisher,
embed every prompt once, train, write the result. The steps follow it in that order, the training
step is Trainer.step, and the helpers come last.

Every batch (indices, timesteps, noise) is drawn from a generator seeded by the run's seed and the
micro-step, for the global batch of all processes at once; each process takes its slice. So a
resumed run continues exactly, and N processes x batch b see the same data as 1 process x N*b.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from amnesia_sd.core.cache import cache_dir
from amnesia_sd.core.config import DEFAULT_FIM_TIMESTEPS, SURROGATE_SOURCES, ForgetConfig, split_concepts
from amnesia_sd.core.cost import first_batch, say
from amnesia_sd.core.errors import Interrupted, UserError
from amnesia_sd.core.paths import partial_of, publish
from amnesia_sd.data.generate import image_seed, planned_sampling
from amnesia_sd.data.imageset import ImageSet, check_fits, load_image_set
from amnesia_sd.data.prompts import concept_prompts
from amnesia_sd.method.adversary import Adversary, check_adversarial
from amnesia_sd.method.checkpoints import (broken_run, check_digest, check_paths, check_resume, check_sharded_index,
                                           checkpoint_step, earlier_run, find_checkpoint, load_state, open_run,
                                           save_checkpoint, training_settings, weights_finite)
from amnesia_sd.method.fisher import fisher_plan, load_fisher, read_fisher, timestep_set
from amnesia_sd.method.record import FINISHED, recorded_path, write_result
from amnesia_sd.method.sources import Plan, check_origins, check_sequence, earlier_sets, lora_layers, preserved
from amnesia_sd.model.diffusion import per_sample_loss
from amnesia_sd.model.families import Conditioning, check_unconditional_replay, family_of, join, take, to_device
from amnesia_sd.model.loading import (DTYPES, ModelRef, check_sharding, latent_size, load_on_device,
                                      make_accelerator, sharded)
from amnesia_sd.model.memory import budget, out_of_memory_error, plan_line
from amnesia_sd.model.shards import local
from amnesia_sd.model.trainable import base_dtype, check_rank, lora_modules, make_trainable
from amnesia_sd.model.training_memory import check_training_memory, preflight

ADVERSARY_EMBEDDINGS = "adversary_embeds.safetensors"  # forget --adversarial: its last token
LOG_EVERY = 10  # steps between readings of the penalty's value (its gradient is added every step)
# fp16's loss scaler halves its scale on every skipped step: this many in a row is no longer the
# scale's fault but gradients fp16 cannot hold.
MAX_SKIPPED_IN_A_ROW = 100


def forget(config: ForgetConfig) -> Path:
    """Train the UNet to map the concept to the surrogate while remembering everything else;
    write a diffusers pipeline folder to config.output_dir."""
    run = check(config)  # every input, the model and the memory plan, before any work
    sets = image_sets(run)  # the replay, surrogate and preserve sets: reused, or made now
    fim = fisher(run, sets)  # F over the replay set: given, cached, or computed now
    # Its own float32 copies of the text encoders, made before conditioning() casts them.
    adversary = Adversary(run.family, run.pipe, run.config, sets.concept, run.accelerator.device) \
        if run.config.adversarial else None
    data = conditioning(run, sets)  # every prompt embedded once; the encoders and the VAE leave the device
    trainer = Trainer(run, fim, data, adversary)  # what trains, its penalty, optimizer, schedule, EMA
    trainer.train()  # from the last checkpoint, if any, to --max-train-steps
    return write(run, sets, fim, trainer)  # checked, recorded in amnesia.json, published


@dataclasses.dataclass
class Run:
    """What check() established: the settings as they run (an earlier run's sets filled in), the
    output and its work folder, the earlier forget run this one continues, the accelerator, the
    checkpoint to resume from, the loaded model, and where the sets and the Fisher will come from."""
    config: ForgetConfig
    out: Path
    work: Path
    started: float
    earlier: dict  # --model's amnesia.json, when it is a forget result
    inherited: list[dict]  # that run's pairs, with their finished surrogate sets
    preserve: dict | None  # the neighbours held (sources.preserved): this run's, or that run's set
    ancestors: list[str]  # the models --model was made from
    accelerator: object
    settings: dict  # what shapes training: a checkpoint made with others is not resumed
    checkpoint: Path | None
    ref: ModelRef
    pipe: object
    family: object
    fisher_meta: dict  # a given Fisher's metadata
    peak: int  # the training step's predicted peak bytes on the device
    plan: Plan


def check(config: ForgetConfig) -> Run:
    """Everything given, checked before any work and cheapest first, so that bad input fails in a
    second and leaves nothing behind; then the model and the memory plan; the work folder last."""
    started, out = time.time(), Path(config.output_dir)
    work = partial_of(out)
    if config.fim and not Path(config.fim).is_file():  # a given Fisher that is not there is a mistake
        raise UserError(f"no Fisher file at {config.fim}: compute it once per base model with "
                        f"`amnesia-sd fim --model {config.model} --output {config.fim}`")
    # Sequential forgetting: the concepts --model already forgot stay in the objective.
    earlier, inherited = earlier_run(config.model) or ({}, [])
    preserve = preserved(config, earlier)
    config = earlier_sets(config, earlier)
    # every process checks, so all fail alike
    finished = check_paths(config, out, inherited, preserve.get("set") if preserve else None)
    # Given sets are read once, here, so a bad one fails before the model loads.
    given = {name: load_image_set(path) for name, path in [("replay", config.replay_dir)] + [
        (f"surrogate {i + 1}", pair["surrogate_dir"]) for i, pair in enumerate(config.pairs())] + [
        ("preserve", preserve and preserve.get("set"))] if path}
    check_sequence(config, earlier)
    inherited = [{**pair, "set": load_image_set(pair["set"])} for pair in inherited]
    ancestors = [r["base_model"] for r in earlier.get("history", [])] + ([earlier["base_model"]] if earlier else [])
    accelerator = make_accelerator(
        config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(work), logging_dir=str(work / "logs")))
    check_sharding(accelerator, "forget")
    if sharded(accelerator):
        check_fsdp(config)
    settings = training_settings(config, accelerator.num_processes, sharded(accelerator))
    checkpoint = find_checkpoint(work, config.resume_from_checkpoint)
    if checkpoint is not None:
        check_digest(checkpoint)  # before anything in it is read
        check_sharded_index(checkpoint)
        check_resume(checkpoint, settings)
    set_seed(config.seed)
    # Full weights train in float32; a LoRA run under mixed precision keeps its frozen base in 16 bits
    # from the start (as diffusers' LoRA scripts load it): Flux's 12B in float32 would not fit first.
    ref, pipe = load_on_device(config.model, accelerator, base_dtype(bool(config.lora_rank), config.mixed_precision))
    family = family_of(pipe)
    config, fisher_meta = check_model(config, ref, pipe, family, given, inherited, ancestors)
    peak = plan_memory(config, pipe, family, accelerator)
    plan = Plan(config, ref, pipe, work, accelerator.num_processes, given, inherited, preserve)
    accelerator.wait_for_everyone()  # every process has checked the paths before the work folder changes
    if accelerator.is_main_process:  # only now, when everything given has been checked
        open_run(out, config, finished)
    accelerator.wait_for_everyone()
    return Run(config, out, work, started, earlier, inherited, preserve, ancestors, accelerator, settings, checkpoint,
               ref, pipe, family, fisher_meta, peak, plan)


def check_fsdp(config: ForgetConfig) -> None:
    """Under FSDP every process holds rows of the weights: what needs them whole on one process is
    refused before any work, with what to do instead."""
    refused = [
        (not config.fim, "without --fim", "computing the Fisher inside forget would shard the model before what "
         "trains is chosen; compute it first under the same accelerate config with `amnesia-sd fim` and pass --fim"),
        (config.adversarial, "with --adversarial", "its inner attack trains a token through the whole model between "
         "steps; run it under DDP (distributed_type: MULTI_GPU)"),
        (config.ema_decay, "with --ema-decay", "the EMA is kept of whole weights; leave it out or run under DDP")]
    for given, flag, why in refused:
        if given:
            raise UserError(f"forget under FSDP {flag}: {why}")


def check_model(config: ForgetConfig, ref: ModelRef, pipe, family, given: dict[str, ImageSet],
                inherited: list[dict], ancestors: list[str]) -> tuple[ForgetConfig, dict]:
    """What the loaded model must agree with, before hours of generation: a given Fisher (checked
    whole now; the entries training needs are loaded when it starts) and the given sets fit it and
    come from it; the adapters' layers exist and take the rank; the adversary's initializer is one
    token. Returns the settings (the initializer filled in) and the given Fisher's metadata."""
    lora = lora_layers(pipe, config)
    fisher_meta = load_fisher(config.fim, pipe, names=(), require=lora[1] if lora else ())[1] if config.fim else {}
    if fisher_meta.get("covers") == "lora" and not config.lora_rank:
        raise UserError(f"Fisher file {config.fim} holds only a LoRA run's adapted layers (--lora-targets "
                        f"{fisher_meta.get('lora_targets')}): full-weight forgetting needs every parameter's entry; "
                        "compute it with `amnesia-sd fim` without --lora-targets, or train with --lora-rank")
    for image_set in [*given.values(), *(pair["set"] for pair in inherited)]:
        check_fits(image_set, pipe)
    check_origins(config, ref, pipe, fisher_meta, given, ancestors)
    if "preserve" in given:  # an earlier run's preserve set joins this run's replay pool: one latent size
        replay = tuple(given["replay"].latents.shape[-2:]) if "replay" in given else latent_size(pipe, config.resolution)
        if tuple(given["preserve"].latents.shape[-2:]) != replay:
            raise UserError(f"the earlier run's preserve set {given['preserve'].path} holds latents of "
                            f"{tuple(given['preserve'].latents.shape[-2:])}, the replay set of {replay}: they are "
                            "replayed as one set, so give --preserve to make it again at the replay set's size")
    check_unconditional_replay(family, pipe, config.unconditional_replay)
    if family.denoiser != "unet" and config.train_method != "full":
        raise UserError(f"--train-method {config.train_method} names a UNet's cross-attention (attn2), which the "
                        f"{family.title} transformer does not have (its attention is joint over text and image): use "
                        "--train-method full, or --lora-rank with --lora-targets to choose the layers")
    if config.lora_rank:
        denoiser = family.denoiser_of(pipe)
        check_rank(denoiser, lora_modules(denoiser, config.train_method, config.lora_target_list()), config.lora_rank)
    if config.adversarial:
        config = dataclasses.replace(config, adversarial_initializer=check_adversarial(config, family, pipe))
    for pair in config.pairs():  # a concept longer than the text encoder's window loses its end: say so
        cut = [(p, family.beyond_window(pipe, p)) for p in concept_prompts(split_concepts(pair["concept"]),
                                                                           config.templates)]
        cut = [(p, dropped) for p, dropped in cut if dropped]
        if cut:
            say(f"{len(cut)} prompt(s) of the concept {pair['concept']!r} are longer than the text encoder reads "
                f"({family.window(pipe)} tokens): e.g. {cut[0][1]!r} is dropped "
                f"from {cut[0][0]!r}")
    return config, fisher_meta


def plan_memory(config: ForgetConfig, pipe, family, accelerator) -> int:
    """The memory plan, before any work: the Fisher's chunk, the sets' images and the training step
    must fit the budget (--max-memory, or the GPU's free memory), else the run is refused now with
    the options that fit. Returns the training step's predicted peak."""
    latent, limit = latent_size(pipe, config.resolution), budget(config.max_memory, accelerator.device)
    if not config.fim:
        fim_steps = len(timestep_set(pipe.scheduler.config.num_train_timesteps,
                                     config.fim_num_timesteps or DEFAULT_FIM_TIMESTEPS))
        lora = lora_layers(pipe, config)
        say(fisher_plan(pipe, latent, fim_steps, None, config.gradient_checkpointing, accelerator.mixed_precision,
                        config.max_memory, accelerator.device, set(lora[1]) if lora else None)[1])
    planned_sampling(pipe, config, accelerator)  # refused now if one image does not fit
    adversary_bytes = 4 * sum(p.numel() for encoder in family.loaded_text_encoders(pipe)
                              for p in encoder.parameters()) if config.adversarial else 0
    shards = accelerator.num_processes if sharded(accelerator) else 1  # FSDP: each process holds its rows
    peak = check_training_memory(family, family.denoiser_of(pipe), config, latent, accelerator.mixed_precision, limit,
                                 adversary_bytes, shards)
    say(plan_line("training", "", peak, limit) + f"; mixed precision {accelerator.mixed_precision} (per process"
        + (f", FSDP over {shards})" if shards > 1 else ")"))
    return peak


@dataclasses.dataclass
class Sets:
    replay: ImageSet
    surrogates: list[ImageSet]  # one per pair, earlier runs' pairs first; pairs may share a set
    concept: ImageSet | None  # --adversarial: the concept drawn by --model, for the inner attack
    pairs: list[dict]  # every (concept, surrogate) pair: its concept prompts and surrogate source
    preserve: ImageSet | None  # --preserve: the neighbours drawn by the base model, replayed with the replay set


def image_sets(run: Run) -> Sets:
    """The replay set, each pair's surrogate set, (--preserve) the neighbours' set and (--adversarial)
    the concept set: given, reused from the cache or an earlier run, or generated now with the model."""
    config = run.config
    replay, surrogates = run.plan.sets(run.accelerator)
    preserve = run.plan.preserve_set(run.accelerator)
    concept = run.plan.concept_set(run.accelerator) if config.adversarial else None
    pairs = [{"concept": p["concept"], "concept_prompts": p["concept_prompts"], "inherited": True,
              **{k: p[k] for k in SURROGATE_SOURCES if p.get(k)}} for p in run.inherited]
    pairs += [{"concept": p["concept"], "concept_prompts": concept_prompts(split_concepts(p["concept"]), config.templates),
               "inherited": False, **{k: v for k, v in p.items() if k in SURROGATE_SOURCES and v}}
              for p in config.pairs()]
    return Sets(replay, surrogates, concept, pairs, preserve)


@dataclasses.dataclass
class Fisher:
    path: Path
    metadata: dict
    made_now: bool
    origin_mismatches: list[str]  # accepted with --allow-origin-mismatch, recorded


def fisher(run: Run, sets: Sets) -> Fisher:
    """The diagonal Fisher of the model over the replay set: --fim, the cached one, or computed now;
    it and the sets made now must come from the model being trained (or one it was made from)."""
    config = run.config
    # Over the replay set alone, not the preserve set: the Fisher stays the base model's, shared by
    # every concept forgotten on it, and the neighbours are held by replaying them.
    path = Path(config.fim) if config.fim else run.plan.fisher(sets.replay, run.accelerator)
    metadata = run.fisher_meta if config.fim else load_fisher(path, run.pipe, names=())[1]
    made_now = {f"surrogate {i + 1}": s for i, s in enumerate(sets.surrogates[len(run.inherited):])}
    preserve = {"preserve": sets.preserve} if sets.preserve is not None else {}
    mismatches = check_origins(config, run.ref, run.pipe, metadata, {"replay": sets.replay, **made_now, **preserve},
                               run.ancestors)
    return Fisher(path, metadata, run.plan.fim_made, mismatches)


@dataclasses.dataclass
class Data:
    """Everything a training step draws from, on the training device or beside it."""
    surrogate_latents: torch.Tensor  # the pairs' distinct surrogate sets, concatenated
    replay_latents: torch.Tensor  # the replay pool: the replay set, then the preserve set (--preserve)
    images: dict[str, Conditioning]  # "surrogate", "replay": each image's own image conditioning
    concept_text: Conditioning  # of every concept prompt, pairs in order
    replay_text: Conditioning  # of each distinct prompt of the replay pool
    replay_text_index: torch.Tensor  # replay image -> its row of replay_text
    image_spans: list[tuple[int, int]]  # pair k's surrogate images: (offset, count) in surrogate_latents
    prompt_spans: list[tuple[int, int]]  # pair k's concept prompts: (offset, count) in concept_text
    concepts: list[str]  # every concept prompt


def conditioning(run: Run, sets: Sets) -> Data:
    """The conditioning of every prompt, computed once; then neither the VAE nor the text encoders
    run during training, and they leave the accelerator. Each image keeps the image conditioning
    (SDXL's time ids) it was made with."""
    family, pipe, device = run.family, run.pipe, run.accelerator.device
    distinct = list({id(image_set): image_set for image_set in sets.surrogates}.values())  # pairs may share a set
    surrogate_latents, surrogate_conditioning = joined_sets(distinct)
    concepts = [prompt for p in sets.pairs for prompt in p["concept_prompts"]]
    text_encoders = family.loaded_text_encoders(pipe)
    for encoder in text_encoders:
        encoder.requires_grad_(False).to(device, dtype=DTYPES[run.config.mixed_precision])
    concept_text = family.encode_text(pipe, concepts)
    # The neighbours' images are replayed as the replay set's are: every replay draw is over both.
    pool = [sets.replay] + ([sets.preserve] if sets.preserve is not None else [])
    replay_latents, pool_conditioning = torch.cat([s.latents for s in pool]), join(*[s.conditioning for s in pool])
    pool_prompts = [p for s in pool for p in s.prompts]
    replay_texts = sorted(set(pool_prompts))
    replay_text = embed_all(family, pipe, replay_texts, run.accelerator.is_main_process)
    position = {text: i for i, text in enumerate(replay_texts)}
    images = {name: to_device({k: c[k] for k in family.image_keys}, device)
              for name, c in (("surrogate", surrogate_conditioning), ("replay", pool_conditioning))}
    pipe.vae.to("cpu")
    for encoder in text_encoders:
        encoder.to("cpu")
    starts = {id(s): sum(len(t.latents) for t in distinct[:i]) for i, s in enumerate(distinct)}
    counts = [len(p["concept_prompts"]) for p in sets.pairs]
    return Data(surrogate_latents, replay_latents, images, concept_text, replay_text,
                torch.tensor([position[p] for p in pool_prompts]),
                [(starts[id(s)], len(s.latents)) for s in sets.surrogates],
                [(sum(counts[:i]), n) for i, n in enumerate(counts)], concepts)


@dataclasses.dataclass
class Carried:
    """What checkpoints carry besides the weights and the optimizer (checkpoints.py: safetensors and
    JSON, no pickle): the warm-up schedule, stepped once per optimizer step; the EMA of what trains;
    the adversary's token. Those a run has are saved and restored, and no other place lists them."""
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel | None
    adversary: Adversary | None

    def objects(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def save(self, run: Run, step: int) -> None:
        save_checkpoint(run.accelerator, run.work, step, run.config.checkpoints_total_limit, run.settings,
                        self.objects())

    def resume(self, run: Run, checkpoint: Path) -> int:
        run.accelerator.load_state(str(checkpoint))
        load_state(checkpoint, self.objects())
        return checkpoint_step(checkpoint)


class Trainer:
    """What trains (the UNet's weights or LoRA adapters) and the penalty that holds it to theta*,
    the optimizer and its warm-up, the EMA, the adversary; the loop and its training step."""

    def __init__(self, run: Run, fim: Fisher, data: Data, adversary: Adversary | None):
        config, accelerator, unet = run.config, run.accelerator, run.family.denoiser_of(run.pipe)
        self.run, self.data, self.adversary = run, data, adversary
        self.noise_scheduler = run.family.training_scheduler(run.pipe.scheduler.config)
        self.trainable = make_trainable(unet, config)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if config.enable_xformers:
            enable_xformers(unet)
        # Never scaled silently by the number of processes (the reference code's pitfall); --scale-lr
        # opts in to the linear scaling rule for the larger global batch.
        self.learning_rate = config.learning_rate * (accelerator.num_processes if config.scale_lr else 1)
        optimizer = make_optimizer(self.trainable.params, config, self.learning_rate)
        # Linear warm-up: a fresh AdamW's first steps move every weight by about the learning rate.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / (config.lr_warmup_steps + 1)))
        self.sharded = sharded(accelerator)
        if accelerator.is_main_process:
            print(preflight(unet, self.trainable, config, data.replay_text, bool(config.ema_decay),
                            adversary.parameter_bytes if adversary else 0,
                            accelerator.num_processes if self.sharded else 1), flush=True)
        # Under FSDP, prepare shards the denoiser in place and points the optimizer at the shards.
        self.unet, self.optimizer = accelerator.prepare(unet, optimizer)
        # The penalty of the weights as they train (their shards under FSDP): F of the same rows,
        # read from the file straight onto the training device, and theta* copied from them.
        self.trainable.anchor(accelerator.unwrap_model(self.unet), lambda rows: read_fisher(fim.path, rows),
                              accelerator.device)
        self.params, self.penalty = self.trainable.params, self.trainable.penalty
        self.started_at = fingerprint(self.params)  # a result identical to its start is no result
        self.trainable.register_checkpointing(accelerator, self.unet)
        ema = None
        if config.ema_decay:  # of what trains
            ema = (EMAModel if config.ema_warmup else ConstantDecayEMA)(self.params, decay=config.ema_decay)
            ema.to(accelerator.device)
        self.carried = Carried(schedule, ema, adversary)
        self.global_step = 0
        if run.checkpoint is not None:
            self.global_step = self.carried.resume(run, run.checkpoint)
            accelerator.print(f"resumed from {run.checkpoint} at step {self.global_step}")
        elif config.resume_from_checkpoint:
            accelerator.print(f"no checkpoint in {run.work / 'checkpoints'}: starting from step 0")
        self.skipped = 0  # optimizer steps fp16's loss scaler skipped (inf/NaN gradients)
        self.last: dict[str, float] = {}  # the last step's losses
        self.ewc = math.nan  # the penalty's value when last read

    def train(self) -> None:
        """The loop from the last checkpoint to --max-train-steps. Every optimizer step is checked
        (a non-finite loss or penalty stops the run); weights are checkpointed only when finite."""
        run, config, accelerator, adversary = self.run, self.run.config, self.run.accelerator, self.adversary
        # The new pair (the last) gets the adversary's prompts.
        adversarial = (self.data.prompt_spans[-1], len(adversary.prompts), config.adversarial_share) \
            if adversary else None
        inner = accelerator.unwrap_model(self.unet)  # the inner attack runs the model itself, outside DDP
        shapes = {"surrogate": tuple(self.data.surrogate_latents.shape[1:]),
                  "replay": tuple(self.data.replay_latents.shape[1:])}
        bar = tqdm(total=config.max_train_steps, initial=self.global_step, desc="forgetting", unit="step",
                   disable=not accelerator.is_main_process)
        self.unet.train()
        micro_step = self.global_step * config.gradient_accumulation_steps
        skipped_in_a_row = 0
        try:
            while self.global_step < config.max_train_steps:
                # After a skipped step global_step is where it was: its round has been learned already.
                if (adversary is not None and micro_step % config.gradient_accumulation_steps == 0
                        and self.global_step % config.adversarial_every == 0 and not skipped_in_a_row):
                    adversary.learn(inner, self.noise_scheduler, self.global_step, accelerator)
                drawn = draw_batch(config.seed, micro_step, accelerator.num_processes, accelerator.process_index,
                                   config.train_batch_size, self.data.image_spans, self.data.prompt_spans,
                                   len(self.data.replay_latents), shapes,
                                   partial(run.family.draw_timesteps, self.noise_scheduler), adversarial)
                micro_step += 1
                reported = self.step(drawn, shapes)
                if not accelerator.sync_gradients:
                    continue
                if self.optimizer.step_was_skipped:
                    # fp16: the loss scaler found inf/NaN gradients, left the weights as they were and
                    # lowered its scale. Not a training step: the warm-up, the EMA and the count wait for
                    # one that is; the next batches are fresh draws (micro_step counts on).
                    self.skipped += 1
                    skipped_in_a_row += 1
                    if skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:
                        raise broken_run(f"the fp16 loss scale kept overflowing ({skipped_in_a_row} optimizer steps "
                                         "in a row skipped for inf/NaN gradients; rerun with --mixed-precision bf16)",
                                         self.global_step + 1, run.work, config)
                    continue
                skipped_in_a_row = 0
                self.global_step += 1
                self.carried.lr_scheduler.step()
                if self.carried.ema is not None:
                    self.carried.ema.step(self.params)
                self.last = {"surrogate": reported[0].item(), "replay": reported[1].item(), "ewc": self.ewc}
                self.last["total"] = self.last["surrogate"] + config.gamma * self.last["replay"] + self.last["ewc"]
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in self.last.items()})
                first_batch(bar, 2 * config.train_batch_size * accelerator.num_processes
                            * config.gradient_accumulation_steps, "training")
                if self.global_step % config.checkpointing_steps == 0 and self.global_step < config.max_train_steps:
                    # Only finite weights are ever saved, so the last checkpoint is always a good one.
                    if not on_every_process(accelerator, weights_finite(
                            self.params + (self.carried.ema.shadow_params if self.carried.ema else []))):
                        raise broken_run("the weights became non-finite (NaN or inf)", self.global_step, run.work,
                                         config)
                    self.carried.save(run, self.global_step)  # every process: under FSDP each saves its shards
        except torch.OutOfMemoryError:
            kept = find_checkpoint(run.work, "latest")
            raise out_of_memory_error(
                "training" + (" (or its inner attack)" if adversary is not None else ""), run.peak,
                ("add --gradient-checkpointing (same result) and --resume-from-checkpoint latest to go on from "
                 f"{kept.name}; " if kept else "add --gradient-checkpointing (same result); ")
                + "--fim-dtype bf16, --use-8bit-adam or a smaller --train-batch-size change the training: start "
                  "again with them" + (" and --overwrite" if kept else "")) from None
        except KeyboardInterrupt:
            kept = find_checkpoint(run.work, "latest")
            raise Interrupted(
                f"stopped at step {self.global_step}; rerun with --resume-from-checkpoint latest to continue from "
                f"{kept}" if kept else f"stopped at step {self.global_step}, before the first checkpoint: a rerun "
                "starts training again (sets already made are reused)") from None
        bar.close()
        accelerator.wait_for_everyone()
        if self.carried.ema is not None:
            self.carried.ema.copy_to(self.params)  # the EMA weights are the result

    def step(self, d: dict, shapes: dict) -> torch.Tensor:
        """One micro-step of the objective on this process's slice of the batch `d`: the surrogate and
        replay terms' backward, then (when the gradients are synced) the EWC penalty's gradient added
        unscaled, clipping and the optimizer step. Returns the global batch's two losses; the
        penalty's value is read into self.ewc every LOG_EVERY steps."""
        run, config, accelerator, data = self.run, self.run.config, self.run.accelerator, self.data
        device, b, family, unet = accelerator.device, config.train_batch_size, run.family, self.unet
        with accelerator.accumulate(unet):
            x_s = data.surrogate_latents[d["surrogate_index"]].to(device)
            # The concept's prompts on the surrogate's images, with those images' own conditioning.
            c_text = take(data.concept_text, d["concept_index"].to(device))
            if self.adversary is not None:
                c_text = self.adversary.stand_in(c_text, d["adversarial_index"].to(device))
            c_s = {**c_text, **take(data.images["surrogate"], d["surrogate_index"].to(device))}
            terms = [(x_s, d["surrogate_noise"], d["surrogate_t"], c_s)]
            if config.gamma > 0:
                x_r = data.replay_latents[d["replay_index"]].to(device)
                c_r = {**take(data.replay_text, data.replay_text_index[d["replay_index"]].to(device)),
                       **take(data.images["replay"], d["replay_index"].to(device))}
                terms.append((x_r, d["replay_noise"], d["replay_t"], c_r))
            if len(terms) == 2 and shapes["surrogate"] == shapes["replay"]:
                # One forward over surrogate + replay: same result as two, faster.
                x, noise, t = (torch.cat(parts) for parts in zip(*[term[:3] for term in terms]))
                losses = per_sample_loss(family, unet, self.noise_scheduler, x, noise.to(device), t.to(device),
                                         join(terms[0][3], terms[1][3]))
                loss_s, loss_r = losses[:b].mean(), losses[b:].mean()
            else:
                term_losses = [per_sample_loss(family, unet, self.noise_scheduler, x, n.to(device), t.to(device),
                                               c).mean() for x, n, t, c in terms]
                loss_s = term_losses[0]
                loss_r = term_losses[1] if len(term_losses) == 2 else torch.zeros((), device=device)
            # The global batch's losses, averaged over processes: what is logged, and a NaN check that
            # every process agrees on, so all of them stop together.
            reported = accelerator.reduce(torch.stack([loss_s.detach(), loss_r.detach()]), reduction="mean")
            if not torch.isfinite(reported).all():
                raise broken_run(f"the loss became {(reported[0] + config.gamma * reported[1]).item()}",
                                 self.global_step + 1, run.work, config)
            accelerator.backward(loss_s + config.gamma * loss_r)
            if accelerator.sync_gradients:
                accelerator.unscale_gradients()  # the penalty's gradient is added unscaled
                step = self.global_step + 1
                value = self.penalty.add_grad_(with_value=step % LOG_EVERY == 0 or step == config.max_train_steps
                                               or not self.last)  # the value's .item() syncs: not every step
                if value is not None:
                    if self.sharded:  # each process's rows hold a part of the sum
                        value = accelerator.reduce(value, reduction="sum")
                    self.ewc = value.item()
                    if not math.isfinite(self.ewc):  # the whole objective is checked, EWC included
                        raise broken_run(f"the EWC penalty became {self.ewc}", step, run.work, config)
                if config.max_grad_norm:
                    # Already unscaled (and synced across processes): accelerator.clip_grad_norm_ would
                    # unscale a second time under fp16.
                    torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return reported


def write(run: Run, sets: Sets, fim: Fisher, trainer: Trainer) -> Path:
    """The result, only when it is one: finite weights that moved from where they started. The main
    process writes the pipeline folder and amnesia.json (last) into the work folder, then publishes it."""
    config, accelerator, work, params = run.config, run.accelerator, run.work, trainer.params
    if not on_every_process(accelerator, weights_finite(params)):
        raise broken_run("the trained weights are non-finite (NaN or inf)", trainer.global_step, work, config)
    if on_every_process(accelerator, torch.equal(fingerprint(params), trainer.started_at)):
        raise UserError("training changed nothing: the weights that train are exactly where they started, so the "
                        f"result would be the base model. Likely cause: --learning-rate {config.learning_rate:g} too "
                        "small for float32 to move them" + (f", or --lora-alpha {config.lora_alpha_value():g}"
                                                             if config.lora_rank else ""))
    adversary = trainer.adversary
    if adversary is not None and not weights_finite(adversary.rows):  # saved with the result
        raise broken_run("the adversary's token is non-finite (NaN or inf)", trainer.global_step, work, config)
    # Under FSDP every process takes part in gathering the whole denoiser; the first keeps it (on the CPU).
    state = accelerator.get_state_dict(trainer.unet) if trainer.sharded else None
    held = accelerator.gather(torch.tensor([trainer.trainable.held_bytes], device=accelerator.device)).tolist()
    if accelerator.is_main_process:
        replay = sets.replay
        summary = {
            "architecture": run.family.name,
            "pipeline_class": run.family.pipeline,
            "steps": trainer.global_step,
            "skipped_steps": trainer.skipped,  # fp16 overflows since this run (or its resume) began; not in "steps"
            "final_losses": trainer.last,
            "trainable_parameters": sum(p.numel() for p in params),
            "num_processes": accelerator.num_processes,
            "distributed": accelerator.distributed_type.value,
            # the Fisher and theta* each process held (FSDP: its rows of them)
            "penalty_bytes_per_process": held,
            "global_batch_size": config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps,
            "learning_rate": trainer.learning_rate,
            "mixed_precision": accelerator.mixed_precision,
            "replay_set": recorded_path(replay.path, work),
            "replay_images": {"prompted": len(replay.prompts) - replay.prompts.count(""),
                              "unconditional": replay.prompts.count("")},
            # --preserve: the neighbours held, the distinct prompts of their set; earlier_run: an earlier run's set
            "preserve": {"value": run.preserve["value"], "names": run.preserve["names"],
                         "prompts": list(dict.fromkeys(sets.preserve.prompts)),
                         "set": recorded_path(sets.preserve.path, work), "images": len(sets.preserve.latents),
                         "earlier_run": "set" in run.preserve} if sets.preserve is not None else None,
            "pairs": [{**{k: v for k, v in p.items() if k != "inherited"},
                       # what the concept now maps to: the set's prompt, or the folder of the user's images
                       "maps_to": image_set.manifest.get("images_dir") or image_set.prompts[0],
                       "surrogate_set": recorded_path(image_set.path, work), "earlier_run": p["inherited"]}
                      for p, image_set in zip(sets.pairs, sets.surrogates)],
            "concept_prompts": trainer.data.concepts,
            # cached: the Fisher lives in the amnesia-sd cache (made by this run or an earlier one).
            "fim": {"path": str(fim.path.resolve()), "cached": fim.path.resolve().is_relative_to(cache_dir().resolve()),
                    "made_now": fim.made_now, "metadata": fim.metadata},
            "origin_mismatches": fim.origin_mismatches,
            "seconds": round(time.time() - run.started, 1),
        }
        if adversary is not None:
            summary["adversarial"] = {**adversary.record(), "concept_set": recorded_path(sets.concept.path, work),
                                      "embedding": ADVERSARY_EMBEDDINGS}
            # The last round's token, in diffusers' textual-inversion format: try it on the result.
            save_file(adversary.embeddings(), str(work / ADVERSARY_EMBEDDINGS))
        if run.earlier:  # the whole sequence, oldest first; each entry is that run's own record
            summary["history"] = [*run.earlier.get("history", []),
                                  {k: v for k, v in run.earlier.items() if k != "history"}]
        write_result(work, run.ref, accelerator.unwrap_model(trainer.unet), trainer.trainable, config, summary, state)
        publish(work, run.out, FINISHED)
    accelerator.wait_for_everyone()
    return run.out


def embed_all(family, pipe, prompts: list[str], progress: bool, batch: int = 64) -> Conditioning:
    """The text conditioning of `prompts`, computed once in batches, kept on the training device."""
    chunks = [family.encode_text(pipe, prompts[i : i + batch])
              for i in tqdm(range(0, len(prompts), batch), desc="text embeddings", unit="batch", disable=not progress)]
    return join(*chunks)


def joined_sets(sets: list[ImageSet]) -> tuple[torch.Tensor, Conditioning]:
    """The pairs' surrogate sets as one: latents and image conditioning concatenated in order."""
    shapes = {tuple(s.latents.shape[1:]) for s in sets}
    if len(shapes) > 1:
        raise UserError("the surrogate sets have latents of different sizes (" + ", ".join(
            f"{s.path}: {tuple(s.latents.shape[1:])}" for s in sets) + "): make them at one --resolution")
    return torch.cat([s.latents for s in sets]), join(*[s.conditioning for s in sets])


def draw_batch(seed: int, micro_step: int, world: int, rank: int, batch: int, images: list[tuple[int, int]],
               prompts: list[tuple[int, int]], replay_size: int, shapes: dict, draw_t,
               adversarial: tuple[tuple[int, int], int, float] | None = None):
    """This process's slice of the global batch of one micro-step. images[k] and prompts[k] are
    (offset, count) of pair k's surrogate images and concept prompts in their concatenations: each
    surrogate sample draws its pair uniformly (a concept with many images or alternatives does not
    crowd out the others), then an image and a prompt of that pair. With `adversarial` ((offset,
    count) of the adversarial pair's prompts, the number of adversary prompts, their share), that
    share of the pair's samples gets an adversary prompt instead (`adversarial_index`, else -1),
    drawn from a stream of its own: the other draws stay as they are. `draw_t(count, generator)`
    draws timesteps (the family's draw_timesteps)."""
    g = torch.Generator("cpu").manual_seed(image_seed(seed, micro_step, "train"))
    total, part = batch * world, slice(rank * batch, (rank + 1) * batch)
    pair = torch.randint(len(images), (total,), generator=g) if len(images) > 1 else None

    def within(spans: list[tuple[int, int]]) -> torch.Tensor:
        if pair is None:  # one pair draws exactly what runs of one concept always drew
            return spans[0][0] + torch.randint(spans[0][1], (total,), generator=g)
        offsets, counts = (torch.tensor(v) for v in zip(*spans))
        return offsets[pair] + (torch.rand(total, generator=g) * counts[pair]).long().clamp_max(counts[pair] - 1)

    drawn = {}
    for term in ("surrogate", "replay"):
        drawn[f"{term}_index"] = (within(images) if term == "surrogate"
                                  else torch.randint(replay_size, (total,), generator=g))[part]
        drawn[f"{term}_t"] = draw_t(total, g)[part]
        drawn[f"{term}_noise"] = torch.randn((total, *shapes[term]), generator=g)[part]
    concept = within(prompts)
    drawn["concept_index"] = concept[part]
    if adversarial is not None:
        (start, count), n, share = adversarial
        a = torch.Generator("cpu").manual_seed(image_seed(seed, micro_step, "adversarial"))
        use = (torch.rand(total, generator=a) < share) & (concept >= start) & (concept < start + count)
        drawn["adversarial_index"] = torch.where(use, torch.randint(n, (total,), generator=a), -1)[part]
    return drawn


def make_optimizer(params: list[torch.Tensor], config: ForgetConfig, lr: float):
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer state in a quarter of the memory)."""
    if not config.use_8bit_adam:
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.adam_weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("--use-8bit-adam needs bitsandbytes: pip install 'amnesia-sd[bitsandbytes]'") from None
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=config.adam_weight_decay)


class ConstantDecayEMA(EMAModel):
    """The decay from the first step, as the reference (LDM's LitEma) keeps it: diffusers' EMAModel
    ramps it up as (1 + step) / (10 + step)."""

    def get_decay(self, optimization_step: int) -> float:
        return self.decay


def enable_xformers(unet) -> None:
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise UserError("--enable-xformers needs xformers: pip install 'amnesia-sd[xformers]'") from None
    unet.enable_xformers_memory_efficient_attention()


@torch.no_grad()
def fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """Two float64 sums per tensor (of this process's rows under FSDP): any update changes them."""
    return torch.stack([torch.stack([local(p).double().sum(), local(p).double().abs().sum()]) for p in params]).cpu()


def on_every_process(accelerator, flag: bool) -> bool:
    """A check each process makes of what it holds, agreed by all, so that all stop together."""
    if accelerator.num_processes == 1:
        return flag
    ones = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
    return int(ones.item()) == accelerator.num_processes
