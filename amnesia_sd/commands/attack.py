"""`amnesia-sd attack`: can the forgotten concept be brought back?

Textual-inversion recovery (Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image
Generative Models"): a new token is added to the forgotten model's tokenizer(s) and only its
embedding row in each text encoder (SDXL: both) is trained, with the denoising loss, on images of the concept (made by the base model from the
concept prompts, or the user's own). Every other weight stays exactly as it was. Both models are
then sampled on held-out phrasings, with the concept's name (before the attack) and with the learned
token (after it), on the same seeds, and eval's detectors say how often the concept shows.

The embedding is saved in diffusers' textual-inversion format, so
`pipe.load_textual_inversion("R/learned_embeds.safetensors", token=TOKEN)` reproduces the images
(SDXL: the file's clip_l and clip_g, one call per text encoder). `learn_token` is also the inner
loop of forget --adversarial.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path

import torch
from accelerate.utils import broadcast
from diffusers import DDPMScheduler
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
from amnesia_sd.data.imageset import encode_image_folder, generate_image_set
from amnesia_sd.data.prompts import bundled, concept_prompts, read_prompts, spread
from amnesia_sd.data.report import STYLE, fmt
from amnesia_sd.method.record import forgotten_model, recorded_surrogates
from amnesia_sd.method.textual_inversion import (EMBEDDINGS, add_token, embedding_file, how_to_load, learn_token,
                                                 load_token, set_token)
from amnesia_sd.model import digits
from amnesia_sd.model.families import family_of
from amnesia_sd.model.loading import latent_size, load_on_device, make_accelerator, resolve_model
from amnesia_sd.model.memory import (activation_peak, budget, check_batch, meta_copy, out_of_memory, plan_line,
                                     weight_bytes)


TOKEN = "<amnesia-concept>"
ATTACK_JSON = "attack.json"  # written last: marks a finished attack result
ROLES = ("base", "forgotten")
KINDS = ("plain", "token")  # the concept's name (before the attack), the learned token (after it)
# The number each detector gives for "the concept shows": its headline rate.
RATES = {"digits": "p_forgotten", "clip": "p_concept", "nudenet": "share_exposed"}


@dataclass
class AttackConfig(ForgottenModelSettings):
    concept_images: str | None = None  # None: the base model generates them from the concept prompts
    # Defaults: the digits model's attack takes about a minute on a CPU; SD v1.4's a few minutes on a
    # GPU. 500 steps at 5e-3 is in the range of diffusers' textual-inversion example (3000 steps at
    # 5e-4 x batch 4 x 4 accumulated), which teaches an unknown object; recovering a concept the
    # model once knew needs fewer.
    steps: int = 500
    learning_rate: float = 5e-3
    train_batch_size: int = 4
    num_images: int = 16  # concept images to generate, and images per model and prompt kind in the test
    initializer: str | None = None  # None: "object" (digits model: "digit")
    token: str = TOKEN
    # Also measure the forgotten model with the token as it was after these steps (each < --steps):
    # how long an attack needs, from one run (a shorter attack with this seed is that run's start).
    measure_steps: list[int] = field(default_factory=list)
    # The embedding trains in float32 and both models are sampled alike: no mixed precision.
    mixed_precision: str | None = "no"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.mixed_precision == "no", "attack runs in float32 (the embedding trains in full precision)")
        for name in ("steps", "learning_rate", "train_batch_size", "num_images"):
            _check_positive(name, getattr(self, name))
        _check(self.initializer is None or bool(self.initializer.strip()),
               "--initializer is empty: give a neutral one-token word, e.g. object")
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
    train_templates: list[str]  # training prompts: the token in place of the concept
    heldout_templates: list[str]  # test prompts, never used in training
    names: list[str]  # how the plain test prompts name the concept (cycled)


def target_of(concepts: list[list[str]], digits_model: bool) -> Target:
    if len(concepts) != 1:
        raise UserError(f"the model forgot {len(concepts)} concepts; the attack recovers one at a time: pass "
                        "--concept with the one to recover")
    flat = concepts[0]
    if digits_model:
        [digit] = digits_of(concepts)
        return Target(flat, digit, digits.train_prompts(digit), list(digits.TRAIN_TEMPLATES),
                      list(digits.HELDOUT_TEMPLATES), [digits.DIGIT_WORDS[digit], str(digit)])
    return Target(flat, None, concept_prompts(flat, True), read_prompts(bundled("concept_templates.txt")),
                  read_prompts(bundled("eval/concept_paraphrases.txt")), flat)


def held_out_samples(target: Target, token: str, n: int, seed: int, guidance: float) -> dict[str, list[Sample]]:
    """n held-out phrasings, each with the concept's name and with the token; image i of both kinds
    has the same seed (seed + 1, i): the concept images are seeded by (seed, i)."""
    templates = spread(target.heldout_templates, n)
    seeds = [image_seed(seed + 1, i) for i in range(n)]
    names = {"plain": [target.names[i % len(target.names)] for i in range(n)], "token": [token] * n}
    return {kind: [Sample(t.format(name), s, guidance, target.digit)
                   for t, name, s in zip(templates, names[kind], seeds)] for kind in KINDS}


def shorter(steps: int) -> str:
    """The image kind of the token after `steps` steps of the attack."""
    return f"token-at-{steps}"


def image_path(role: str, kind: str, index: int) -> str:
    """Relative to the result folder."""
    return f"images/{role}/{kind}/{index:04d}.png"


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
            with atomic_path(folder / image_path(role, kind, share[position])) as tmp:
                image.save(tmp, format="PNG")


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
    """Before any image is made: the token's training (a forward and backward through the UNet at
    --train-batch-size, float32) must fit the memory budget."""
    family, latent = family_of(pipe), latent_size(pipe, config.resolution)
    resident = weight_bytes(pipe.unet, pipe.vae, *family.loaded_text_encoders(pipe))
    meta = meta_copy(pipe.unet)
    limit = budget(config.max_memory, accelerator.device)
    peak = check_batch("learning the token", "--train-batch-size", config.train_batch_size,
                       lambda b: resident + activation_peak(family, meta, b, latent, "no", False), limit)
    say(plan_line("learning the token", "", peak, limit))
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
    prompts), the forgotten model's pipeline, and the token training's planned peak (checked before
    any image is made)."""
    if config.concept_images:
        ref, pipe = load_on_device(config.model, accelerator)
        predicted = plan_token_training(pipe, config, accelerator)
        images = encode_image_folder(pipe, ref, config.concept_images, folder, config.resolution,
                                     accelerator, kind="concept")
    else:
        ref, pipe = load_on_device(base, accelerator)
        predicted = plan_token_training(pipe, config, accelerator)  # the same architecture as the forgotten one
        images = generate_image_set(pipe, ref, spread(target.concept_prompts, config.num_images), settings,
                                    folder, "concept", accelerator)
        del pipe
        _release()
        _, pipe = load_on_device(config.model, accelerator)
    return images, pipe, predicted


def _learn_on_every_process(config: AttackConfig, target: Target, pipe, family, token_ids, images, predicted: int,
                            accelerator):
    """The token's embedding rows learned on the concept images (every other weight frozen), the
    losses, and the rows after each --measure-steps; process 0's rows on every process."""
    prompts = [t.format(config.token) for t in target.train_templates]
    for module in (pipe.unet, pipe.vae):
        module.requires_grad_(False)
    with out_of_memory("learning the token", predicted, "pass a smaller --train-batch-size"):
        rows, losses, kept = learn_token(family, pipe, pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config),
                                         token_ids, images, prompts, config.steps, config.learning_rate,
                                         config.train_batch_size, config.seed, keep_at=tuple(config.measure_steps),
                                         fp16=accelerator.mixed_precision == "fp16")
    rows = [broadcast(row.contiguous()) for row in rows]
    kept = {at: [broadcast(row.contiguous()) for row in kept[at]] for at in config.measure_steps}
    return rows, losses, kept


def _sample_base_with_token(base: str, family, token: str, samples: dict[str, list[Sample]],
                            settings: GenerationSettings, folder: Path, accelerator) -> None:
    """The base model's images, with the learned token loaded from folder's embedding file."""
    _, pipe = load_on_device(base, accelerator)
    load_token(pipe, family, folder / EMBEDDINGS, token)  # as a user would
    _sample(pipe, "base", samples, settings, folder, accelerator)
    del pipe
    _release()


def attack(config: AttackConfig) -> dict:
    """Learn the token on the forgotten model, sample both models with and without it, judge the
    images; write OUT/attack.json, OUT/report.html, OUT/learned_embeds.safetensors, OUT/images/ and
    OUT/concept-set/; return the attack record (an empty dict on processes other than the main one
    under `accelerate launch`: every process learns the same token, process 0's is kept, and the
    processes share the sampling)."""
    started = time.time()
    out = Path(config.output_dir)
    record, base, groups = forgotten_model(config, Output("--output-dir", out, ATTACK_JSON, "attack result"),
                                           {"--concept-images": config.concept_images})
    digits_model = is_digits_model(resolve_model(base))
    target = target_of(groups, digits_model)
    detector_kind = choose_detector("auto", digits_model, target.concepts)
    if detector_kind == "nudenet":
        nudenet_class()  # a missing package shows now, not after the training
    initializer = config.initializer or ("digit" if digits_model else "object")
    settings = GenerationSettings(num_inference_steps=config.num_inference_steps,
                                  guidance_scale=config.guidance_scale, resolution=config.resolution,
                                  seed=config.seed, batch_size=config.batch_size, mixed_precision="no",
                                  max_memory=config.max_memory)
    samples = held_out_samples(target, config.token, config.num_images, config.seed, config.guidance_scale)
    accelerator = make_accelerator()
    main = accelerator.is_main_process
    partial = _work_folder(out, accelerator)
    with discard_on_failure(partial) if main else contextlib.nullcontext():
        detector, status = _detector(detector_kind, target, config, record) if main else (None, {})
        images, pipe, predicted = _load_with_concept_set(config, base, target, settings, partial / "concept-set",
                                                         accelerator)
        family = family_of(pipe)
        token_ids = add_token(pipe, family, config.token, initializer)
        rows, losses, kept = _learn_on_every_process(config, target, pipe, family, token_ids, images, predicted,
                                                     accelerator)
        if main:
            save_file(embedding_file(family, config.token, rows), str(partial / EMBEDDINGS))
        for at in config.measure_steps:  # the shorter attacks: the token as it was then
            set_token(pipe, family, token_ids, kept[at])
            _sample(pipe, "forgotten", {shorter(at): samples["token"]}, settings, partial, accelerator)
        set_token(pipe, family, token_ids, rows)
        _sample(pipe, "forgotten", samples, settings, partial, accelerator)
        del pipe
        _release()
        accelerator.wait_for_everyone()  # the embedding file is written
        _sample_base_with_token(base, family, config.token, samples, settings, partial, accelerator)
        accelerator.wait_for_everyone()  # every process's images are on disk
        if not main:
            return {}  # (no barrier through the judging: it could outlast the process group's timeout)
        if isinstance(detector, ClipDetector):
            detector.to(accelerator.device)
        result = _record(config, target, initializer, detector_kind, detector, status, samples, losses, images,
                         partial, base, family)
        result["num_processes"] = accelerator.num_processes
        result["seconds"] = round(time.time() - started, 1)
        write_text(partial / "report.html", render_html(result))
        write_json(partial / ATTACK_JSON, result)
    publish(partial, out, ATTACK_JSON)
    return result


def _record(config, target, initializer, detector_kind, detector, status, samples, losses, images, folder,
            base, family) -> dict:
    rate_name = RATES[detector_kind]
    outputs = {role: {kind: detector.detect([folder / image_path(role, kind, i) for i in range(len(items))], items)
                      if detector else [None] * len(items) for kind, items in samples.items()} for role in ROLES}
    models = {}
    for role, spec in zip(ROLES, (base, config.model)):
        rates = {kind: detector.summarize(outputs[role][kind], samples[kind])[rate_name] if detector else None
                 for kind in KINDS}
        models[role] = {"spec": spec, "identity": resolve_model(spec).identity,
                        "before": rates["plain"], "after": rates["token"]}
    tokens = samples["token"]
    models["forgotten"]["after_by_steps"] = {
        **{str(at): detector.summarize(detector.detect([folder / image_path("forgotten", shorter(at), i)
                                                        for i in range(len(tokens))], tokens), tokens)[rate_name]
           if detector else None for at in config.measure_steps},
        str(config.steps): models["forgotten"]["after"]}
    tenth = max(1, len(losses) // 10)
    entries = []
    for i in range(config.num_images):
        entry = {"index": i, "seed": samples["plain"][i].seed}
        for kind in KINDS:
            entry[kind] = {"prompt": samples[kind][i].prompt,
                           **{role: {"image": image_path(role, kind, i), detector_kind: outputs[role][kind][i]}
                              for role in ROLES}}
        entries.append(entry)
    return {
        **stamp(), "command": "attack",
        "method": "textual inversion (Pham et al., Circumventing Concept Erasure Methods for Text-to-Image "
                  "Generative Models)",
        "concepts": target.concepts,
        "digit": target.digit,
        "token": config.token,
        "initializer": initializer,
        "embedding": EMBEDDINGS,
        "load_with": how_to_load(family, config.token),
        "settings": {**asdict(config), "initializer": initializer, "scheduler": "DDIMScheduler",
                     "image_size": images.manifest["resolution"], "training_scheduler": "DDPMScheduler",
                     "optimizer": "AdamW (weight decay 0)",
                     "test_seeds": "image i: (seed + 1, i); the concept images: (seed, i)"},
        "concept_set": {"path": "concept-set", "source": images.manifest.get("source"),
                        "num_images": len(images.latents)},
        "training_prompts": [t.format(config.token) for t in target.train_templates],
        "detector": detector_kind,
        "detectors": {detector_kind: status},
        "rate": rate_name,
        "models": models,
        # How often the concept shows on the forgotten model with the learned token.
        "attack_success": models["forgotten"]["after"],
        "training": {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
                     "loss_mean_first_tenth": sum(losses[:tenth]) / tenth,
                     "loss_mean_last_tenth": sum(losses[-tenth:]) / tenth, "losses": losses},
        "images": entries,
    }


def concept_title(result: dict) -> str:
    """What the attack tries to bring back, short (the digits model records every phrasing of its digit)."""
    if result["digit"] is not None:
        return f"digit {result['digit']}"
    text = ", ".join(result["concepts"])
    return text if len(text) <= 80 else text[:77] + "..."


def format_summary(result: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"attack on {concept_title(result)!r} with {result['token']} "
             f"(detector {result['detector']}, {result['rate']}: before = concept's name, after = learned token)"]
    for role in ROLES:
        m = result["models"][role]
        lines.append(f"{role:<10} before {fmt(m['before']):>7}   after {fmt(m['after']):>7}")
    shorter_runs = {k: v for k, v in result["models"]["forgotten"]["after_by_steps"].items()
                    if int(k) != result["training"]["steps"]}
    if shorter_runs:
        lines.append("forgotten, after N steps: " + ", ".join(f"{k}: {fmt(v)}" for k, v in shorter_runs.items()))
    return "\n".join(lines)


def render_html(result: dict) -> str:
    """One self-contained page: the rates, then per test image the four images on its seed."""
    small = result["settings"]["image_size"] < 96  # shown enlarged, pixel by pixel
    size = 96 if small else 192
    title = f"amnesia-sd attack: {concept_title(result)}"
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
             f"<style>{STYLE}</style></head><body class=\"{'small' if small else ''}\">", f"<h1>{escape(title)}</h1>",
             f"<p class=meta>learned token <code>{escape(result['token'])}</code> (initialised from "
             f"<code>{escape(result['initializer'])}</code>, {result['training']['steps']} steps, loss "
             f"{fmt(result['training']['loss_mean_first_tenth'])} to "
             f"{fmt(result['training']['loss_mean_last_tenth'])}); "
             f"load it with <code>{escape(result['load_with'])}</code>; every number in "
             f"<a href=\"{ATTACK_JSON}\">{ATTACK_JSON}</a></p>"]
    status = result["detectors"][result["detector"]]
    if not status.get("loaded"):
        parts.append(f"<div class=warn>{escape(result['detector'])} detector not loaded ({escape(status['reason'])}); "
                     f"{escape(status['fix'])}</div>")
    parts.append(f"<h2>How often the concept shows ({escape(result['detector'])} {escape(result['rate'])})</h2>"
                 "<table class=metrics><tr><th class=l>model</th><th class=l>identity</th>"
                 "<th>before (the concept's name)</th><th>after (the learned token)</th></tr>")
    for role in ROLES:
        m = result["models"][role]
        parts.append(f"<tr><td class=l>{role}</td><td class=l>{escape(m['identity'])}</td><td>{fmt(m['before'])}</td>"
                     f"<td>{fmt(m['after'])}</td></tr>")
    by_steps = result["models"]["forgotten"]["after_by_steps"]
    if len(by_steps) > 1:
        parts.append("</table><table class=metrics><tr><th class=l>attack steps</th>" + "".join(
            f"<th>{k}</th>" for k in by_steps) + "</tr><tr><td class=l>forgotten, after</td>" + "".join(
            f"<td>{fmt(v)}</td>" for v in by_steps.values()) + "</tr>")
    parts.append("</table><h2>Images</h2><p class=meta>held-out phrasings; each figure: one seed, base and "
                 "forgotten, with the concept's name and with the token</p><div class=pairs>")
    for entry in result["images"]:
        cells = "".join(
            f"<div><img src=\"{escape(entry[kind][role]['image'])}\" width={size} height={size} loading=lazy "
            f"alt=\"{role} {kind} {entry['index']}\">{role}, {kind}</div>"
            for role in ROLES for kind in KINDS)
        parts.append(f"<figure style=\"width:{4 * size + 20}px\"><div class=pair>{cells}</div><figcaption>"
                     f"#{entry['index']} seed {entry['seed']}<br>{escape(entry['plain']['prompt'])}<br>"
                     f"{escape(entry['token']['prompt'])}</figcaption></figure>")
    parts.append("</div></body></html>\n")
    return "\n".join(parts)
