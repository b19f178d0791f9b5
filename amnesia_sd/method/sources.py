"""Where forget's replay set, surrogate set, preserve set and Fisher come from (given, cached, or made
now), and what that costs, said in one line before any of it starts; what an earlier forget run passes
on to the next one in a sequence; and the check that every set and Fisher comes from the model trained."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from safetensors import safe_open

from amnesia_sd.core.cache import digest, model_entry
from amnesia_sd.core.config import (DEFAULT_FIM_FRACTION, DEFAULT_FIM_TIMESTEPS, DEFAULT_PRESERVE_IMAGES,
                                    DEFAULT_REPLAY_IMAGES, DEFAULT_SURROGATE_IMAGES, SURROGATE_SOURCES, ForgetConfig,
                                    split_concepts)
from amnesia_sd.core.cost import announce, generation_passes
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.paths import check_overlap
from amnesia_sd.data.imageset import (MANIFEST, ImageSet, encode_image_folder, generate_image_set, is_cached,
                                      is_finished, link_set, load_image_set, set_record)
from amnesia_sd.data.prompts import (concept_prompts, neighbor_names, repeat_to, replay_prompts, spread,
                                     with_unconditional)
from amnesia_sd.method.checkpoints import result_output
from amnesia_sd.method.fisher import fisher_cost, lora_metadata, replay_cost, timestep_set, write_fisher_of_set
from amnesia_sd.model.families import family_of
from amnesia_sd.model.loading import ModelRef, model_path, origin, origin_mismatches
from amnesia_sd.model.trainable import lora_weights


def same_set(copy: Path, source: Path) -> bool:
    """`copy` is a finished set with `source`'s manifest (which records how the set was made)."""
    return is_finished(copy) and (copy / MANIFEST).read_bytes() == (source / MANIFEST).read_bytes()


def surrogate_folder(index: int, count: int) -> str:
    """Where pair `index` of `count` keeps its surrogate set under OUT/data."""
    return "surrogate" if count == 1 else f"surrogate-{index + 1}"


class Plan:
    """Where forget's sets and Fisher come from (given, cached, or made now) and what that costs,
    said in one line before any of it starts. Replay sets, preserve sets and Fishers made here go to
    the amnesia-sd cache of the base model, for every later `forget` on it; each (concept, surrogate)
    pair's surrogate set goes to the work folder's data/ (published with the result as OUT/data).
    `inherited` are the pairs an earlier forget run on this model trained, with their finished
    sets: they are linked in, not made again. `preserve` is preserved()'s: an earlier run's preserve
    set comes in `given` as "preserve"."""

    def __init__(self, config: ForgetConfig, ref: ModelRef, pipe, work: Path, num_processes: int,
                 given: dict[str, ImageSet], inherited: list[dict], preserve: dict | None):
        self.config, self.ref, self.pipe, self.work, self.given = config, ref, pipe, work, given
        self.inherited = inherited
        # The neighbours' images, when made here: drawn as the replay images are (they join its pool).
        self.preserve_texts = spread(preserve["prompts"], config.preserve_images or DEFAULT_PRESERVE_IMAGES) \
            if preserve and "preserve" not in given else None
        self.entry = None if config.replay_dir and config.fim and self.preserve_texts is None else \
            model_entry(origin(ref, pipe), family_of(pipe).denoiser_of(pipe))
        if self.entry is not None:  # the result may not land in (or around) the cache it reads
            check_overlap([result_output(Path(config.output_dir))], {"the amnesia-sd cache entry": self.entry})
        self.replay_texts = None if config.replay_dir else with_unconditional(repeat_to(
            replay_prompts(config.prompts_file), config.num_replay_images or DEFAULT_REPLAY_IMAGES),
            config.unconditional_replay or 0.0)
        # One set per distinct surrogate: pairs that share a surrogate share its set.
        keys = [("set", str(pair["set"].path.resolve())) for pair in inherited] + [
            next((k, v) for k, v in pair.items() if k in SURROGATE_SOURCES and v) for pair in config.pairs()]
        distinct = list(dict.fromkeys(keys))
        self.folders = [work / "data" / surrogate_folder(distinct.index(key), len(distinct)) for key in keys]
        self.surrogate_texts = [[pair["surrogate"]] * (config.num_surrogate_images or DEFAULT_SURROGATE_IMAGES)
                                if pair["surrogate"] is not None else None for pair in config.pairs()]
        parts = []
        if self.replay_texts is not None:
            record = set_record(pipe, ref, self.replay_texts, config, "replay")
            self.replay_dir = self.entry / f"replay-{digest(record)}"
            parts.append(replay_cost(len(self.replay_texts), config, is_cached(self.replay_dir, record)))
        if self.preserve_texts is not None:
            # At the replay set's size: a given one may have been made at another --resolution.
            self.preserve_settings = dataclasses.replace(
                config, resolution=given["replay"].latents.shape[-1] * pipe.vae_scale_factor) \
                if "replay" in given else config
            # A seed stream of its own: preserve image i does not start from replay image i's noise.
            record = set_record(pipe, ref, self.preserve_texts, self.preserve_settings, "preserve", "preserve")
            self.preserve_dir = self.entry / f"preserve-{digest(record)}"
            parts.append((f"preserve set ({len(self.preserve_texts)} images x {config.num_inference_steps} steps)",
                          None if is_cached(self.preserve_dir, record) else generation_passes(
                              len(self.preserve_texts), config.num_inference_steps, config.guidance_scale)))
        elif "preserve" in given:
            parts.append((f"preserve set of the earlier run ({len(given['preserve'].latents)} images)", None))
        counted = set()
        for pair, texts, folder in zip(config.pairs(), self.surrogate_texts, self.folders[len(inherited):]):
            if texts is not None and folder not in counted:
                counted.add(folder)
                cached = is_cached(folder, set_record(pipe, ref, texts, config, "surrogate"))
                passes = generation_passes(len(texts), config.num_inference_steps, config.guidance_scale)
                of = f" of {pair['concept']!r}" if len(keys) > 1 else ""
                parts.append((f"surrogate set{of} ({len(texts)} images x {config.num_inference_steps} steps)",
                              None if cached else passes))
        self.concept_texts = None
        self.fim_made = False  # whether fisher() computed the Fisher in this run
        if config.adversarial:  # the inner attack's images of the concept, drawn by this model now
            concept = config.pairs()[-1]["concept"]
            self.concept_texts = repeat_to(concept_prompts(split_concepts(concept), config.templates),
                                           config.adversarial_images)
            cached = is_cached(work / "data" / "concept", set_record(pipe, ref, self.concept_texts, config, "concept"))
            parts.append((f"concept set for --adversarial ({len(self.concept_texts)} images x "
                          f"{config.num_inference_steps} steps)", None if cached else generation_passes(
                              len(self.concept_texts), config.num_inference_steps, config.guidance_scale)))
            rounds = -(-config.max_train_steps // config.adversarial_every)
            parts.append((f"--adversarial inner attacks ({rounds} x {config.adversarial_steps} steps x "
                          f"{config.adversarial_batch_size} images, forward+backward)",
                          rounds * config.adversarial_steps * config.adversarial_batch_size))
        if not config.fim:
            replay_size = len(self.replay_texts) if self.replay_texts is not None else \
                len(given["replay"].latents)
            self.fim_count = min(config.fim_num_images or max(1, replay_size // DEFAULT_FIM_FRACTION), replay_size)
            self.fim_steps = len(timestep_set(pipe.scheduler.config.num_train_timesteps,
                                              config.fim_num_timesteps or DEFAULT_FIM_TIMESTEPS))
            name, passes = fisher_cost(self.fim_count, self.fim_steps)
            parts.append((name, passes))
        steps = config.max_train_steps * config.gradient_accumulation_steps
        parts.append((f"training ({config.max_train_steps} steps x {2 * config.train_batch_size * num_processes} "
                      f"images x {config.gradient_accumulation_steps} accumulation, forward+backward)",
                      steps * 2 * config.train_batch_size * num_processes))
        announce("forget", parts)

    def sets(self, accelerator) -> tuple[ImageSet, list[ImageSet]]:
        """The replay set, and one surrogate set per pair (inherited pairs first)."""
        config, pipe, ref = self.config, self.pipe, self.ref
        if config.replay_dir:
            replay = self.given["replay"]
        else:
            replay = generate_image_set(pipe, ref, self.replay_texts, config, self.replay_dir, "replay",
                                        accelerator, reuse=True)
        surrogates, made = [], {}
        for pair, folder in zip(self.inherited, self.folders):
            if folder not in made:
                if accelerator.is_main_process and not same_set(folder, pair["set"].path):
                    # A set left in our work folder by a run on another --model is replaced.
                    shutil.rmtree(folder, ignore_errors=True)
                    link_set(pair["set"].path, folder)
                accelerator.wait_for_everyone()
                made[folder] = load_image_set(folder)
            surrogates.append(made[folder])
        for i, (pair, texts, folder) in enumerate(zip(config.pairs(), self.surrogate_texts,
                                                        self.folders[len(self.inherited):])):
            if folder in made:  # a surrogate an earlier pair shares
                surrogates.append(made[folder])
                continue
            if pair["surrogate_dir"]:
                surrogates.append(self.given[f"surrogate {i + 1}"])
            elif pair["surrogate_images"]:
                surrogates.append(encode_image_folder(pipe, ref, pair["surrogate_images"], folder, config.resolution,
                                                      accelerator, reuse=True))
            else:
                surrogates.append(generate_image_set(pipe, ref, texts, config, folder, "surrogate", accelerator,
                                                     reuse=True))
            made[folder] = surrogates[-1]
        return replay, surrogates

    def preserve_set(self, accelerator) -> ImageSet | None:
        """--preserve: the neighbours' images drawn by the model (cached beside its replay set), or
        the earlier run's; None without neighbours to hold."""
        if "preserve" in self.given:
            return self.given["preserve"]
        if self.preserve_texts is None:
            return None
        return generate_image_set(self.pipe, self.ref, self.preserve_texts, self.preserve_settings, self.preserve_dir,
                                  "preserve", accelerator, reuse=True, stream="preserve")

    def concept_set(self, accelerator) -> ImageSet:
        """--adversarial: images of the concept (OUT/data/concept), drawn by the model before it forgets."""
        return generate_image_set(self.pipe, self.ref, self.concept_texts, self.config, self.work / "data" / "concept",
                                  "concept", accelerator, reuse=True)

    def fisher(self, replay: ImageSet, accelerator) -> Path:
        """The cached Fisher over `replay`: reused when its recorded settings match, else made now. A
        LoRA run reads only its adapted layers' entries: a cached Fisher of every parameter serves it
        too; else it makes one of those layers alone, on its base as loaded (16-bit under mixed precision)."""
        config = self.config
        wanted = {"num_samples": str(self.fim_count), "num_timesteps": str(self.fim_steps), "seed": str(config.seed),
                  "replay_set": str(replay.path), "mixed_precision": accelerator.mixed_precision}
        lora = lora_layers(self.pipe, config)
        candidates = [wanted]
        if lora is not None:
            candidates.append({**wanted, **lora_metadata(self.pipe, lora)})  # as write_fisher_of_set records it
        for settings in candidates:
            path = self.entry / f"fim-{digest(settings)}.safetensors"
            if path.is_file():
                with safe_open(str(path), framework="pt") as f:
                    metadata = f.metadata() or {}
                if all(metadata.get(k) == v for k, v in settings.items()):
                    return path
        path = self.entry / f"fim-{digest(candidates[-1])}.safetensors"  # the run's own kind
        self.fim_made = True
        write_fisher_of_set(self.pipe, self.ref, replay, self.fim_count, self.fim_steps, config.seed,
                            None, config.gradient_checkpointing, accelerator, path, max_memory=config.max_memory,
                            lora=lora)
        return path


def lora_layers(pipe, config: ForgetConfig) -> tuple[str, list[str]] | None:
    """A LoRA run's --lora-targets and the weights of the layers they adapt (what its Fisher
    covers); None otherwise."""
    if not config.lora_rank:
        return None
    return config.lora_targets, lora_weights(family_of(pipe).denoiser_of(pipe), config.train_method,
                                             config.lora_target_list())


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


def preserved(config: ForgetConfig, record: dict) -> dict | None:
    """The neighbours this run holds (--preserve, never one of the concepts forgotten, earlier runs'
    included): {value, names, prompts}. Without --preserve, after an earlier forget run (its
    amnesia.json `record`) that held some, its preserve set, as the replay set is passed on:
    {value, names, prompts, images, set (a Path)}; not when it is gone or holds a concept this run
    forgets (said in one line). None: no neighbours to hold."""
    forgotten = config.concept_list() + list(record.get("concepts", []))
    if config.preserve is not None:
        names = neighbor_names(config.preserve, forgotten, "--preserve")
        return {"value": config.preserve, "names": names, "prompts": concept_prompts(names, config.templates)}
    earlier = record.get("preserve")
    if not earlier:
        return None
    path = Path(earlier["set"])
    path = path if path.is_absolute() else model_path(config.model) / path
    clash = [n for n in earlier["names"] if n.lower() in {c.lower() for c in forgotten}]
    if clash:
        print(f"the earlier run's preserve set holds {clash[0]!r}, which this run forgets: it is not replayed "
              "(name the neighbours to keep with --preserve)", flush=True)
        return None
    if not is_finished(path):
        print(f"the earlier run's preserve set {path} is gone: its neighbours are not held (make it again on "
              f"{config.model} with --preserve {earlier['value']!r})", flush=True)
        return None
    return {**earlier, "set": path}


def holds_unconditional(path: Path, share: float) -> bool:
    """The finished set at `path` ends with the empty prompts with_unconditional(..., share) appends."""
    prompts = load_image_set(path).prompts
    empty = prompts.count("")
    return with_unconditional(prompts[: len(prompts) - empty], share) == prompts
