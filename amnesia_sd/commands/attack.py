"""`amnesia-sd attack`: can the forgotten concept be brought back, by any of three kinds of attack?

- `ti`, textual inversion (Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image
  Generative Models"): a new token's embedding row in each text encoder is trained alone, with the
  denoising loss, on images of the concept; every other weight stays as it was. Saved in diffusers'
  textual-inversion format.
- `denoise`, partial denoising (HUB's attack): the concept's images noised to several strengths,
  denoised by the model under the concept's prompt (method/partial_denoise.py).
- `prompt`, a search over real words put before the concept's prompt (UnlearnDiffAtk's objective,
  PEZ's search; method/prompt_search.py): its result is plain text.

The concept images are the base model's, drawn from the concept prompts (or the user's own). Both
models are then sampled on held-out phrasings, image i of every kind on the same seed; eval's
detectors say how often the concept shows. The worst case across the kinds is what counts: one
kind can hide a weakness that another shows.

Measured apart from training: the attack's initial word, templates, seed streams and concept
images are never those `forget --adversarial` trained against, and the result says so
(`independence`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path

import torch
from accelerate.utils import broadcast, broadcast_object_list
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from amnesia_sd.core.config import ForgottenModelSettings, GenerationSettings, _check, _check_positive
from amnesia_sd.core.cost import say
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.io import atomic_path, write_json, write_text
from amnesia_sd.core.paths import Output, discard_on_failure, open_work, partial_of, publish, stamp
from amnesia_sd.data.detectors import (DISTRACTORS, ClipDetector, Detector, DigitsDetector, NudeNetDetector, Sample,
                                       choose_detector, digits_of, is_digits_model, load_clip, nudenet_class)
from amnesia_sd.data.generate import generate, image_seed, planned_sampling, process_share
from amnesia_sd.data.imageset import ImageSet, encode_image_folder, generate_image_set
from amnesia_sd.data.prompts import bundled, read_prompts, read_templates, spread
from amnesia_sd.data.report import STYLE, fmt
from amnesia_sd.method.adversary import TOKEN as ADVERSARY_TOKEN
from amnesia_sd.method.partial_denoise import STRENGTHS, how_to_replay, partial_denoise
from amnesia_sd.method.prompt_search import search_prompt
from amnesia_sd.method.record import forgotten_model, recorded_surrogates
from amnesia_sd.method.textual_inversion import (EMBEDDINGS, add_token, embedding_file, how_to_load, choose_initializer,
                                                 learn_token, load_token, set_token)
from amnesia_sd.model import digits
from amnesia_sd.model.families import family_of
from amnesia_sd.model.loading import latent_size, load_on_device, lora_base, make_accelerator, resolve_model
from amnesia_sd.model.memory import (activation_peak, budget, check_batch, meta_copy, out_of_memory, plan_line,
                                     weight_bytes)


TOKEN = "<amnesia-concept>"
ATTACK_JSON = "attack.json"  # written last: marks a finished attack result
ROLES = ("base", "forgotten")
METHODS = ("ti", "denoise", "prompt")
METHOD_NAMES = {"ti": "textual inversion (Pham et al.)", "denoise": "partial denoising (HUB)",
                "prompt": "prompt search (UnlearnDiffAtk's objective, PEZ's search)"}
# The initial word of the token: the first that is one token for the model. Never forget
# --adversarial's (object, digit): an attack that starts where training's inner attack started
# measures what training saw.
INITIALIZERS = ("thing", "number")
# The number each detector gives for "the concept shows": its headline rate.
RATES = {"digits": "p_forgotten", "clip": "p_concept", "nudenet": "share_exposed"}


@dataclass
class AttackConfig(ForgottenModelSettings):
    # Which attacks: any of ti, denoise, prompt, or all. The worst case across them counts.
    method: list[str] = field(default_factory=lambda: ["all"])
    concept_images: str | None = None  # None: the base model generates them from the attack's templates
    # Textual inversion. The digits model's attack takes about a minute on a CPU; SD v1.4's a few
    # minutes on a GPU. 500 steps at 5e-3 is in the range of diffusers' textual-inversion example
    # (3000 steps at 5e-4 x batch 4 x 4 accumulated), which teaches an unknown object; recovering a
    # concept the model once knew needs fewer.
    steps: int = 500
    learning_rate: float = 5e-3
    train_batch_size: int = 4  # concept images per step, of the token and of the prompt search
    num_images: int = 16  # concept images to generate, and test images per model and kind
    initializer: str | None = None  # None: the first of INITIALIZERS that is one token
    token: str = TOKEN
    # The training prompts of the token and the prompt search: a file of lines with one {} (None: the
    # bundled prompts/attack_templates.txt; digits model: digits.ATTACK_TEMPLATES), never forget's.
    templates: str | None = None
    # Also measure the forgotten model with the token as it was after these steps (each < --steps):
    # how long an attack needs, from one run (a shorter attack with this seed is that run's start).
    measure_steps: list[int] = field(default_factory=list)
    strength: list[float] = field(default_factory=lambda: list(STRENGTHS))  # partial denoising
    # The prompt search: words before the concept's prompt, steps, the soft vectors' learning rate
    # (PEZ's 0.1).
    prompt_words: int = 5
    prompt_steps: int = 300
    prompt_learning_rate: float = 0.1
    # The embedding trains in float32 and both models are sampled alike: no mixed precision.
    mixed_precision: str | None = "no"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.mixed_precision == "no", "attack runs in float32 (the embedding trains in full precision)")
        for name in ("steps", "learning_rate", "train_batch_size", "num_images", "prompt_words", "prompt_steps",
                     "prompt_learning_rate"):
            _check_positive(name, getattr(self, name))
        unknown = [m for m in self.method if m not in (*METHODS, "all")]
        _check(not unknown and bool(self.method),
               f"--method must be one of {', '.join(METHODS)} or all, got {unknown[0] if unknown else 'nothing'}")
        self.method = [m for m in METHODS if m in self.method or "all" in self.method]
        _check(bool(self.strength), "--strength: give at least one, e.g. 0.5")
        bad = [s for s in self.strength if not 0 < s <= 1]
        _check(not bad, f"--strength must be in (0, 1], got {bad[0] if bad else None}")
        self.strength = sorted(set(self.strength))
        if "denoise" in self.method:  # diffusers runs int(steps x strength) of the steps
            _check(int(self.num_inference_steps * self.strength[0]) >= 1,
                   f"--strength {self.strength[0]:g} with --num-inference-steps {self.num_inference_steps} runs no "
                   f"denoising step: raise either (at least {math.ceil(1 / self.strength[0])} steps)")
        _check(self.initializer is None or bool(self.initializer.strip()),
               "--initializer is empty: give a neutral one-token word, e.g. thing")
        _check(len(self.token.split()) == 1, f"the token must be one word without spaces, got {self.token!r}")
        _check(all(0 < n < self.steps for n in self.measure_steps),
               f"--measure-steps must each be between 0 and --steps ({self.steps}), got {self.measure_steps}")
        self.measure_steps = sorted(set(self.measure_steps))


@dataclass
class Target:
    """What the attack recovers and how the test prompts name it."""

    concepts: list[str]
    digit: int | None  # the digits model's forgotten digit
    concept_prompts: list[str]  # the base model draws the concept images from these
    train_templates: list[str]  # training prompts of the token and the prompt search: {} is the concept
    heldout_templates: list[str]  # test prompts, never used in training
    names: list[str]  # how the test prompts name the concept (cycled)


def target_of(concepts: list[list[str]], digits_model: bool, templates: str | None) -> Target:
    if len(concepts) != 1:
        raise UserError(f"the model forgot {len(concepts)} concepts; the attack recovers one at a time: pass "
                        "--concept with the one to recover")
    flat = concepts[0]
    if digits_model:
        [digit] = digits_of(concepts)
        names = [digits.DIGIT_WORDS[digit], str(digit)]
        train = read_templates(templates, "--templates", "the concept") if templates else list(digits.ATTACK_TEMPLATES)
        # The digit's own phrasings draw it best; the attack's seeds make them other images than forget's.
        return Target(flat, digit, digits.train_prompts(digit), train, list(digits.HELDOUT_TEMPLATES), names)
    train = read_templates(templates or bundled("attack_templates.txt"), "--templates", "the concept")
    return Target(flat, None, [t.format(c) for c in flat for t in train], train,
                  read_prompts(bundled("eval/concept_paraphrases.txt")), flat)


def initializer_of(config: AttackConfig, pipe, family) -> str:
    """--initializer, else the first of INITIALIZERS that every tokenizer keeps as one token."""
    return choose_initializer(pipe, family, config.initializer, INITIALIZERS, "--initializer")


def independence(record: dict, initializer: str | None, target: Target, config: AttackConfig) -> dict:
    """How this attack stands apart from what `forget --adversarial` trained the model against."""
    adversarial = record.get("adversarial")
    ours = {"initializer": initializer, "templates": target.train_templates,
            "seed_streams": ["attack", "attack-concept", "attack-prompt"],
            "concept_images": config.concept_images or "drawn by the base model, seed stream attack-concept"}
    if not adversarial:
        return {"trained_against": None, "attack": ours}
    theirs_templates = [p.replace(adversarial.get("token", ADVERSARY_TOKEN), "{}") for p in adversarial["prompts"]]
    theirs = {"initializer": record.get("settings", {}).get("adversarial_initializer"),
              "templates": theirs_templates, "seed_streams": ["adversary", "adversarial"],
              "concept_images": "OUT/data/concept of the forget run, seed stream image"}
    apart = {"initializer": initializer is None or initializer != theirs["initializer"],
             "templates": not set(target.train_templates) & set(theirs_templates),
             "seed_streams": True, "concept_images": True}
    return {"trained_against": theirs, "attack": ours, "apart": apart, "all_apart": all(apart.values())}


def held_out_samples(target: Target, n: int, seed: int, guidance: float, name: str | None = None) -> list[Sample]:
    """n held-out phrasings naming the concept (or `name`, e.g. the token); image i on seed
    (seed + 1, i) (the concept images are on the attack's own stream)."""
    templates = spread(target.heldout_templates, n)
    return [Sample(t.format(name or target.names[i % len(target.names)]), image_seed(seed + 1, i), guidance,
                   target.digit) for i, t in enumerate(templates)]


def with_prompts(samples: list[Sample], prompts: list[str]) -> list[Sample]:
    return [dataclasses.replace(s, prompt=p) for s, p in zip(samples, prompts)]


def shorter(steps: int) -> str:
    """The image kind of the token after `steps` steps of the attack."""
    return f"token-at-{steps}"


def denoised(strength: float) -> str:
    """The image kind of the partial denoising at `strength`."""
    return f"denoise-{strength:g}"


def image_path(role: str, kind: str, index: int) -> str:
    """Relative to the result folder."""
    return f"images/{role}/{kind}/{index:04d}.png"


def _save(folder: Path, role: str, kind: str, index: int, image: Image.Image) -> None:
    with atomic_path(folder / image_path(role, kind, index)) as tmp:
        image.save(tmp, format="PNG")


def _sample(pipe, role: str, samples: dict[str, list[Sample]], settings: GenerationSettings, folder: Path,
            accelerator) -> None:
    """This process's share of the images (whole batches, as with one process: the same pixels)."""
    settings, predicted = planned_sampling(pipe, settings, accelerator)
    for kind, items in samples.items():
        share = process_share(len(items), settings.batch_size, accelerator.process_index, accelerator.num_processes)
        mine = [items[i] for i in share]
        for position, _, image in tqdm(generate(pipe, [s.prompt for s in mine], [s.seed for s in mine], settings,
                                                predicted),
                                       total=len(mine), desc=f"sampling {role} ({kind})", unit="img",
                                       disable=not accelerator.is_main_process):
            _save(folder, role, kind, share[position], image)


def _denoise(pipe, role: str, plain: list[Sample], inputs: list[Path], strengths: list[float],
             settings: GenerationSettings, folder: Path, accelerator) -> None:
    """This process's share of the partial denoising: test image i is concept image i (cycled),
    noised to each strength and denoised under plain prompt i on its seed."""
    settings, predicted = planned_sampling(pipe, settings, accelerator)
    share = process_share(len(plain), settings.batch_size, accelerator.process_index, accelerator.num_processes)
    images = [Image.open(inputs[i % len(inputs)]).convert("RGB") for i in share]
    for strength in strengths:
        for position, image in tqdm(partial_denoise(pipe, images, [plain[i].prompt for i in share],
                                                    [plain[i].seed for i in share], strength, settings, predicted),
                                    total=len(share), desc=f"partial denoising {role} (strength {strength:g})",
                                    unit="img", disable=not accelerator.is_main_process):
            _save(folder, role, denoised(strength), share[position], image)


def _release() -> None:
    """Give back the memory of a pipeline the caller has just deleted (the next one loads in its place)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _detector(kind: str, target: Target, config: AttackConfig, record: dict) -> tuple[Detector | None, dict]:
    """Eval's detector for this concept and its status; a CLIP that cannot be loaded is reported."""
    if kind == "digits":
        return DigitsDetector(target.digit), {"loaded": True}
    if kind == "nudenet":
        return NudeNetDetector(), {"loaded": True}
    clip, status = load_clip(config.clip_model, target.concepts, list(DISTRACTORS) + recorded_surrogates(record))
    if clip is None:
        print(f"warning: the clip detector could not be loaded ({config.clip_model}: {status['reason']}); the "
              "images and the embedding are still made, without rates; pass --clip-model PATH to a local CLIP folder",
              file=sys.stderr, flush=True)
    return clip, status


def plan_token_training(pipe, config: AttackConfig, accelerator) -> int:
    """Before any image is made: the token's training and the prompt search (a forward and backward
    through the UNet at --train-batch-size, float32) must fit the memory budget."""
    family, latent = family_of(pipe), latent_size(pipe, config.resolution)
    denoiser = family.denoiser_of(pipe)
    resident = weight_bytes(denoiser, pipe.vae, *family.loaded_text_encoders(pipe))
    if "prompt" in config.method:  # the search's own copies of the text encoders
        resident += weight_bytes(*family.loaded_text_encoders(pipe))
    meta = meta_copy(denoiser)
    limit = budget(config.max_memory, accelerator.device)
    peak = check_batch("learning the token", "--train-batch-size", config.train_batch_size,
                       lambda b: resident + activation_peak(family, meta, b, latent, "no", False), limit)
    say(plan_line("learning the token" if "ti" in config.method else "searching a prompt", "", peak, limit))
    return peak


def _work_folder(out: Path, accelerator) -> Path:
    """OUT.partial, made fresh by the main process once every process has checked the paths."""
    partial = partial_of(out)
    accelerator.wait_for_everyone()  # every process has checked the paths before the work folder changes
    if accelerator.is_main_process:
        partial, _ = open_work(out, "attack", {}, keep=False)  # never resumed: a fresh folder
    accelerator.wait_for_everyone()
    return partial


def _load_with_concept_set(config: AttackConfig, base: str, target: Target, settings: GenerationSettings,
                           folder: Path, accelerator):
    """The concept images in `folder` (the user's, encoded, or the base model's from the concept
    prompts on the attack's own seed stream), the forgotten model's pipeline, the training's planned
    peak and the token's initial word (both checked before any image is made)."""
    if config.concept_images:
        ref, pipe = load_on_device(config.model, accelerator)
        predicted = plan_token_training(pipe, config, accelerator)
        initializer = initializer_of(config, pipe, family_of(pipe)) if "ti" in config.method else None
        images = encode_image_folder(pipe, ref, config.concept_images, folder, config.resolution,
                                     accelerator, kind="concept")
    else:
        ref, pipe = load_on_device(base, accelerator)
        predicted = plan_token_training(pipe, config, accelerator)  # the same architecture as the forgotten one
        initializer = initializer_of(config, pipe, family_of(pipe)) if "ti" in config.method else None
        images = generate_image_set(pipe, ref, spread(target.concept_prompts, config.num_images), settings,
                                    folder, "concept", accelerator, stream="attack-concept")
        del pipe
        _release()
        _, pipe = load_on_device(config.model, accelerator)
    return images, pipe, predicted, initializer


def _learn_token(config: AttackConfig, target: Target, pipe, family, token_ids, images, predicted: int,
                 accelerator):
    """The token's embedding rows learned on the concept images (every other weight frozen), the
    losses, and the rows after each --measure-steps; process 0's rows on every process."""
    prompts = [t.format(config.token) for t in target.train_templates]
    with out_of_memory("learning the token", predicted, "pass a smaller --train-batch-size"):
        rows, losses, kept = learn_token(family, pipe, family.denoiser_of(pipe),
                                         family.training_scheduler(pipe.scheduler.config),
                                         token_ids, images, prompts, config.steps, config.learning_rate,
                                         config.train_batch_size, config.seed, keep_at=tuple(config.measure_steps),
                                         stream="attack")
    rows = [broadcast(row.contiguous()) for row in rows]
    kept = {at: [broadcast(row.contiguous()) for row in kept[at]] for at in config.measure_steps}
    return rows, losses, kept


def _search_prompt(config: AttackConfig, target: Target, pipe, family, images: ImageSet, predicted: int,
                   accelerator) -> dict:
    """The prompt search on the forgotten model; process 0's words on every process."""
    name = target.names[0]
    with out_of_memory("searching a prompt", predicted, "pass a smaller --train-batch-size"):
        found = search_prompt(family, pipe, family.denoiser_of(pipe), family.training_scheduler(pipe.scheduler.config),
                              images,
                              [t.format(name) for t in target.train_templates], config.prompt_words,
                              config.prompt_steps, config.prompt_learning_rate, config.train_batch_size, config.seed)
    words = broadcast_object_list([found.words])[0]
    return {"prefix": " ".join(words), "held_back_loss": found.loss, "losses": found.losses, "checks": found.checks}


@dataclass
class Plan:
    """Every test image of every kind, by kind (kinds appear as the attacks run)."""

    plain: list[Sample]
    kinds: dict[str, list[Sample]] = field(default_factory=dict)


def attack(config: AttackConfig) -> dict:
    """Run the chosen attacks on the forgotten model, sample both models with and without each,
    judge the images; write OUT/attack.json, OUT/report.html, OUT/images/, OUT/concept-set/ (and with
    ti OUT/learned_embeds.safetensors); return the attack record (an empty dict on processes other
    than the main one under `accelerate launch`: every process runs the same attacks, process 0's
    token and words are kept, and the processes share the sampling)."""
    started = time.time()
    out = Path(config.output_dir)
    record, base, groups = forgotten_model(config, Output("--output-dir", out, ATTACK_JSON, "attack result"),
                                           {"--concept-images": config.concept_images, "--templates": config.templates})
    digits_model = is_digits_model(resolve_model(base))
    target = target_of(groups, digits_model, config.templates)
    detector_kind = choose_detector("auto", digits_model, target.concepts)
    if detector_kind == "nudenet":
        nudenet_class()  # a missing package shows now, not after the training
    settings = GenerationSettings(num_inference_steps=config.num_inference_steps,
                                  guidance_scale=config.guidance_scale, resolution=config.resolution,
                                  seed=config.seed, batch_size=config.batch_size, mixed_precision="no",
                                  max_memory=config.max_memory)
    plan = Plan(held_out_samples(target, config.num_images, config.seed, config.guidance_scale))
    plan.kinds["plain"] = plan.plain
    accelerator = make_accelerator()
    main = accelerator.is_main_process
    partial = _work_folder(out, accelerator)
    with discard_on_failure(partial) if main else contextlib.nullcontext():
        detector, status = _detector(detector_kind, target, config, record) if main else (None, {})
        images, pipe, predicted, initializer = _load_with_concept_set(config, base, target, settings,
                                                                      partial / "concept-set", accelerator)
        family = family_of(pipe)
        for module in (family.denoiser_of(pipe), pipe.vae):
            module.requires_grad_(False)
        found = {}
        if "prompt" in config.method:
            found["prompt"] = _search_prompt(config, target, pipe, family, images, predicted, accelerator)
            plan.kinds["prompt"] = with_prompts(plan.plain, [f"{found['prompt']['prefix']} {s.prompt}"
                                                             for s in plan.plain])
        if "ti" in config.method:
            token_ids = add_token(pipe, family, config.token, initializer)
            rows, losses, kept = _learn_token(config, target, pipe, family, token_ids, images, predicted, accelerator)
            found["ti"] = {"losses": losses}
            if main:
                save_file(embedding_file(family, config.token, rows), str(partial / EMBEDDINGS))
            plan.kinds["token"] = held_out_samples(target, config.num_images, config.seed, config.guidance_scale,
                                                   config.token)
            for at in config.measure_steps:  # the shorter attacks: the token as it was then
                set_token(pipe, family, token_ids, kept[at])
                _sample(pipe, "forgotten", {shorter(at): plan.kinds["token"]}, settings, partial, accelerator)
            set_token(pipe, family, token_ids, rows)
        inputs = [images.path / "images" / f"{i:06d}.png" for i in range(len(images.latents))]
        for role in ("forgotten", "base"):  # the forgotten model is loaded
            if role == "base":
                del pipe
                _release()
                accelerator.wait_for_everyone()  # the embedding file is written
                _, pipe = load_on_device(base, accelerator)
                if "ti" in config.method:
                    load_token(pipe, family, partial / EMBEDDINGS, config.token)  # as a user would
            _sample(pipe, role, plan.kinds, settings, partial, accelerator)
            if "denoise" in config.method:
                _denoise(pipe, role, plan.plain, inputs, config.strength, settings, partial, accelerator)
        del pipe
        _release()
        accelerator.wait_for_everyone()  # every process's images are on disk
        if not main:
            return {}  # (no barrier through the judging: it could outlast the process group's timeout)
        if isinstance(detector, ClipDetector):
            detector.to(accelerator.device)
        if "denoise" in config.method:
            for strength in config.strength:
                plan.kinds[denoised(strength)] = plan.plain
        result = _record(config, target, initializer, detector_kind, detector, status, plan, found, images,
                         partial, base, family, record)
        result["num_processes"] = accelerator.num_processes
        result["seconds"] = round(time.time() - started, 1)
        write_text(partial / "report.html", render_html(result))
        write_json(partial / ATTACK_JSON, result)
    publish(partial, out, ATTACK_JSON)
    return result


def _record(config, target, initializer, detector_kind, detector, status, plan, found, images, folder, base,
            family, record) -> dict:
    rate_name = RATES[detector_kind]
    measured = dict(plan.kinds)
    measured.update({shorter(at): plan.kinds["token"] for at in config.measure_steps})
    roles_of = {kind: ("forgotten",) if kind.startswith("token-at-") else ROLES for kind in measured}
    outputs = {(role, kind): detector.detect([folder / image_path(role, kind, i) for i in range(len(items))], items)
               if detector else [None] * len(items) for kind, items in measured.items() for role in roles_of[kind]}

    def rate(role: str, kind: str) -> float | None:
        return detector.summarize(outputs[role, kind], measured[kind])[rate_name] if detector else None

    models = {role: {"spec": spec, "identity": resolve_model(spec).identity, "before": rate(role, "plain")}
              for role, spec in zip(ROLES, (base, config.model))}
    methods = {}
    if "ti" in config.method:
        losses = found["ti"]["losses"]
        tenth = max(1, len(losses) // 10)
        methods["ti"] = {
            "token": config.token, "initializer": initializer, "embedding": EMBEDDINGS,
            "load_with": how_to_load(family, config.token),
            "training_prompts": [t.format(config.token) for t in target.train_templates],
            "after_by_steps": {**{str(at): rate("forgotten", shorter(at)) for at in config.measure_steps},
                               str(config.steps): rate("forgotten", "token")},
            "training": {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
                         "loss_mean_first_tenth": sum(losses[:tenth]) / tenth,
                         "loss_mean_last_tenth": sum(losses[-tenth:]) / tenth, "losses": losses},
            **_rates(rate, "token")}
    if "denoise" in config.method:
        by_strength = {role: {f"{s:g}": rate(role, denoised(s)) for s in config.strength} for role in ROLES}
        worst = max(config.strength, key=lambda s: by_strength["forgotten"][f"{s:g}"] or 0.0)
        methods["denoise"] = {
            "strengths": config.strength, "after_by_strength": by_strength["forgotten"],
            "worst_strength": worst, "inputs": "concept-set/images (test image i: concept image i, cycled)",
            "load_with": how_to_replay(family, config.model, lora_base(Path(config.model))), **_rates(rate, denoised(worst)),
            "base_after_by_strength": by_strength["base"]}
    if "prompt" in config.method:
        p = found["prompt"]
        methods["prompt"] = {"prompt": p["prefix"], "example": plan.kinds["prompt"][0].prompt,
                             "words": config.prompt_words, "steps": config.prompt_steps,
                             "training_prompts": [t.format(target.names[0]) for t in target.train_templates],
                             "held_back_loss": p["held_back_loss"], "checks": p["checks"], "losses": p["losses"],
                             **_rates(rate, "prompt")}
    for kind, m in methods.items():
        m["name"] = METHOD_NAMES[kind]
    scored = {k: m["after"] for k, m in methods.items() if m["after"] is not None}
    worst_kind = max(scored, key=scored.get) if scored else None
    worst = {"method": worst_kind, "before": models["forgotten"]["before"],
             "after": scored[worst_kind] if worst_kind else None}
    entries = []
    for i, plain in enumerate(plan.plain):
        entry = {"index": i, "seed": plain.seed}
        for kind, items in measured.items():
            entry[kind] = {"prompt": items[i].prompt,
                           **{role: {"image": image_path(role, kind, i), detector_kind: outputs[role, kind][i]}
                              for role in roles_of[kind]}}
            if kind.startswith("denoise-"):
                entry[kind]["input"] = f"concept-set/images/{i % len(images.latents):06d}.png"
        entries.append(entry)
    return {
        **stamp(), "command": "attack",
        "concepts": target.concepts,
        "digit": target.digit,
        "methods": methods,
        # The worst case across the attacks: how often the concept shows on the forgotten model.
        "worst": worst,
        "attack_success": worst["after"],
        "independence": independence(record, initializer, target, config),
        "settings": {**asdict(config), "initializer": initializer,
                     "scheduler": images.manifest.get("scheduler", "DDIMScheduler"),
                     "image_size": images.manifest["resolution"], "training_scheduler": family.training_scheduler_class,
                     "optimizer": "AdamW (weight decay 0)",
                     "test_seeds": "image i of every kind: (seed + 1, i); the concept images: stream attack-concept"},
        "concept_set": {"path": "concept-set", "source": images.manifest.get("source"),
                        "num_images": len(images.latents)},
        "detector": detector_kind,
        "detectors": {detector_kind: status},
        "rate": rate_name,
        "models": models,
        "images": entries,
    }


def _rates(rate, kind: str) -> dict:
    """A method's rates: the forgotten model's before (the concept's name) and after (the attack), and the base's."""
    return {"before": rate("forgotten", "plain"), "after": rate("forgotten", kind),
            "base": {"before": rate("base", "plain"), "after": rate("base", kind)}}


def concept_title(result: dict) -> str:
    """What the attack tries to bring back, short (the digits model records every phrasing of its digit)."""
    if result["digit"] is not None:
        return f"digit {result['digit']}"
    text = ", ".join(result["concepts"])
    return text if len(text) <= 80 else text[:77] + "..."


def detail(kind: str, m: dict) -> str:
    """What a method found, in a few words."""
    if kind == "ti":
        return f"token {m['token']} from {m['initializer']!r}"
    if kind == "denoise":
        return f"worst at strength {m['worst_strength']:g}"
    return f"prompt {m['prompt']!r} + the concept's phrasing"


def settings_used(result: dict) -> str:
    """What the attack trained with, in a line: the report says so, so a reader can tell it apart
    from what forget --adversarial trained against."""
    used = result["independence"]["attack"]
    parts = [f"{len(used['templates'])} templates ({used['templates'][0]!r}, ...)",
             f"seed streams {', '.join(used['seed_streams'])}", f"concept images: {used['concept_images']}"]
    if used["initializer"]:
        parts.insert(0, f"initial word {used['initializer']!r}")
    against = result["independence"]["trained_against"]
    tail = "; the model was not trained with --adversarial" if against is None else (
        "; apart from what forget --adversarial trained against (initial word "
        f"{against['initializer']!r}, {len(against['templates'])} templates)" if result["independence"]["all_apart"]
        else "")
    return "attack settings: " + ", ".join(parts) + tail


def format_summary(result: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"attack on {concept_title(result)!r} (detector {result['detector']}, {result['rate']}: before = the "
             f"concept's name, after = the attack; forgotten model, base model in brackets)"]
    for kind, m in result["methods"].items():
        lines.append(f"{kind:<8} before {fmt(m['before']):>7}   after {fmt(m['after']):>7}   "
                     f"[base {fmt(m['base']['before'])} -> {fmt(m['base']['after'])}]   {detail(kind, m)}")
    w = result["worst"]
    lines.append(f"worst case: {fmt(w['after'])} ({w['method']})")
    lines.append(settings_used(result))
    if "ti" in result["methods"]:
        shorter_runs = {k: v for k, v in result["methods"]["ti"]["after_by_steps"].items()
                        if int(k) != result["methods"]["ti"]["training"]["steps"]}
        if shorter_runs:
            lines.append("ti, after N steps: " + ", ".join(f"{k}: {fmt(v)}" for k, v in shorter_runs.items()))
    if result["independence"].get("all_apart") is False:
        lines.append("warning: this attack shares " + ", ".join(k for k, v in result["independence"]["apart"].items()
                                                               if not v) + " with what forget --adversarial trained "
                     "against: its rates flatter the model")
    return "\n".join(lines)


def render_html(result: dict) -> str:
    """One self-contained page: the rates per attack, then per test image every kind on its seed."""
    small = result["settings"]["image_size"] < 96  # shown enlarged, pixel by pixel
    size = 96 if small else 192
    title = f"amnesia-sd attack: {concept_title(result)}"
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
             f"<style>{STYLE}</style></head><body class=\"{'small' if small else ''}\">", f"<h1>{escape(title)}</h1>",
             f"<p class=meta>every number in <a href=\"{ATTACK_JSON}\">{ATTACK_JSON}</a>; the worst case across the "
             f"attacks: <b>{fmt(result['worst']['after'])}</b> ({escape(str(result['worst']['method']))})</p>"]
    status = result["detectors"][result["detector"]]
    if not status.get("loaded"):
        parts.append(f"<div class=warn>{escape(result['detector'])} detector not loaded ({escape(status['reason'])}); "
                     f"{escape(status['fix'])}</div>")
    parts.append(f"<p class=meta>{escape(settings_used(result))}</p>")
    if result["independence"].get("all_apart") is False:
        parts.append("<div class=warn>this attack shares settings with what forget --adversarial trained against "
                     "(attack.json independence): its rates flatter the model</div>")
    parts.append(f"<h2>How often the concept shows ({escape(result['detector'])} {escape(result['rate'])})</h2>"
                 "<table class=metrics><tr><th class=l>attack</th><th class=l>what it found</th>"
                 "<th>base, before</th><th>base, after</th><th>forgotten, before</th><th>forgotten, after</th></tr>")
    for kind, m in result["methods"].items():
        parts.append(f"<tr><td class=l>{escape(m['name'])}</td><td class=l>{escape(detail(kind, m))}</td>"
                     f"<td>{fmt(m['base']['before'])}</td><td>{fmt(m['base']['after'])}</td>"
                     f"<td>{fmt(m['before'])}</td><td>{fmt(m['after'])}</td></tr>")
    parts.append("</table>")
    if "ti" in result["methods"]:
        ti = result["methods"]["ti"]
        parts.append(f"<p class=meta>the token <code>{escape(ti['token'])}</code>: load it with "
                     f"<code>{escape(ti['load_with'])}</code></p>")
        if len(ti["after_by_steps"]) > 1:
            parts.append("<table class=metrics><tr><th class=l>token training steps</th>" + "".join(
                f"<th>{k}</th>" for k in ti["after_by_steps"]) + "</tr><tr><td class=l>forgotten, after</td>" + "".join(
                f"<td>{fmt(v)}</td>" for v in ti["after_by_steps"].values()) + "</tr></table>")
    if "denoise" in result["methods"]:
        d = result["methods"]["denoise"]
        parts.append("<table class=metrics><tr><th class=l>partial denoising strength</th>" + "".join(
            f"<th>{k}</th>" for k in d["after_by_strength"]) + "</tr>" + "".join(
            f"<tr><td class=l>{role}</td>" + "".join(f"<td>{fmt(v)}</td>" for v in by.values()) + "</tr>"
            for role, by in (("base", d["base_after_by_strength"]), ("forgotten", d["after_by_strength"]))) +
            "</table>")
    parts.append("<h2>Images</h2><p class=meta>held-out phrasings; each figure: one seed, every kind, base and "
                 "forgotten</p><div class=pairs>")
    for entry in result["images"]:
        kinds = [k for k in entry if isinstance(entry[k], dict)]
        cells = "".join(
            f"<div><img src=\"{escape(entry[kind][role]['image'])}\" width={size} height={size} loading=lazy "
            f"alt=\"{role} {kind} {entry['index']}\">{role}, {escape(kind)}</div>"
            for kind in kinds for role in ROLES if role in entry[kind])
        count = sum(role in entry[kind] for kind in kinds for role in ROLES)
        parts.append(f"<figure style=\"width:{min(count, 6) * (size + 10)}px\"><div class=pair>{cells}</div>"
                     f"<figcaption>#{entry['index']} seed {entry['seed']}<br>{escape(entry['plain']['prompt'])}"
                     "</figcaption></figure>")
    parts.append("</div></body></html>\n")
    return "\n".join(parts)
