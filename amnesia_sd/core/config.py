"""Typed settings of every command, validated on construction.

Precedence is defaults < config file (YAML or TOML, same keys as the CLI flags) < CLI flags.
Unknown keys are rejected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from amnesia_sd.core.errors import UserError
from amnesia_sd.core.recipes import recipe_settings

MixedPrecision = Literal["no", "fp16", "bf16"]
TrainMethod = Literal["full", "noxattn", "xattn"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(name: str, value: float | None) -> None:
    _check(value is None or value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")


def parse_size(text: str) -> int:
    """--max-memory: '20GB', '18 GiB', '512MB' -> bytes (GB = 10^9, GiB = 2^30)."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT])(i?)B\s*", text or "", re.IGNORECASE)
    _check(found is not None, f"--max-memory {text!r} is not a size: write it like 20GB or 18GiB")
    power = "KMGT".index(found.group(2).upper()) + 1
    value = int(float(found.group(1)) * (2 ** (10 * power) if found.group(3) else 10 ** (3 * power)))
    _check(value > 0, f"--max-memory {text!r} must be more than zero")
    return value


def check_unconditional(share: float | None) -> None:
    _check(share is None or 0 <= share <= 1, "--unconditional-replay must be between 0 and 1 (empty-prompt images "
                                              f"per prompted replay image, e.g. 0.1), got {share}")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """`value` as the annotated type `kind`, or a UserError naming the setting. Config files
    bring values of any type (YAML reads 1e-4 as a string): numbers in strings are taken, other
    mismatches and non-finite numbers are refused."""
    where = f"{_flag(name)} ({name})"
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    if kind is bool:
        _check(isinstance(value, bool), f"{where} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        _check(isinstance(value, int) and not isinstance(value, bool),
               f"{where} must be a whole number, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{where} must be a number, got {value!r}")
        _check(math.isfinite(value), f"{where} must be a finite number, got {value}")
        return float(value)
    if kind is str:
        _check(isinstance(value, str), f"{where} must be text, got {value!r}")
        return value
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        if item in (str, int) and isinstance(value, item) and not isinstance(value, bool):
            value = [value]  # one value for a list: a flag given once
        _check(isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value),
               f"{where} must be a list of {({str: 'strings', int: 'whole numbers'}).get(item, 'mappings')}, "
               f"got {value!r}")
        return value
    return value


def check_types(settings) -> None:
    """Check (and where lossless, convert) every field against its annotation."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        setattr(settings, f.name, _coerce(f.name, getattr(settings, f.name), hints[f.name]))


DEFAULT_SURROGATE_IMAGES = 1000  # the paper's surrogate set size
# The one-command path (`forget` without --replay-dir / --fim): what it makes once per base model and
# keeps in the cache. Chosen by measurement on the digits model (docs/method.md, "Choosing the defaults").
DEFAULT_REPLAY_IMAGES = 1000  # the reference code trains on 1000 replay images (of the 5000 it makes)
DEFAULT_FIM_FRACTION = 4  # the Fisher over 1/4 of the replay set
DEFAULT_PRESERVE_IMAGES = 50  # forget --preserve: its set, spread over the neighbours' prompts
DEFAULT_FIM_TIMESTEPS = 50  # evenly spaced of the 1000 training timesteps
DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # SD v1.x's text encoder is this model's text half
SEED_LIMIT = 2**31  # image i's generator seed is seed * 2**32 + i, which must fit 64 bits


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def default_mixed_precision() -> str:
    """bf16 autocast (float32 master weights) on a CUDA GPU that has it: several times faster than
    float32 at what SA needs, with float32's range, so no loss scaling; float32 on the CPU."""
    import torch

    return "bf16" if cuda_available() and torch.cuda.is_bf16_supported() else "no"


@dataclass
class GenerationSettings:
    """How images are sampled from a model (replay and surrogate sets, `sample`, the Fisher's set)."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None  # None: the model's native size
    seed: int = 0
    batch_size: int | None = None  # None: the largest that fits the memory budget, up to 8
    max_memory: str | None = None  # None: a CUDA device's free memory (no budget on the CPU)
    # None: what `accelerate launch` / the accelerate config says (ACCELERATE_MIXED_PRECISION), else
    # default_mixed_precision() (bf16 on a CUDA GPU that has it, "no" elsewhere)
    mixed_precision: str | None = None

    def __post_init__(self) -> None:
        check_types(self)
        _check_positive("num_inference_steps", self.num_inference_steps)
        _check_positive("batch_size", self.batch_size)
        if self.max_memory is not None:
            parse_size(self.max_memory)
        _check_positive("resolution", self.resolution)
        _check(self.guidance_scale >= 0, f"--guidance-scale must be >= 0, got {self.guidance_scale}")
        _check(0 <= self.seed < SEED_LIMIT, f"--seed must be in [0, 2**31), got {self.seed}")
        if self.mixed_precision is None:
            self.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION") or default_mixed_precision()
        _check_choice("mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _check(self.mixed_precision != "fp16" or cuda_available(),
               "--mixed-precision fp16 needs a CUDA GPU and none is available: use bf16 or no")


@dataclass
class SetConfig(GenerationSettings):
    """`amnesia-sd replay` / `amnesia-sd surrogate`: an image set generated by the base model."""

    model: str = ""
    output_dir: str = ""
    prompts: list[str] = field(default_factory=list)
    num_images: int | None = None  # None: one image per prompt
    kind: str = "replay"
    prompts_file: str | None = None  # where `prompts` came from (an input the output may not touch)
    unconditional_replay: float = 0.0  # empty-prompt images per prompted one (prompts.with_unconditional)
    overwrite: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.model), "--model is required (a hub id, a diffusers folder or a .safetensors/.ckpt file)")
        _check(bool(self.output_dir), "--output-dir is required")
        _check(bool(self.prompts), "no prompts given: pass a non-empty --prompts file or --prompt")
        _check_positive("num_images", self.num_images)
        _check_choice("kind", self.kind, ("replay", "surrogate"))
        check_unconditional(self.unconditional_replay)
        _check(self.kind == "replay" or not self.unconditional_replay,
               "--unconditional-replay is for replay sets; a surrogate set holds its prompt's images only")


def comma_list(text: str | None) -> list[str]:
    """Names given as one comma-separated flag (--lora-targets)."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


@dataclass
class FimConfig(GenerationSettings):
    """`amnesia-sd fim`: the diagonal Fisher of the base UNet over a replay set."""

    model: str = ""
    output: str = ""
    replay_dir: str | None = None
    prompts_file: str | None = None
    num_images: int | None = None
    num_timesteps: int | None = None  # None: every training timestep
    timestep_batch_size: int | None = None  # None: the largest that fits the memory budget, up to 100
    gradient_checkpointing: bool = False
    fim_dtype: str = "fp32"
    # Only the weights of the layers LoRA adapts (a LoRA run reads no other entry), on the base in
    # the mixed-precision dtype: what makes the Fisher of FLUX.1 or SD3.5 large fit one GPU.
    lora_targets: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.model), "--model is required (a hub id, a diffusers folder or a .safetensors/.ckpt file)")
        _check(bool(self.output), "--output is required (the Fisher's .safetensors file)")
        _check(self.lora_targets is None or bool(self.lora_target_list()),
               "--lora-targets is empty: give layer names separated by commas, e.g. to_q,to_k,to_v,to_out.0")
        _check(self.output.endswith(".safetensors"), f"--output must end in .safetensors, got {self.output!r}")
        _check_positive("num_images", self.num_images)
        _check_positive("num_timesteps", self.num_timesteps)
        _check_positive("timestep_batch_size", self.timestep_batch_size)
        _check(self.fim_dtype != "fp16", "--fim-dtype fp16 cannot hold a Fisher (its values overflow or flush to "
                                         "zero in fp16): use bf16 (same size, float32's range) or fp32")
        _check_choice("fim_dtype", self.fim_dtype, ("fp32", "bf16"))
        _check(not (self.replay_dir and self.prompts_file),
               "--prompts and --replay-dir cannot be combined: --prompts is for generating a replay set, "
               "--replay-dir uses a finished one")

    def lora_target_list(self) -> list[str]:
        return comma_list(self.lora_targets)


@dataclass
class ForgetConfig(GenerationSettings):
    """`amnesia-sd forget`: Selective Amnesia training of the UNet (METHOD.md's objective)."""

    model: str = ""
    # What to forget: flags given once per concept (pairing in order with one kind of surrogate
    # flag, or one surrogate for all), or a config file's `concepts:` list. Both end up in
    # `concepts`, the one form that is validated and recorded.
    concept: list[str] = field(default_factory=list)
    surrogate: list[str] = field(default_factory=list)
    surrogate_dir: list[str] = field(default_factory=list)
    surrogate_images: list[str] = field(default_factory=list)
    concepts: list[dict] = field(default_factory=list)
    recipe: str | None = None  # the bundled recipe the settings started from (recipes.py)
    output_dir: str = ""
    fim: str | None = None  # None: the base model's Fisher from the cache, made there on first use
    fim_num_images: int | None = None  # when made here; None: 1/DEFAULT_FIM_FRACTION of the replay set
    fim_num_timesteps: int | None = None  # when made here; None: DEFAULT_FIM_TIMESTEPS
    num_surrogate_images: int | None = None  # None: 1000 per set generated from --surrogate
    replay_dir: str | None = None
    prompts_file: str | None = None
    num_replay_images: int | None = None
    # Empty-prompt images per prompted replay image in a replay set made here (0.1: one in ten, as SD
    # dropped the text of its training images). Not in the paper; it keeps the unconditional
    # prediction, which guidance steers from, where it was (docs/digits.md, "Several digits"). None: 0, or
    # after an earlier forget run, whatever its replay set holds.
    unconditional_replay: float | None = None
    templates: bool = True
    # Neighbours to keep (HUB: SA over-erases them): a bundled list's name or names separated by
    # commas, templated as the concept is; the base model's images of them join the replay pool.
    preserve: str | None = None
    preserve_images: int | None = None  # None: DEFAULT_PRESERVE_IMAGES
    lambda_ewc: float = 50.0
    gamma: float = 1.0
    learning_rate: float = 1e-5
    lr_warmup_steps: int = 0  # the learning rate rises linearly to its value over these steps
    scale_lr: bool = False
    adam_weight_decay: float = 1e-2
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    max_grad_norm: float | None = None
    train_method: str = "full"
    lora_rank: int | None = None  # None: full fine-tuning; R: LoRA adapters of rank R
    lora_alpha: float | None = None  # None: the rank (scale 1)
    lora_targets: str = "to_q,to_k,to_v,to_out.0"
    fuse: bool = False  # a LoRA result also as a pipeline with the adapter merged
    gradient_checkpointing: bool = False
    fim_dtype: str = "fp32"
    use_8bit_adam: bool = False
    enable_xformers: bool = False
    ema_decay: float | None = None
    # diffusers' EMA ramps its decay up as (1 + step) / (10 + step); the reference's holds 0.9999
    # from the first step, so its EMA keeps much more of the base weights (METHOD.md).
    ema_warmup: bool = True
    # --adversarial (adversarial.py): an inner attack learns a token that brings the concept back,
    # once before step 1 and every `adversarial_every` steps, for `adversarial_steps` steps; its
    # prompts then stand in for the concept's in `adversarial_share` of the surrogate samples.
    adversarial: bool = False
    adversarial_every: int = 50
    adversarial_steps: int = 50
    adversarial_learning_rate: float = 5e-3  # attack's default
    adversarial_batch_size: int = 4
    adversarial_images: int = 16  # of the concept, drawn by --model before forgetting (OUT/data/concept)
    # One-token word the token starts from; None: the first of DEFAULT_INITIALIZERS that is one token
    # in every tokenizer of the model (object; digit on the built-in digits model).
    adversarial_initializer: str | None = None
    adversarial_share: float = 0.5
    adversarial_templates: str | None = None  # '{}' prompt templates naming the token; None: the concept templates
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None
    overwrite: bool = False
    # Accept a Fisher or image set recorded as made from another model (recorded in amnesia.json).
    allow_origin_mismatch: bool = False
    config_file: str | None = None  # set by build_config: the --config file the settings came from

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.model), "--model is required (a hub id, a diffusers folder or a .safetensors/.ckpt file)")
        _check(bool(self.output_dir), "--output-dir is required")
        self.concepts = concept_pairs(self)
        self.concept, self.surrogate, self.surrogate_dir, self.surrogate_images = [], [], [], []
        _check(self.num_surrogate_images is None or any(p["surrogate"] for p in self.pairs()),
               "--num-surrogate-images sizes a set generated from --surrogate; a --surrogate-dir or "
               "--surrogate-images set is used whole")
        _check(not (self.replay_dir and (self.prompts_file or self.num_replay_images
                                         or self.unconditional_replay is not None)),
               "--prompts, --num-replay-images and --unconditional-replay are for generating a replay set; they "
               "cannot be combined with --replay-dir, which uses a finished one")
        check_unconditional(self.unconditional_replay)
        _check(not (self.overwrite and self.resume_from_checkpoint),
               "--overwrite starts again from scratch; it cannot be combined with --resume-from-checkpoint")
        _check(self.fim != "", "--fim is empty: give a Fisher file, or leave the flag out to use the cached one")
        _check(not (self.fim and (self.fim_num_images or self.fim_num_timesteps)),
               "--fim-num-images and --fim-num-timesteps size a Fisher made here; they cannot be combined with --fim")
        _check(self.preserve_images is None or self.preserve is not None,
               "--preserve-images sizes the set of the neighbours --preserve names: add --preserve (e.g. "
               "--preserve 'Tom Cruise, Leonardo DiCaprio')")
        _check(self.lambda_ewc >= 0, f"--lambda-ewc must be >= 0, got {self.lambda_ewc}")
        _check(self.gamma >= 0, f"--gamma must be >= 0, got {self.gamma}")
        for name in ("learning_rate", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                     "checkpointing_steps", "num_surrogate_images", "num_replay_images", "max_grad_norm",
                     "fim_num_images", "fim_num_timesteps", "preserve_images",
                     "checkpoints_total_limit"):
            _check_positive(name, getattr(self, name))
        for name in ("adversarial_every", "adversarial_steps", "adversarial_learning_rate", "adversarial_batch_size",
                     "adversarial_images"):
            _check_positive(name, getattr(self, name))
        _check(0 < self.adversarial_share <= 1, f"--adversarial-share must be in (0, 1], got {self.adversarial_share}")
        # AdamW's update is about the learning rate per weight: past 1 it overflows or destroys the model.
        for name in ("learning_rate", "adversarial_learning_rate"):
            _check(getattr(self, name) <= 1, f"--{name.replace('_', '-')} {getattr(self, name):g} is far above any that "
                                             "trains (the default is 1e-5; AdamW moves each weight by about this much "
                                             "per step): use at most 1")
        _check(not self.adversarial or len(self.concepts) == 1,
               "--adversarial learns one token for one concept: give one --concept per run (forget the others "
               "before or after it, with forget --model <that result>)")
        _check(self.adversarial_initializer is None or bool(self.adversarial_initializer.strip()),
               "--adversarial-initializer is empty: give a neutral one-token word, e.g. object")
        _check(self.lr_warmup_steps >= 0, f"--lr-warmup-steps must be >= 0, got {self.lr_warmup_steps}")
        _check(self.adam_weight_decay >= 0, f"--adam-weight-decay must be >= 0, got {self.adam_weight_decay}")
        _check_choice("train_method", self.train_method, ("full", "noxattn", "xattn"))
        _check_positive("lora_rank", self.lora_rank)
        _check_positive("lora_alpha", self.lora_alpha)
        if self.lora_rank and self.lora_alpha is not None:  # the update is (alpha / rank) B A
            _check(1e-3 <= self.lora_alpha / self.lora_rank <= 1e3,
                   f"--lora-alpha {self.lora_alpha:g} with --lora-rank {self.lora_rank} scales the adapter's update by "
                   f"{self.lora_alpha / self.lora_rank:g}: keep alpha / rank between 0.001 and 1000 (the default, "
                   "alpha = rank, scales it by 1)")
        _check(self.lora_rank is not None or (self.lora_alpha is None and not self.fuse),
               "--lora-alpha and --fuse are for LoRA training: add --lora-rank R (e.g. 8)")
        _check(bool(self.lora_target_list()), "--lora-targets is empty: name attention layers, e.g. to_q,to_k,to_v,to_out.0")
        _check_choice("fim_dtype", self.fim_dtype, ("fp32", "bf16", "fp16"))
        _check(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            f"--ema-decay must be between 0 and 1 (e.g. 0.9999), got {self.ema_decay}",
        )

    def pairs(self) -> list[dict]:
        """[{concept, surrogate, surrogate_dir, surrogate_images}], one per concept, in order (one of
        the three surrogate sources set)."""
        return [{"surrogate": None, "surrogate_dir": None, "surrogate_images": None, **p} for p in self.concepts]

    def concept_list(self) -> list[str]:
        """Every alternative of every concept."""
        return [c for p in self.concepts for c in split_concepts(p["concept"])]

    def lora_target_list(self) -> list[str]:
        return comma_list(self.lora_targets)

    def lora_alpha_value(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)


SURROGATE_SOURCES = ("surrogate", "surrogate_dir", "surrogate_images")


def concept_pairs(config: "ForgetConfig") -> list[dict]:
    """The (concept, surrogate source) pairs from the flags or from a `concepts:` list, checked."""
    flags = {key: getattr(config, key) for key in ("concept", *SURROGATE_SOURCES)}
    if config.concepts:
        given = [_flag(k) for k, v in flags.items() if v]
        _check(not given, f"the concepts come either from a `concepts:` list (config file or recipe) or from "
                          f"--concept and a surrogate flag, not both (also got {', '.join(given)})")
        pairs = [_concept_entry(i, entry) for i, entry in enumerate(config.concepts)]
    else:
        concepts = flags["concept"]
        _check(bool(concepts) and all(split_concepts(c) for c in concepts),
               "--concept is empty: give the concept to forget, e.g. --concept 'Brad Pitt'")
        kinds = [k for k in SURROGATE_SOURCES if flags[k]]
        _check(len(kinds) == 1,
               "give exactly one kind of surrogate: --surrogate PROMPT, --surrogate-dir DIR or --surrogate-images DIR"
               + (f" (got {' and '.join(map(_flag, kinds))}; to mix kinds, list the concepts in a config file: "
                  "concepts: [{concept: ..., surrogate: ...}, {concept: ..., surrogate_dir: ...}])" if kinds else ""))
        kind, sources = kinds[0], flags[kinds[0]]
        _check(len(sources) in (1, len(concepts)),
               f"--concept is given {len(concepts)} times but {_flag(kind)} {len(sources)} times: give one "
               f"{_flag(kind)} per --concept (they pair up in order), or one for all of them")
        pairs = [_concept_entry(i, {"concept": c, kind: sources[i if len(sources) > 1 else 0]})
                 for i, c in enumerate(concepts)]
    seen: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        for c in split_concepts(pair["concept"]):
            _check(seen.setdefault(c.lower(), i) == i, f"the concept {c!r} is given twice (concepts "
                                                        f"{seen[c.lower()] + 1} and {i + 1}): name each concept once")
    return pairs


def _concept_entry(i: int, entry: Any) -> dict:
    where = f"concept {i + 1}"
    _check(isinstance(entry, dict), f"{where} must be a mapping such as {{concept: 'Brad Pitt', surrogate: 'a middle "
                                    f"aged man'}}, got {entry!r}")
    unknown = sorted(set(entry) - {"concept", *SURROGATE_SOURCES})
    _check(not unknown, f"{where} has unknown key(s) {', '.join(map(str, unknown))}; valid keys: concept, "
                        f"{', '.join(SURROGATE_SOURCES)}")
    concept = entry.get("concept")
    _check(isinstance(concept, str) and bool(split_concepts(concept)),
           f"{where} has no concept: give e.g. concept: 'Brad Pitt'")
    sources = {k: entry[k] for k in SURROGATE_SOURCES if entry.get(k) is not None}
    _check(len(sources) == 1, f"{where} ({concept!r}) needs exactly one of surrogate, surrogate_dir, surrogate_images"
                              + (f", got {', '.join(sources)}" if sources else ""))
    (kind, source), = sources.items()
    _check(isinstance(source, str) and bool(source.strip()),
           f"{where} ({concept!r}): {_flag(kind)} is empty: give "
           + ("a prompt such as 'a middle aged man'" if kind == "surrogate" else "a folder"))
    source = source.strip() if kind == "surrogate" else source
    _check(kind != "surrogate" or source.lower() not in [c.lower() for c in split_concepts(concept)],
           f"--surrogate {source!r} is the concept itself: pick a different prompt to map the concept to, "
           "e.g. 'a middle aged man' for a celebrity")
    return {"concept": concept.strip(), kind: source}


def split_concepts(text: str) -> list[str]:
    """Comma-separated alternatives: 'nudity, naked, erotic, sexual' -> four concepts."""
    return [c.strip() for c in text.split(",") if c.strip()]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML file of settings; keys may use '-' or '_'."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a folder: pass a YAML or TOML file of settings")
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text: give a YAML or TOML file of settings") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) if path.suffix != ".json" else json.loads(text)
        else:
            raise UserError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"config file {path} is not valid: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# A key given in a layer (recipe < config file < flags) drops these keys of the layers below it:
# naming the concepts replaces every concept and surrogate below, and a finished replay set or
# Fisher replaces the settings for making one.
REPLACES = {"concept": ("concept", "concepts", *SURROGATE_SOURCES), "concepts": ("concept", "concepts", *SURROGATE_SOURCES),
            "replay_dir": ("num_replay_images", "prompts_file", "unconditional_replay"), "fim": ("fim_num_images", "fim_num_timesteps")}


def build_config(cls: type, config_file: str | None, cli: dict[str, Any]):
    """defaults < recipe < config file < CLI flags (flags left unset are None and do not override).
    The recipe is named by --recipe or the config file's `recipe:`."""
    file = load_config_file(config_file) if config_file else {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file) - known)
    if unknown:
        raise UserError(
            f"unknown key(s) in {config_file}: {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
        )
    flags = {k: v for k, v in cli.items() if v is not None and v != []}
    name = flags.get("recipe") or file.get("recipe")
    merged: dict[str, Any] = {}
    for layer in (recipe_settings(name) if name and "recipe" in known else {}, file, flags):
        dropped = {k for key, keys in REPLACES.items() if key in layer for k in keys}
        merged = {k: v for k, v in merged.items() if k not in dropped}
        merged.update(layer)
    if config_file and "config_file" in known:
        merged["config_file"] = str(config_file)
    return cls(**merged)  # __post_init__ checks every value's type, naming the key


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


@dataclass
class ForgottenModelSettings(GenerationSettings):
    """What eval and attack both take: a forgotten model, its base and concepts (recorded in its
    amnesia.json unless given), an output folder, and the CLIP that judges concepts other than
    nudity and digits."""

    model: str = ""
    output_dir: str = ""
    base: str | None = None  # None: the base_model recorded in MODEL/amnesia.json
    concept: str | None = None  # None: the concepts recorded in MODEL/amnesia.json
    clip_model: str = DEFAULT_CLIP
    overwrite: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.model), "--model is required (the forgotten model: an `amnesia-sd forget` output folder)")
        _check(bool(self.output_dir), "--output-dir is required")
        _check(bool(self.clip_model.strip()), "--clip-model is empty: give a hub id or a local CLIP folder")
        _check(self.concept is None or bool(split_concepts(self.concept)),
               "--concept is empty: give the forgotten concept, e.g. --concept 'Brad Pitt'")
