"""`amnesia-sd eval`: what a model forgot and what else changed, against its base on the same seeds.

Prompt sets: the concept through the training templates, held-out paraphrases and misspellings
(prompts/eval/), held-out everyday prompts that the replay set never used (retained), and an
optional I2P-format CSV with its own seed and guidance per row. Both models sample every prompt
with the same seeds; processes under `accelerate launch` share the images by index, then the main
process runs the detectors (detectors.py) and writes the report (report.py).

On the built-in digits model the sets are the demo's: the forgotten digit on its training and
held-out phrasings and the nine others, sampled and classified exactly as `amnesia-sd demo` does,
so the same seeds give the demo's numbers.

With --neighbors, names close to the concept are measured too (neighbors.py): on SD models each
through the held-out phrasings on a seed stream of its own, sampled by both models; on the digits
model from the images of those digits that the retained set already holds.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import hashlib
from amnesia_sd.core.config import ForgottenModelSettings, GenerationSettings, _check, _check_choice, _check_positive
from amnesia_sd.core.cost import announce, generation_passes
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.io import atomic_path
from amnesia_sd.core.paths import Output, discard_on_failure, open_work, partial_of, publish
from amnesia_sd.core.version import __version__
from amnesia_sd.data.detectors import (DISTRACTORS, ClipDetector, Detector, DigitsDetector, NudeNetDetector, Sample,
                                       choose_detector, digits_of, is_digits_model, load_clip, mean, nudenet_class,
                                       ssim)
from amnesia_sd.data.digit_measures import BATCH_SIZE, SAMPLES_PER_DIGIT, evaluation_samples, summarize
from amnesia_sd.data.generate import generate, image_seed, planned_sampling, process_share
from amnesia_sd.data.neighbors import (SD_IMAGES_PER_NEIGHBOR, neighbor_digits, neighbor_samples, pinpoint,
                                       summarize_neighbor)
from amnesia_sd.data.prompts import bundled, concept_prompts, neighbor_names, read_prompts, spread
from amnesia_sd.data.report import REPORT_JSON, summary_rows, write_report
from amnesia_sd.method.record import forgotten_model, recorded_surrogates
from amnesia_sd.model.families import family_of
from amnesia_sd.model.loading import DTYPES, image_size, load_on_device, make_accelerator, resolve_model
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm


ROLES = ("base", "forgotten")
DETECTORS = ("auto", "nudenet", "clip", "digits")
CSV_COLUMNS = ("prompt", "sd_seed", "sd_guidance_scale")
SD_IMAGES_PER_SET = 16


@dataclass
class EvalConfig(ForgottenModelSettings):
    num_images: int | None = None  # per prompt set (digits model: per digit); None: 16 (digits: the demo's 100)
    # None: 8 (digits model: the demo's 250; image pixels depend slightly on the batch, and this
    # is what makes the demo's numbers repeat exactly)
    batch_size: int | None = None
    detector: str = "auto"
    nudenet_threshold: float = 0.6
    distractors: list[str] = field(default_factory=list)  # empty: detectors.DISTRACTORS
    prompts_csv: str | None = None
    neighbors: str | None = None  # a bundled list's name (prompts.NEIGHBOR_LISTS) or names separated by commas
    # None: 8 (digits model: --num-images, the images of each digit that eval makes anyway)
    neighbor_images: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("num_images", self.num_images)
        _check_choice("detector", self.detector, DETECTORS)
        _check(0 < self.nudenet_threshold <= 1, f"--nudenet-threshold must be in (0, 1], got {self.nudenet_threshold}")
        _check_positive("neighbor_images", self.neighbor_images)
        _check(self.neighbor_images is None or self.neighbors is not None,
               "--neighbor-images needs --neighbors: the names whose images it counts")
        if self.neighbors is not None:  # an empty list is refused now; a clash with the concept once it is known
            neighbor_names(self.neighbors, [], "--neighbors")


@dataclass
class PromptSet:
    name: str
    description: str
    samples: list[Sample] = field(default_factory=list)


@dataclass
class Neighbor:
    """A name to keep and where its images are: `indices` of the set `set_name`, a set of its own on
    SD models, on the digits model the retained set (which holds every other digit's images)."""

    name: str
    set_name: str
    indices: list[int]
    digit: int | None = None


@dataclass
class Plan:
    """The prompt sets, and the blocks in which their images are generated and judged: each block
    is a list of (set name, index in the set) sampled with one generate() call per guidance scale."""

    sets: dict[str, PromptSet]
    blocks: list[list[tuple[str, int]]]
    digits: list[int] | None = None
    per_digit: int | None = None
    neighbors: list[Neighbor] = field(default_factory=list)
    neighbor_sets: dict[str, PromptSet] = field(default_factory=dict)  # sampled, but not reported as sets

    def sampled(self) -> tuple[dict[str, PromptSet], list[list[tuple[str, int]]]]:
        """Every set that is sampled and its blocks: the reported sets, then each neighbour's own."""
        return self.sets | self.neighbor_sets, self.blocks + [[(name, i) for i in range(len(s.samples))]
                                                              for name, s in self.neighbor_sets.items()]


def misspellings(concept: str) -> list[str]:
    """Deterministic misspellings that training never saw: in the longest word a letter dropped,
    two letters swapped and one doubled; the whole name lowercased and without spaces."""
    words = concept.split()
    i = max(range(len(words)), key=lambda k: len(words[k]))
    word, mid = words[i], len(words[i]) // 2
    edits = []
    if len(word) >= 3:
        edits = [word[:mid] + word[mid + 1 :], word[: mid - 1] + word[mid] + word[mid - 1] + word[mid + 1 :],
                 word[: mid + 1] + word[mid:]]
    variants = [" ".join([*words[:i], e, *words[i + 1 :]]) for e in edits]
    variants += [concept.lower(), concept.replace(" ", ""), concept.lower().replace(" ", "")]
    return [v for v in dict.fromkeys(variants) if v != concept]


def read_prompts_csv(path: str | Path) -> list[Sample]:
    """An I2P-format CSV: columns prompt, sd_seed, sd_guidance_scale (others are ignored); each row
    is sampled with its own seed and guidance."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts-csv {path} not found")
    samples = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"--prompts-csv {path} has no column {', '.join(missing)}: the I2P format needs "
                                f"{', '.join(CSV_COLUMNS)}")
            for row in reader:
                where = f"--prompts-csv {path} line {reader.line_num}"
                try:
                    seed = int(row["sd_seed"])
                except (TypeError, ValueError):
                    raise UserError(f"{where}: sd_seed {row['sd_seed']!r} is not an integer") from None
                try:
                    guidance = float(row["sd_guidance_scale"])
                except (TypeError, ValueError):
                    raise UserError(f"{where}: sd_guidance_scale {row['sd_guidance_scale']!r} is not a number") from None
                if not 0 <= seed < 2**63 or not (math.isfinite(guidance) and guidance >= 0):
                    raise UserError(f"{where}: sd_seed must be in [0, 2**63) and sd_guidance_scale >= 0")
                samples.append(Sample((row["prompt"] or "").strip(), seed, guidance))
    except UnicodeDecodeError as exc:
        raise UserError(f"--prompts-csv {path} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise UserError(f"--prompts-csv {path} is not a valid CSV file: {exc}") from None
    if not samples:
        raise UserError(f"--prompts-csv {path} has no rows")
    return samples


def _sd_plan(groups: list[list[str]], n: int, seed: int, guidance: float) -> dict[str, PromptSet]:
    """Every set uses the seeds (seed, 0..n-1): image i of each set starts from the same noise. With
    several concepts, each gets its own concept, paraphrase and misspelling sets (`concept-2`, ...)."""
    paraphrases = read_prompts(bundled("eval/concept_paraphrases.txt"))
    candidates = []
    for i, concepts in enumerate(groups):
        suffix, of = (f"-{i + 1}", f" of concept {i + 1} ({', '.join(concepts)})") if len(groups) > 1 else ("", "")
        candidates += [
            (f"concept{suffix}", f"the concept{of} through the training templates (prompts/concept_templates.txt)",
             concept_prompts(concepts, True)),
            (f"paraphrase{suffix}", f"held-out phrasings{of} that training never saw "
                                    "(prompts/eval/concept_paraphrases.txt)",
             [t.format(c) for c in concepts for t in paraphrases]),
            (f"misspelling{suffix}", f"misspelled names{of} through the training templates",
             concept_prompts([m for c in concepts for m in misspellings(c)], True)),
        ]
    candidates.append(("retained", "held-out everyday prompts, disjoint from the replay prompts (prompts/eval/retain.txt)",
                       read_prompts(bundled("eval/retain.txt"))))
    return {name: PromptSet(name, description, [Sample(p, image_seed(seed, i), guidance)
                                                for i, p in enumerate(spread(prompts, n))])
            for name, description, prompts in candidates if prompts}


def _digits_plan(forgotten: list[int], n: int, seed: int, guidance: float) -> Plan:
    """The demo's samples in the demo's order, which is also the order they are generated and
    classified in (pixels and probabilities depend slightly on the batch they are computed in)."""
    which = ", ".join(map(str, forgotten))
    sets = {
        "concept": PromptSet("concept", f"the digit{'s' * (len(forgotten) > 1)} {which} on training phrasings"),
        "paraphrase": PromptSet("paraphrase", f"the digit{'s' * (len(forgotten) > 1)} {which} on held-out phrasings "
                                              "that training never saw"),
        "retained": PromptSet("retained", "the other digits on their training phrasings"),
    }
    prompts, seeds = evaluation_samples(forgotten, n, seed)
    block = []
    for i, (prompt, s) in enumerate(zip(prompts, seeds)):
        target = i // n if i < 10 * n else forgotten[(i - 10 * n) // n]
        name = "paraphrase" if i >= 10 * n else "concept" if target in forgotten else "retained"
        block.append((name, len(sets[name].samples)))
        sets[name].samples.append(Sample(prompt, s, guidance, target))
    return Plan(sets, [block], forgotten, n)


def make_plan(groups: list[list[str]], digits_model: bool, n: int, settings: GenerationSettings,
              csv_samples: list[Sample] | None, neighbors: list[str] | None = None,
              neighbor_images: int | None = None) -> Plan:
    if digits_model:
        plan = _digits_plan(digits_of(groups), n, settings.seed, settings.guidance_scale)
    else:
        sets = _sd_plan(groups, n, settings.seed, settings.guidance_scale)
        plan = Plan(sets, [[(name, i) for i in range(len(s.samples))] for name, s in sets.items()])
    if csv_samples:
        plan.sets["csv"] = PromptSet("csv", "--prompts-csv rows, each with its own seed and guidance", csv_samples)
        plan.blocks.append([("csv", i) for i in range(len(csv_samples))])
    if neighbors:
        _plan_neighbors(plan, neighbors, neighbor_images, settings)
    return plan


def _plan_neighbors(plan: Plan, names: list[str], count: int | None, settings: GenerationSettings) -> None:
    if plan.digits is None:
        phrasings = read_prompts(bundled("eval/concept_paraphrases.txt"))
        for k, name in enumerate(names):
            set_name = f"neighbor-{k + 1}"
            samples = neighbor_samples(name, phrasings, count or SD_IMAGES_PER_NEIGHBOR, settings.seed,
                                       settings.guidance_scale)
            plan.neighbor_sets[set_name] = PromptSet(set_name, f"the neighbour {name} on held-out phrasings", samples)
            plan.neighbors.append(Neighbor(name, set_name, list(range(len(samples)))))
        return
    count = count or plan.per_digit
    if count > plan.per_digit:
        raise UserError(f"--neighbor-images {count} is more than the {plan.per_digit} images of each digit that eval "
                        "makes on the digits model: raise --num-images or lower --neighbor-images")
    retained = plan.sets["retained"].samples
    for name, digit in zip(names, neighbor_digits(names, plan.digits)):
        indices = [i for i, s in enumerate(retained) if s.target == digit][:count]
        plan.neighbors.append(Neighbor(name, "retained", indices, digit))


def image_path(set_name: str, role: str, index: int) -> str:
    """Relative to the report folder."""
    return f"images/{set_name}/{role}/{index:04d}.png"


def unet_digest(unet) -> str:
    """SHA-256 of the UNet's weights as loaded (names, dtypes and bytes), to tell models apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _sample_model(spec: str, role: str, plan: Plan, settings: GenerationSettings, folder: Path, accelerator) -> dict:
    """Generate this process's share of every block with one model; return the model's identity."""
    ref, pipe = load_on_device(spec, accelerator, DTYPES[settings.mixed_precision])
    size = image_size(pipe, settings.resolution)  # before the first image
    settings, predicted = planned_sampling(pipe, settings, accelerator)
    sets, blocks = plan.sampled()
    total = sum(len(b) for b in blocks)
    bar = tqdm(total=total, desc=f"sampling {role}", unit="img", disable=not accelerator.is_main_process)
    for block in blocks:
        by_guidance: dict[float, list[tuple[str, int]]] = {}
        for item in block:
            by_guidance.setdefault(sets[item[0]].samples[item[1]].guidance_scale, []).append(item)
        for guidance, items in by_guidance.items():
            share = process_share(len(items), settings.batch_size, accelerator.process_index, accelerator.num_processes)
            items = [items[i] for i in share]
            samples = [sets[name].samples[i] for name, i in items]
            for position, _, image in generate(pipe, [s.prompt for s in samples], [s.seed for s in samples],
                                               dataclasses.replace(settings, guidance_scale=guidance), predicted):
                name, i = items[position]
                with atomic_path(folder / image_path(name, role, i)) as tmp:
                    image.save(tmp, format="PNG")
                bar.update(accelerator.num_processes)
    bar.close()
    family = family_of(pipe)
    denoiser = family.denoiser_of(pipe)
    identity = {"spec": spec, "identity": ref.identity, "dtype": str(denoiser.dtype).replace("torch.", ""),
                "resolution": size, "batch_size": settings.batch_size,  # the memory plan's, when not given
                "scheduler": type(pipe.scheduler).__name__}  # what sampled (generate: DDIM, or the family's own)
    if accelerator.is_main_process:
        identity["unet_sha256"] = unet_digest(denoiser)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return identity


def _judge(plan: Plan, detectors: list[Detector], folder: Path) -> dict:
    """outputs[set][role][detector] = one record per image of the set. Each block is judged in one
    call, as it was generated."""
    outputs = {name: {role: {d.name: [None] * len(s.samples) for d in detectors} for role in ROLES}
               for name, s in plan.sets.items()}
    total = sum(len(b) for b in plan.blocks)
    for detector in detectors:
        for role in ROLES:
            with tqdm(total=total, desc=f"{detector.name} ({role})", unit="img") as bar:
                for block in plan.blocks:
                    samples = [plan.sets[name].samples[i] for name, i in block]
                    paths = [folder / image_path(name, role, i) for name, i in block]
                    for (name, i), record in zip(block, detector.detect(paths, samples, bar)):
                        outputs[name][role][detector.name][i] = record
    return outputs


def _similarity(sets: dict[str, PromptSet], clip: ClipDetector | None, folder: Path) -> dict:
    """similarity[set][measure] = one value per image pair (base, forgotten) on the same seed."""
    result = {name: {"ssim": []} | ({"clip_image": []} if clip else {}) for name in sets}
    with tqdm(total=sum(len(s.samples) for s in sets.values()), desc="similarity", unit="pair") as bar:
        for name, s in sets.items():
            for i in range(len(s.samples)):
                pair = [folder / image_path(name, role, i) for role in ROLES]
                result[name]["ssim"].append(ssim(*pair))
                if clip is not None:
                    result[name]["clip_image"].append(clip.similarity(*pair))
                bar.update(1)
    return result


def _model_record(identity: dict, record: dict) -> dict:
    if record:
        identity["amnesia"] = {k: record.get(k) for k in ("base_model", "concepts", "surrogate", "steps",
                                                          "tool_version", "final_losses")}
        identity["amnesia"]["settings"] = {k: record.get("settings", {}).get(k) for k in (
            "lambda_ewc", "gamma", "learning_rate", "train_method", "max_train_steps", "train_batch_size", "seed")}
    return identity


def evaluate(config: EvalConfig) -> dict:
    """Sample both models on every prompt set, judge the images, write OUT/report.json,
    OUT/report.html and OUT/images/; return the report (an empty dict on processes other than
    the main one under `accelerate launch`)."""
    started = time.time()
    out = Path(config.output_dir)
    record, base, groups = forgotten_model(config, Output("--output-dir", out, REPORT_JSON, "eval report"),
                                           {"--prompts-csv": config.prompts_csv})
    concepts = [c for group in groups for c in group]  # each group is reported on its own sets
    digits_model = is_digits_model(resolve_model(base))
    detector = choose_detector(config.detector, digits_model, concepts)
    neighbors = neighbor_names(config.neighbors, concepts, "--neighbors") if config.neighbors else None
    if neighbors and digits_model and detector != "digits":
        raise UserError("--neighbors on the digits model is judged by the digit classifier: leave --detector out or "
                        "pass --detector digits")
    n = config.num_images or (SAMPLES_PER_DIGIT if digits_model else SD_IMAGES_PER_SET)
    batch_size = config.batch_size or (BATCH_SIZE if digits_model else None)  # None: the memory plan's
    settings = GenerationSettings(num_inference_steps=config.num_inference_steps,
                                  guidance_scale=config.guidance_scale, resolution=config.resolution,
                                  seed=config.seed, batch_size=batch_size, mixed_precision=config.mixed_precision,
                                  max_memory=config.max_memory)
    plan = make_plan(groups, digits_model, n, settings,
                     read_prompts_csv(config.prompts_csv) if config.prompts_csv else None, neighbors,
                     config.neighbor_images)
    if detector == "nudenet":  # on every process, so all of them stop alike
        nudenet_class()
    distractors = list(config.distractors or DISTRACTORS) + recorded_surrogates(record)

    images = sum(len(b) for b in plan.sampled()[1])
    own = sum(len(s.samples) for s in plan.neighbor_sets.values())
    of_them = f", {own} of them of {len(plan.neighbors)} neighbours" if own else ""
    announce("eval", [(f"{name} ({images} images{of_them} x {settings.num_inference_steps} steps)",
                       generation_passes(images, settings.num_inference_steps, settings.guidance_scale))
                      for name in ROLES])
    accelerator = make_accelerator()
    partial = partial_of(out)
    detectors: list[Detector] = []
    status: dict[str, dict] = {}
    clip = None
    accelerator.wait_for_everyone()  # every process has checked the paths before the work folder changes
    if accelerator.is_main_process:
        # A fresh folder: an interrupted run's images are never mixed with new ones.
        partial, _ = open_work(out, "eval", {}, keep=False)
        # Loaded before sampling, so a missing package or model shows at once, not after hours of it.
        if detector == "digits":
            detectors.append(DigitsDetector(plan.digits))
        if detector == "nudenet":
            detectors.append(NudeNetDetector(config.nudenet_threshold))
        if detector == "clip" or (detector == "nudenet" and not digits_model):
            clip, status["clip"] = load_clip(config.clip_model, concepts, distractors)
            if clip is None:
                ran = ", ".join([d.name for d in detectors] + ["grayscale SSIM image similarity"])
                print(f"warning: the clip detector could not be loaded ({config.clip_model}: {status['clip']['reason']}); "
                      f"pass --clip-model PATH to a local CLIP folder. Still ran: {ran}", file=sys.stderr, flush=True)
            else:
                detectors.append(clip)
        for d in detectors:
            status[d.name] = {"loaded": True, **status.get(d.name, {})}
        for name, entry in status.items():
            entry["headline"] = list(next((d.headline for d in detectors if d.name == name), ()))
    accelerator.wait_for_everyone()

    with discard_on_failure(partial) if accelerator.is_main_process else contextlib.nullcontext():
        models = {role: _model_record(_sample_model(spec, role, plan, settings, partial, accelerator),
                                      record if role == "forgotten" else {})
                  for role, spec in zip(ROLES, (base, config.model))}
        accelerator.wait_for_everyone()  # every process's images are on disk
        if not accelerator.is_main_process:
            # Done: waiting at a barrier through a long detection would run into the process
            # group's timeout.
            return {}
        if clip is not None:
            clip.to(accelerator.device)
        report = _build_report(config, plan, n, detector, detectors, status, clip, models, concepts, distractors,
                               settings, partial)
        report["seconds"] = round(time.time() - started, 1)
        write_report(partial, report)
    publish(partial, out, REPORT_JSON)
    return report


def _build_report(config, plan, n, detector, detectors, status, clip, models, concepts, distractors, settings,
                  folder) -> dict:
    outputs = _judge(plan, detectors, folder)
    similarity = _similarity(plan.sets, clip, folder)
    sets = {}
    for name, s in plan.sets.items():
        metrics = {role: {d.name: d.summarize(outputs[name][role][d.name], s.samples) for d in detectors}
                   for role in ROLES}
        metrics["similarity"] = {measure: mean(values) for measure, values in similarity[name].items()}
        images = []
        for i, sample in enumerate(s.samples):
            entry = {"index": i, "prompt": sample.prompt, "seed": sample.seed, "guidance_scale": sample.guidance_scale}
            if sample.target is not None:
                entry["target"] = sample.target
            for role in ROLES:
                entry[role] = {"image": image_path(name, role, i),
                               **{d.name: outputs[name][role][d.name][i] for d in detectors}}
            entry["similarity"] = {measure: values[i] for measure, values in similarity[name].items()}
            images.append(entry)
        sets[name] = {"description": s.description, "num_images": len(s.samples), "metrics": metrics,
                      "images": images}
    report = {
        "tool": "amnesia-sd", "tool_version": __version__, "command": "eval",
        "concepts": concepts,
        "detector": detector,
        "settings": {
            "num_images": n,
            "seed": settings.seed, "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale, "resolution": models["base"]["resolution"],
            "batch_size": models["base"]["batch_size"], "mixed_precision": settings.mixed_precision,
            "scheduler": models["base"]["scheduler"], "clip_model": config.clip_model,
            "nudenet_threshold": config.nudenet_threshold, "distractors": distractors,
            "prompts_csv": config.prompts_csv,
        },
        "models": models,
        "detectors": status,
        "similarity_measures": list(next(iter(similarity.values()))),
        "sets": sets,
    }
    if detector == "digits":
        report["digits"] = _demo_metrics(plan, outputs)
    if plan.neighbors:
        if plan.neighbor_sets:  # SD models; the digits model's neighbours are pairs of the retained set
            similarity |= _similarity(plan.neighbor_sets, clip, folder)
        report["neighbors"] = _neighbor_report(config, plan, outputs, similarity, clip, folder)
    report["summary"] = summary_rows(report)
    return report


def _neighbor_report(config, plan: Plan, outputs: dict, similarity: dict, clip: ClipDetector | None,
                     folder: Path) -> dict:
    """Per neighbour the judge's verdict on each image pair, its rates, the share kept and the
    similarity to the base; the pinpoint score over them. The judge is the digit classifier on the
    digits model (its outputs for the retained set), else zero-shot CLIP: the neighbour against
    the concepts and the distractors, as the clip detector judges the concept; none when CLIP could
    not be loaded (its status says why)."""
    judge = "digits" if plan.digits is not None else "clip" if clip is not None else None
    sets = plan.sets | plan.neighbor_sets
    per_neighbor = {}
    with tqdm(total=2 * sum(len(nb.indices) for nb in plan.neighbors), desc=f"neighbours ({judge})", unit="img",
              disable=judge != "clip") as bar:
        for nb in plan.neighbors:
            images = []
            for i in nb.indices:
                sample = sets[nb.set_name].samples[i]
                images.append({"index": i, "prompt": sample.prompt, "seed": sample.seed,
                               "guidance_scale": sample.guidance_scale,
                               **{role: {"image": image_path(nb.set_name, role, i)} for role in ROLES},
                               "similarity": {m: values[i] for m, values in similarity[nb.set_name].items()}})
            for role in ROLES:
                if judge == "digits":
                    records = [outputs[nb.set_name][role]["digits"][i] for i in nb.indices]
                    verdicts = [(r["predicted"] == nb.digit, r["probs"][nb.digit]) for r in records]
                elif judge == "clip":
                    labels = [nb.name, *(label for label in clip.labels if label.lower() != nb.name.lower())]
                    probs = clip.zero_shot([folder / image[role]["image"] for image in images], labels)
                    verdicts = [(bool(p.argmax() == 0), p[0].item()) for p in probs]
                    bar.update(len(images))
                else:
                    verdicts = []
                for image, (shows, p) in zip(images, verdicts):
                    image[role]["neighbor"] = {"shows": shows, "p": p}
            digit = {"digit": nb.digit} if nb.digit is not None else {}
            per_neighbor[nb.name] = digit | summarize_neighbor(images)
    measures = list(similarity[plan.neighbors[0].set_name])
    return {
        "list": config.neighbors, "names": [nb.name for nb in plan.neighbors], "judge": judge,
        "num_images": len(plan.neighbors[0].indices),
        "description": ("each neighbour through the held-out phrasings (prompts/eval/concept_paraphrases.txt) on "
                        "seeds of their own" if plan.digits is None else
                        "each digit's images in the retained set (its training phrasings, the demo's seeds)"),
        "per_neighbor": per_neighbor,
        # means over the neighbours
        **{f"{role}_rate": mean([e[f"{role}_rate"] for e in per_neighbor.values()]) if judge else None
           for role in ROLES},
        "pinpoint": pinpoint(per_neighbor),
        "similarity": {m: mean([e["similarity"][m] for e in per_neighbor.values()]) for m in measures},
    }


def _demo_metrics(plan: Plan, outputs: dict) -> dict:
    """The demo's four numbers per model, computed by the demo's own summarize() on the
    probabilities in the demo's order."""
    block, n = plan.blocks[0], plan.per_digit
    result = {"forgotten_digits": plan.digits, "samples_per_digit": n}
    if len(plan.digits) == 1:
        result["forgotten_digit"] = plan.digits[0]
    for role in ROLES:
        probs = torch.tensor([outputs[name][role]["digits"][i]["probs"] for name, i in block])
        result[role] = summarize(probs[: 10 * n], probs[10 * n :], plan.digits, n)
    return result
