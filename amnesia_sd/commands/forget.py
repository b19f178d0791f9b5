"""Selective Amnesia training of the UNet, top to bottom (METHOD.md):

    L(theta) = E_{x~q(x|c_f)} L_simple(x, c_f)  +  gamma * E_{(x,c)~replay} L_simple(x, c)
             + lambda * sum_i F_i (theta_i - theta*_i)^2

Every batch (indices, timesteps, noise) is drawn from a generator seeded by the run's seed and the
micro-step, for the global batch of all processes at once; each process takes its slice. So a
resumed run continues exactly, and N processes x batch b see the same data as 1 process x N*b.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from amnesia_sd.core.cache import cache_dir
from amnesia_sd.core.config import DEFAULT_FIM_TIMESTEPS, SURROGATE_SOURCES, ForgetConfig, split_concepts
from amnesia_sd.core.cost import first_batch, say
from amnesia_sd.core.errors import Interrupted, UserError
from amnesia_sd.core.paths import partial_of, publish
from amnesia_sd.data.generate import image_seed, planned_sampling
from amnesia_sd.data.imageset import ImageSet, check_fits, is_finished, load_image_set
from amnesia_sd.data.prompts import concept_prompts, with_unconditional
from amnesia_sd.method.adversary import Adversary, check_adversarial
from amnesia_sd.method.checkpoints import (broken_run, check_digest, check_paths, check_resume, checkpoint_step,
                                           earlier_run, find_checkpoint, load_state, open_run, save_checkpoint,
                                           training_settings, weights_finite)
from amnesia_sd.method.fisher import fisher_plan, load_fisher, timestep_set
from amnesia_sd.method.record import FINISHED, recorded_path, write_result
from amnesia_sd.method.sources import Plan
from amnesia_sd.model.diffusion import per_sample_loss
from amnesia_sd.model.families import Conditioning, check_unconditional_replay, family_of, join, take, to_device
from amnesia_sd.model.loading import (DTYPES, ModelRef, latent_size, load_on_device, make_accelerator, model_path,
                                      origin, origin_mismatches)
from amnesia_sd.model.memory import activation_peak, budget, gib, meta_copy, out_of_memory_error, plan_line
from amnesia_sd.model.trainable import check_rank, lora_modules, make_trainable, trainable_names

ADVERSARY_EMBEDDINGS = "adversary_embeds.safetensors"  # forget --adversarial: its last token
LOG_EVERY = 10  # steps between readings of the penalty's value (its gradient is added every step)
# fp16's loss scaler halves its scale on every skipped step: this many in a row is no longer the
# scale's fault but gradients fp16 cannot hold.
MAX_SKIPPED_IN_A_ROW = 100


def embed_all(family, pipe, prompts: list[str], progress: bool, batch: int = 64) -> Conditioning:
    """The text conditioning of `prompts`, computed once in batches, kept on the training device."""
    chunks = [family.encode_text(pipe, prompts[i : i + batch])
              for i in tqdm(range(0, len(prompts), batch), desc="text embeddings", unit="batch", disable=not progress)]
    return join(*chunks)


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


class ConstantDecayEMA(EMAModel):
    """The decay from the first step, as the reference (LDM's LitEma) keeps it: diffusers' EMAModel
    ramps it up as (1 + step) / (10 + step)."""

    def get_decay(self, optimization_step: int) -> float:
        return self.decay


GPU_SIZES_GB = (24, 48, 80)


def memory_parts(n_all: int, n_train: int, penalty_bytes: int, use_8bit_adam: bool, ema: bool,
                 weight_bytes: int = 4) -> dict[str, int]:
    """Bytes the run keeps on the accelerator besides activations: the UNet's weights (fp32; a LoRA
    run's frozen base in the mixed-precision dtype) and, for the parameters that train, fp32
    gradients, AdamW's two moments (8-bit: a quarter) and the EMA copy when asked for; and the
    penalty's Fisher (and anchor theta*, in full training)."""
    return {"weights": weight_bytes * n_all, "grads": 4 * n_train, "optimizer": (2 if use_8bit_adam else 8) * n_train,
            "fisher+anchor": penalty_bytes, "ema": 4 * n_train if ema else 0}


def fits(total_bytes: int) -> str:
    """The smallest common GPU that holds this much with a tenth to spare, and what is left there for
    activations (not counted here: they depend on resolution, batch and checkpointing)."""
    for size in GPU_SIZES_GB:
        if total_bytes <= 0.9 * size * 1e9:
            return f"a {size} GB GPU keeps about {size - total_bytes / 1e9:.0f} GB for activations"
    return f"more than a {GPU_SIZES_GB[-1]} GB GPU holds"


def training_peak(family, unet, config: ForgetConfig, latent: tuple[int, int], mixed_precision: str,
                  adversary_bytes: int = 0) -> int:
    """Predicted peak bytes of training on the device, from the UNet before it trains: what
    memory_parts counts, and the activations of one forward over surrogate + replay images; with
    --adversarial, the inner attack too (between steps: no gradients of the UNet, but the adversary's
    float32 text encoders and a forward and backward through the UNet at --adversarial-batch-size)."""
    sizes = {name: p.numel() for name, p in unet.named_parameters()}
    store = 2 if config.fim_dtype != "fp32" else 4
    if config.lora_rank:
        modules = dict(unet.named_modules())
        adapted = lora_modules(unet, config.train_method, config.lora_target_list())
        n_train = sum(config.lora_rank * (modules[m].weight[0].numel() + modules[m].weight.shape[0]) for m in adapted)
        n_all, penalty = sum(sizes.values()), store * sum(sizes[f"{m}.weight"] for m in adapted)
    else:
        n_train = sum(sizes[name] for name in trainable_names(unet, config.train_method))
        n_all, penalty = sum(sizes.values()), 2 * store * n_train
    half_base = bool(config.lora_rank) and mixed_precision != "no"  # a LoRA run's frozen base in 16 bits
    parts = memory_parts(n_all, n_train, penalty, config.use_8bit_adam, bool(config.ema_decay), 2 if half_base else 4)
    meta = meta_copy(unet)
    activations = activation_peak(family, meta, 2 * config.train_batch_size, latent, mixed_precision,
                                  config.gradient_checkpointing, float32_weights=not half_base)
    step = sum(parts.values()) + activations
    if not config.adversarial:
        return step
    inner = sum(parts.values()) - parts["grads"] + adversary_bytes + activation_peak(
        family, meta, config.adversarial_batch_size, latent, mixed_precision, config.gradient_checkpointing,
        float32_weights=not half_base)
    return max(step, inner)


def check_training_memory(family, unet, config: ForgetConfig, latent: tuple[int, int], mixed_precision: str,
                          limit: int | None, adversary_bytes: int = 0) -> int:
    """The training step's predicted peak; over the budget, refused before any work with the settings
    that would fit, each with its predicted peak (none is switched on silently: each changes results
    or speed)."""
    peak = training_peak(family, unet, config, latent, mixed_precision, adversary_bytes)
    if limit is None or peak <= limit:
        return peak
    options = [("--gradient-checkpointing", {"gradient_checkpointing": True}),
               ("--fim-dtype bf16", {"fim_dtype": "bf16"}), ("--use-8bit-adam", {"use_8bit_adam": True})]
    if not config.lora_rank:
        options.append(("--lora-rank 8", {"lora_rank": 8}))
    options += [(f"--train-batch-size {b}", {"train_batch_size": b})
                for b in sorted({config.train_batch_size // 2, 1}, reverse=True) if 0 < b < config.train_batch_size]
    said = []
    for flag, change in options:
        other = training_peak(family, unet, dataclasses.replace(config, **change), latent, mixed_precision,
                              adversary_bytes)
        said.append(f"{flag} ({gib(other)}{', fits' if other <= limit else ''})")
    raise UserError(f"training needs about {gib(peak)} on the device at its peak, the budget is "
                    f"{gib(limit)} (--max-memory or the GPU's free memory): options, alone, with their "
                    f"predicted peaks: {'; '.join(said)}; several together fit where one alone does not")


def preflight(unet, trainable, config: ForgetConfig, text_cache: Conditioning, ema: bool, adversary_bytes: int = 0) -> str:
    """What the run will hold on the accelerator, before the long work starts."""
    gib = 2**30
    n_train = sum(p.numel() for p in trainable.params)
    n_all = sum(p.numel() for p in unet.parameters()) - (n_train if config.lora_rank else 0)
    frozen = next((p for p in unet.parameters() if not p.requires_grad), None) if config.lora_rank else None
    weight_bytes = frozen.element_size() if frozen is not None else 4
    parts = memory_parts(n_all, n_train, trainable.penalty_bytes, config.use_8bit_adam, ema, weight_bytes)
    parts["text cache"] = sum(v.numel() * v.element_size() for v in text_cache.values())
    parts["adversary's text encoder"] = adversary_bytes
    total = sum(parts.values())
    detail = ", ".join(f"{k} {v / gib:.2f}" for k, v in parts.items() if v)
    hint = "" if total <= 0.9 * GPU_SIZES_GB[0] * 1e9 else (
        " (less: --fim-dtype bf16, --use-8bit-adam, --train-method noxattn or xattn)")
    what = f"LoRA rank {config.lora_rank} adapters: {n_train / 1e6:.2f}M parameters on {n_all / 1e6:.1f}M frozen" \
        if config.lora_rank else f"{n_train / 1e6:.1f}M of {n_all / 1e6:.1f}M UNet parameters train"
    return (f"preflight: {what}; about "
            f"{total / gib:.2f} GiB before activations ({detail} GiB); {fits(total)}{hint}; "
            f"{config.max_train_steps} steps x {config.train_batch_size}+{config.train_batch_size} images "
            f"x {config.gradient_accumulation_steps} accumulation" + (
                f"; an inner attack of {config.adversarial_steps} steps x {config.adversarial_batch_size} images "
                f"before step 1 and every {config.adversarial_every} steps" if config.adversarial else "")
            + "; the progress bar's ETA follows the first steps")


@torch.no_grad()
def fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """Two float64 sums per tensor: any update changes them."""
    return torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in params]).cpu()


def draw_batch(seed: int, micro_step: int, world: int, rank: int, batch: int, images: list[tuple[int, int]],
               prompts: list[tuple[int, int]], replay_size: int, shapes: dict, num_t: int,
               adversarial: tuple[tuple[int, int], int, float] | None = None):
    """This process's slice of the global batch of one micro-step. images[k] and prompts[k] are
    (offset, count) of pair k's surrogate images and concept prompts in their concatenations: each
    surrogate sample draws its pair uniformly (a concept with many images or alternatives does not
    crowd out the others), then an image and a prompt of that pair. With `adversarial` ((offset,
    count) of the adversarial pair's prompts, the number of adversary prompts, their share), that
    share of the pair's samples gets an adversary prompt instead (`adversarial_index`, else -1),
    drawn from a stream of its own: the other draws stay as they are."""
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
        drawn[f"{term}_t"] = torch.randint(num_t, (total,), generator=g)[part]
        drawn[f"{term}_noise"] = torch.randn((total, *shapes[term]), generator=g)[part]
    concept = within(prompts)
    drawn["concept_index"] = concept[part]
    if adversarial is not None:
        (start, count), n, share = adversarial
        a = torch.Generator("cpu").manual_seed(image_seed(seed, micro_step, "adversarial"))
        use = (torch.rand(total, generator=a) < share) & (concept >= start) & (concept < start + count)
        drawn["adversarial_index"] = torch.where(use, torch.randint(n, (total,), generator=a), -1)[part]
    return drawn


def check_origins(config: ForgetConfig, ref: ModelRef, pipe, fisher_meta: dict, sets: dict[str, ImageSet],
                  ancestors: list[str]) -> list[str]:
    """The Fisher and the image sets must come from the model being trained or, when it is a forget
    result, from a model it was made from (`ancestors`), unless the user says otherwise
    (--allow-origin-mismatch), which is recorded."""
    expected = origin(ref, pipe)
    accepted = [expected] + [{**expected, "base_model": a} for a in ancestors]

    def mismatches(what: str, recorded: dict) -> list[str]:
        found = [origin_mismatches(what, recorded, e) for e in accepted]
        return [] if not all(found) else found[0]

    found = mismatches(f"--fim {config.fim}", fisher_meta)
    for name, image_set in sets.items():
        found += mismatches(f"{name} set {image_set.path}", image_set.manifest)
    if found and not config.allow_origin_mismatch:
        raise UserError("made from another model: " + "; ".join(found) + ". Make them with this model, or pass "
                        "--allow-origin-mismatch to use them anyway (recorded in amnesia.json)")
    return found


def joined_sets(sets: list[ImageSet]) -> tuple[torch.Tensor, Conditioning]:
    """The pairs' surrogate sets as one: latents and image conditioning concatenated in order."""
    shapes = {tuple(s.latents.shape[1:]) for s in sets}
    if len(shapes) > 1:
        raise UserError("the surrogate sets have latents of different sizes (" + ", ".join(
            f"{s.path}: {tuple(s.latents.shape[1:])}" for s in sets) + "): make them at one --resolution")
    return torch.cat([s.latents for s in sets]), join(*[s.conditioning for s in sets])


def check_sequence(config: ForgetConfig, earlier: dict) -> None:
    """What may follow an earlier forget run: only new concepts, and no second LoRA adapter on a LoRA result."""
    if not earlier:
        return
    done = {c.lower() for c in earlier.get("concepts", [])}
    again = [c for c in config.concept_list() if c.lower() in done]
    if again:
        raise UserError(f"{config.model} has already forgotten {', '.join(map(repr, again))}: give only new concepts "
                        "(the earlier ones are kept forgotten by replaying their surrogate sets)")
    if config.lora_rank and "lora" in earlier:
        raise UserError(f"{config.model} is a LoRA result: a second adapter cannot be stacked on it. Forget every "
                        "concept in one run (--concept A --surrogate a --concept B --surrogate b), or train the "
                        "next concept without --lora-rank")


def earlier_sets(config: ForgetConfig, record: dict) -> ForgetConfig:
    """After an earlier forget run (its amnesia.json `record`), the Fisher and replay set it used, unless others are asked for:
    on the digits model these kept three digits forgotten and the rest remembered, while a Fisher and
    replay set made again on the forgotten model cost the other digits 12-14 points and let the
    first digit come back (docs/digits.md, "Several digits"). Files that are gone are made again on this
    model (said in one line)."""
    if not record:  # --model is not a forget result
        return config
    folder = model_path(config.model)
    changes = {}
    fim = Path((record.get("fim") or {}).get("path", ""))
    if not (config.fim or config.fim_num_images or config.fim_num_timesteps):
        if fim.is_file():
            changes["fim"] = str(fim)
        else:
            print(f"the earlier run's Fisher {fim} is gone: a new one is made on {config.model}", flush=True)
    replay = Path(record.get("replay_set", ""))
    replay = replay if replay.is_absolute() else folder / replay
    if not (config.replay_dir or config.prompts_file or config.num_replay_images):
        if not is_finished(replay):
            print(f"the earlier run's replay set {replay} is gone: a new one is made on {config.model}", flush=True)
        elif config.unconditional_replay is not None and not holds_unconditional(replay, config.unconditional_replay):
            print(f"the earlier run's replay set {replay} does not hold --unconditional-replay "
                  f"{config.unconditional_replay:g}: a new one is made on {config.model}", flush=True)
        else:
            changes["replay_dir"] = str(replay)
            changes["unconditional_replay"] = None  # the reused set's, as it is
    return dataclasses.replace(config, **changes) if changes else config


def holds_unconditional(path: Path, share: float) -> bool:
    """The finished set at `path` ends with the empty prompts with_unconditional(..., share) appends."""
    prompts = load_image_set(path).prompts
    empty = prompts.count("")
    return with_unconditional(prompts[: len(prompts) - empty], share) == prompts


def forget(config: ForgetConfig) -> Path:
    """Train the UNet to map the concept to the surrogate while remembering everything else;
    write a diffusers pipeline folder to config.output_dir."""
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler

    started = time.time()
    out = Path(config.output_dir)
    work = partial_of(out)
    # Cheap checks first, so bad input fails in a second and leaves nothing behind.
    if config.fim and not Path(config.fim).is_file():  # a given Fisher that is not there is a mistake
        raise UserError(
            f"no Fisher file at {config.fim}: compute it once per base model with "
            f"`amnesia-sd fim --model {config.model} --output {config.fim}`"
        )
    # Sequential forgetting: the concepts --model already forgot stay in the objective.
    earlier, inherited = earlier_run(config.model) or ({}, [])
    config = earlier_sets(config, earlier)
    finished = check_paths(config, out, inherited)  # every process checks, so all fail alike
    # Given sets are read once, here, so a bad one fails before the model loads.
    given = {name: load_image_set(path) for name, path in [("replay", config.replay_dir)] + [
        (f"surrogate {i + 1}", pair["surrogate_dir"]) for i, pair in enumerate(config.pairs())] if path}
    check_sequence(config, earlier)
    inherited = [{**pair, "set": load_image_set(pair["set"])} for pair in inherited]
    ancestors = [r["base_model"] for r in earlier.get("history", [])] + ([earlier["base_model"]] if earlier else [])
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
        check_digest(checkpoint)  # before anything in it is read
        check_resume(checkpoint, settings)
    set_seed(config.seed)
    weight_dtype = DTYPES[config.mixed_precision]

    # Base model; the frozen parts run in the weight dtype, the UNet trains in float32.
    ref, pipe = load_on_device(config.model, accelerator)
    unet, family = pipe.unet, family_of(pipe)
    # A given Fisher is checked now, whole; the entries training needs are loaded when it starts.
    fisher_meta = load_fisher(config.fim, pipe, names=())[1] if config.fim else {}
    for image_set in [*given.values(), *(pair["set"] for pair in inherited)]:  # before hours of generation
        check_fits(image_set, pipe)
    check_origins(config, ref, pipe, fisher_meta, given, ancestors)
    check_unconditional_replay(family, pipe, config.unconditional_replay)
    if config.lora_rank:  # the adapters' layers exist, and can take the rank, before hours of generation
        check_rank(unet, lora_modules(unet, config.train_method, config.lora_target_list()), config.lora_rank)
    if config.adversarial:
        config = dataclasses.replace(config, adversarial_initializer=check_adversarial(config, family, pipe))
    for pair in config.pairs():  # a concept longer than the text encoder's window loses its end: say so
        cut = [(p, family.beyond_window(pipe, p)) for p in concept_prompts(split_concepts(pair["concept"]),
                                                                           config.templates)]
        cut = [(p, dropped) for p, dropped in cut if dropped]
        if cut:
            say(f"{len(cut)} prompt(s) of the concept {pair['concept']!r} are longer than the text encoder reads "
                f"({getattr(pipe, family.tokenizers[-1]).model_max_length} tokens): e.g. {cut[0][1]!r} is dropped "
                f"from {cut[0][0]!r}")
    # The memory plan, before any work: the Fisher's chunk and the training step must fit the budget.
    latent, limit = latent_size(pipe, config.resolution), budget(config.max_memory, accelerator.device)
    if not config.fim:
        fim_steps = len(timestep_set(pipe.scheduler.config.num_train_timesteps,
                                     config.fim_num_timesteps or DEFAULT_FIM_TIMESTEPS))
        say(fisher_plan(pipe, latent, fim_steps, None, config.gradient_checkpointing, accelerator.mixed_precision,
                        config.max_memory, accelerator.device)[1])
    planned_sampling(pipe, config, accelerator)  # the sets' images: refused now if one image does not fit
    adversary_bytes = 4 * sum(p.numel() for encoder in family.loaded_text_encoders(pipe)
                              for p in encoder.parameters()) if config.adversarial else 0
    peak = check_training_memory(family, unet, config, latent, accelerator.mixed_precision, limit, adversary_bytes)
    say(plan_line("training", "", peak, limit) + f"; mixed precision {accelerator.mixed_precision} (per process)")
    plan = Plan(config, ref, pipe, work, accelerator.num_processes, given, inherited)
    accelerator.wait_for_everyone()  # every process has checked the paths before the work folder changes
    if accelerator.is_main_process:  # only now, when everything given has been checked
        open_run(out, config, finished)
    accelerator.wait_for_everyone()
    replay, surrogates = plan.sets(accelerator)
    concept_set = plan.concept_set(accelerator) if config.adversarial else None
    fim_path = Path(config.fim) if config.fim else plan.fisher(replay, accelerator)
    if not config.fim:
        fisher_meta = load_fisher(fim_path, pipe, names=())[1]
    made_here = {f"surrogate {i + 1}": s for i, s in enumerate(surrogates[len(inherited):])}
    mismatches = check_origins(config, ref, pipe, fisher_meta, {"replay": replay, **made_here}, ancestors)
    # Every (concept, surrogate) pair, earlier ones first: its concept prompts and surrogate set.
    pairs = [{"concept": p["concept"], "concept_prompts": p["concept_prompts"], "inherited": True,
              **{k: p[k] for k in SURROGATE_SOURCES if p.get(k)}} for p in inherited]
    pairs += [{"concept": p["concept"], "concept_prompts": concept_prompts(split_concepts(p["concept"]), config.templates),
               "inherited": False, **{k: v for k, v in p.items() if k in SURROGATE_SOURCES and v}}
              for p in config.pairs()]
    distinct = list({id(image_set): image_set for image_set in surrogates}.values())  # pairs may share a set
    surrogate_latents, surrogate_conditioning = joined_sets(distinct)
    concepts = [prompt for p in pairs for prompt in p["concept_prompts"]]
    adversary = None
    if config.adversarial:  # its own float32 copies of the text encoders, made before the cast below
        adversary = Adversary(family, pipe, config, concept_set, accelerator.device)
    # The conditioning of every prompt is computed once; then neither the VAE nor the text
    # encoders run during training, and they leave the accelerator. Each image keeps the image
    # conditioning (SDXL's time ids) it was made with.
    text_encoders = family.loaded_text_encoders(pipe)
    for encoder in text_encoders:
        encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    concept_text = family.encode_text(pipe, concepts)
    replay_texts = sorted(set(replay.prompts))
    replay_text = embed_all(family, pipe, replay_texts, accelerator.is_main_process)
    position = {text: i for i, text in enumerate(replay_texts)}
    replay_text_index = torch.tensor([position[p] for p in replay.prompts])
    images = {name: to_device({k: conditioning[k] for k in family.image_keys}, accelerator.device)
              for name, conditioning in (("surrogate", surrogate_conditioning), ("replay", replay.conditioning))}
    pipe.vae.to("cpu")
    for encoder in text_encoders:
        encoder.to("cpu")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # What trains (the UNet's weights or LoRA adapters) and the penalty that holds it, with the
    # Fisher entries it needs, kept on the training device.
    trainable = make_trainable(unet, config, lambda names: load_fisher(fim_path, pipe, names)[0], accelerator.device)
    params, penalty = trainable.params, trainable.penalty
    started_at = fingerprint(params)  # a result identical to its start is no result
    if config.lora_rank and weight_dtype != torch.float32:
        # The frozen base in the mixed-precision dtype, as diffusers' LoRA training does: half the
        # memory; the adapters (and their optimizer) stay fp32.
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.enable_xformers:
        enable_xformers(unet)
    # Never scaled silently by the number of processes (the reference code's pitfall); --scale-lr
    # opts in to the linear scaling rule for the larger global batch.
    learning_rate = config.learning_rate * (accelerator.num_processes if config.scale_lr else 1)
    optimizer = make_optimizer(params, config, learning_rate)
    # Linear warm-up: a fresh AdamW's first steps move every weight by about the learning rate.
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (config.lr_warmup_steps + 1)))
    ema = None
    if config.ema_decay:  # of what trains
        ema = EMAModel(params, decay=config.ema_decay) if config.ema_warmup else ConstantDecayEMA(params, decay=config.ema_decay)
    if accelerator.is_main_process:
        print(preflight(unet, trainable, config, replay_text, ema is not None,
                        adversary.parameter_bytes if adversary else 0),
              flush=True)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    trainable.register_checkpointing(accelerator, unet)
    if ema is not None:
        ema.to(accelerator.device)
    # What checkpoints carry besides the weights and the optimizer (checkpoints.py, no pickle): the
    # schedule (stepped once per optimizer step), the EMA, and the adversary's token.
    carried = {name: obj for name, obj in (("lr_scheduler", lr_scheduler), ("ema", ema), ("adversary", adversary))
               if obj is not None}

    global_step = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        load_state(checkpoint, carried)
        global_step = checkpoint_step(checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {global_step}")
    elif config.resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {work / 'checkpoints'}: starting from step 0")

    starts = {id(s): sum(len(t.latents) for t in distinct[:i]) for i, s in enumerate(distinct)}
    image_spans = [(starts[id(image_set)], len(image_set.latents)) for image_set in surrogates]
    prompt_counts = [len(p["concept_prompts"]) for p in pairs]
    prompt_spans = [(sum(prompt_counts[:i]), n) for i, n in enumerate(prompt_counts)]
    shapes = {"surrogate": tuple(surrogate_latents.shape[1:]), "replay": tuple(replay.latents.shape[1:])}
    # The new pair (the last) gets the adversary's prompts.
    adversarial = (prompt_spans[-1], len(adversary.prompts), config.adversarial_share) if adversary else None
    inner = accelerator.unwrap_model(unet)  # the inner attack runs the model itself, outside DDP
    device, b = accelerator.device, config.train_batch_size
    last = {}
    bar = tqdm(total=config.max_train_steps, initial=global_step, desc="forgetting", unit="step",
               disable=not accelerator.is_main_process)
    unet.train()
    micro_step = global_step * config.gradient_accumulation_steps
    skipped = skipped_in_a_row = 0  # optimizer steps fp16's loss scaler skipped (inf/NaN gradients)
    try:
        while global_step < config.max_train_steps:
            # After a skipped step global_step is where it was: its round has been learned already.
            if (adversary is not None and micro_step % config.gradient_accumulation_steps == 0
                    and global_step % config.adversarial_every == 0 and not skipped_in_a_row):
                adversary.learn(inner, noise_scheduler, global_step, accelerator)
            with accelerator.accumulate(unet):
                d = draw_batch(config.seed, micro_step, accelerator.num_processes, accelerator.process_index, b,
                               image_spans, prompt_spans, len(replay.latents), shapes,
                               noise_scheduler.config.num_train_timesteps, adversarial)
                micro_step += 1
                x_s = surrogate_latents[d["surrogate_index"]].to(device)
                # The concept's prompts on the surrogate's images, with those images' own conditioning.
                c_text = take(concept_text, d["concept_index"].to(device))
                if adversary is not None:
                    c_text = adversary.stand_in(c_text, d["adversarial_index"].to(device))
                c_s = {**c_text, **take(images["surrogate"], d["surrogate_index"].to(device))}
                terms = [(x_s, d["surrogate_noise"], d["surrogate_t"], c_s)]
                if config.gamma > 0:
                    x_r = replay.latents[d["replay_index"]].to(device)
                    c_r = {**take(replay_text, replay_text_index[d["replay_index"]].to(device)),
                           **take(images["replay"], d["replay_index"].to(device))}
                    terms.append((x_r, d["replay_noise"], d["replay_t"], c_r))
                if len(terms) == 2 and shapes["surrogate"] == shapes["replay"]:
                    # One forward over surrogate + replay: same result as two, faster.
                    x, noise, t = (torch.cat(parts) for parts in zip(*[term[:3] for term in terms]))
                    cond = join(terms[0][3], terms[1][3])
                    losses = per_sample_loss(family, unet, noise_scheduler, x, noise.to(device), t.to(device), cond)
                    loss_s, loss_r = losses[:b].mean(), losses[b:].mean()
                else:
                    term_losses = [per_sample_loss(family, unet, noise_scheduler, x, n.to(device), t.to(device),
                                                   c).mean() for x, n, t, c in terms]
                    loss_s = term_losses[0]
                    loss_r = term_losses[1] if len(term_losses) == 2 else torch.zeros((), device=device)
                data_loss = loss_s + config.gamma * loss_r
                # The global batch's losses, averaged over processes: what is logged, and a NaN check
                # that every process agrees on, so all of them stop together.
                reported = accelerator.reduce(torch.stack([loss_s.detach(), loss_r.detach()]), reduction="mean")
                if not torch.isfinite(reported).all():
                    raise broken_run(f"the loss became {(reported[0] + config.gamma * reported[1]).item()}",
                                     global_step + 1, work, config)
                accelerator.backward(data_loss)
                if accelerator.sync_gradients:
                    accelerator.unscale_gradients()  # the penalty's gradient is added unscaled
                    log_step = (global_step + 1) % LOG_EVERY == 0 or global_step + 1 == config.max_train_steps or not last
                    value = penalty.add_grad_(with_value=log_step)  # the value's .item() syncs: not every step
                    if value is not None:
                        ewc = value.item()
                        if not math.isfinite(ewc):  # the whole objective is checked, EWC included
                            raise broken_run(f"the EWC penalty became {ewc}", global_step + 1, work, config)
                    if config.max_grad_norm:
                        # Already unscaled (and synced across processes): accelerator.clip_grad_norm_
                        # would unscale a second time under fp16.
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients and optimizer.step_was_skipped:
                # fp16: the loss scaler found inf/NaN gradients, left the weights as they were and lowered
                # its scale. Not a training step: the warm-up, the EMA and the count wait for one that is;
                # the next batches are fresh draws (micro_step counts on).
                skipped += 1
                skipped_in_a_row += 1
                if skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:
                    raise broken_run(f"the fp16 loss scale kept overflowing ({skipped_in_a_row} optimizer steps in a "
                                     "row skipped for inf/NaN gradients; rerun with --mixed-precision bf16)",
                                     global_step + 1, work, config)
                continue
            if accelerator.sync_gradients:
                skipped_in_a_row = 0
                global_step += 1
                lr_scheduler.step()
                if ema is not None:
                    ema.step(params)
                last = {"surrogate": reported[0].item(), "replay": reported[1].item(), "ewc": ewc}
                last["total"] = last["surrogate"] + config.gamma * last["replay"] + last["ewc"]
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()})
                first_batch(bar, 2 * b * accelerator.num_processes * config.gradient_accumulation_steps, "training")
                if global_step % config.checkpointing_steps == 0 and global_step < config.max_train_steps:
                    # Only finite weights are ever saved, so the last checkpoint is always a good one.
                    if not weights_finite(params + (ema.shadow_params if ema is not None else [])):
                        raise broken_run("the weights became non-finite (NaN or inf)", global_step, work, config)
                    if accelerator.is_main_process:
                        save_checkpoint(accelerator, work, global_step, config.checkpoints_total_limit, settings,
                                        carried)
    except torch.OutOfMemoryError:
        kept = find_checkpoint(work, "latest")
        raise out_of_memory_error(
            "training" + (" (or its inner attack)" if adversary is not None else ""), peak,
            ("add --gradient-checkpointing (same result) and --resume-from-checkpoint latest to go on from "
             f"{kept.name}; " if kept else "add --gradient-checkpointing (same result); ")
            + "--fim-dtype bf16, --use-8bit-adam or a smaller --train-batch-size change the training: start again "
              "with them" + (" and --overwrite" if kept else "")) from None
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
        ema.copy_to(params)  # the EMA weights are the result
    if not weights_finite(params):
        raise broken_run("the trained weights are non-finite (NaN or inf)", global_step, work, config)
    if torch.equal(fingerprint(params), started_at):
        raise UserError("training changed nothing: the weights that train are exactly where they started, so the "
                        f"result would be the base model. Likely cause: --learning-rate {config.learning_rate:g} too "
                        "small for float32 to move them" + (f", or --lora-alpha {config.lora_alpha_value():g}"
                                                             if config.lora_rank else ""))
    if adversary is not None and not weights_finite(adversary.rows):  # saved with the result
        raise broken_run("the adversary's token is non-finite (NaN or inf)", global_step, work, config)
    if accelerator.is_main_process:
        summary = {
            "architecture": family.name,
            "pipeline_class": family.pipeline,
            "steps": global_step,
            "skipped_steps": skipped,  # fp16 overflows since this run (or its resume) began; not in "steps"
            "final_losses": last,
            "trainable_parameters": sum(p.numel() for p in params),
            "num_processes": accelerator.num_processes,
            "global_batch_size": config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps,
            "learning_rate": learning_rate,
            "mixed_precision": accelerator.mixed_precision,
            "replay_set": recorded_path(replay.path, work),
            "replay_images": {"prompted": len(replay.prompts) - replay.prompts.count(""),
                              "unconditional": replay.prompts.count("")},
            "pairs": [{**{k: v for k, v in p.items() if k != "inherited"},
                       # what the concept now maps to: the set's prompt, or the folder of the user's images
                       "maps_to": image_set.manifest.get("images_dir") or image_set.prompts[0],
                       "surrogate_set": recorded_path(image_set.path, work), "earlier_run": p["inherited"]}
                      for p, image_set in zip(pairs, surrogates)],
            "concept_prompts": concepts,
            # cached: the Fisher lives in the amnesia-sd cache (made by this run or an earlier one).
            "fim": {"path": str(fim_path.resolve()), "cached": fim_path.resolve().is_relative_to(cache_dir().resolve()),
                    "made_now": plan.fim_made, "metadata": fisher_meta},
            "origin_mismatches": mismatches,
            "seconds": round(time.time() - started, 1),
        }
        if adversary is not None:
            summary["adversarial"] = {**adversary.record(), "concept_set": recorded_path(concept_set.path, work),
                                      "embedding": ADVERSARY_EMBEDDINGS}
            # The last round's token, in diffusers' textual-inversion format: try it on the result.
            save_file(adversary.embeddings(), str(work / ADVERSARY_EMBEDDINGS))
        if earlier:  # the whole sequence, oldest first; each entry is that run's own record
            summary["history"] = [*earlier.get("history", []), {k: v for k, v in earlier.items() if k != "history"}]
        write_result(work, ref, trained, trainable, config, summary)
        publish(work, out, FINISHED)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


