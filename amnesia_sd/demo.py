"""`amnesia-sd demo`: the paper's class-forgetting experiment on the built-in digits model.

replay -> Fisher -> forget one digit -> evaluate, through the same library functions as the Stable
Diffusion commands. Three models are sampled on the same seeds: the original, Selective Amnesia,
and the paper's naive baseline (surrogate term only: lambda = 0, gamma = 0, same steps). A digit
classifier trained on real digits judges the samples.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import digits
from .config import SEED_LIMIT, FimConfig, ForgetConfig, GenerationSettings, _check, _check_positive, check_types
from .fisher import compute_fim
from .forget import forget
from .generate import generate, image_seed
from .grid import make_grid
from .imageset import generate_image_set
from .io import atomic_path, write_json
from .models import load_on_device, make_accelerator
from .paths import Output, discard_on_failure, guard, open_work, publish, stamp

MODELS = ("original", "sa", "naive")
FULL_LEARNING_RATE = 5e-4
LORA_LEARNING_RATE = 5e-3
GRID_SAMPLES = 4


@dataclass
class DemoConfig:
    digit: int = 0
    surrogate: str = "noise"  # uniform noise images (the paper), or another digit "0".."9"
    output_dir: str = "demo-output"
    samples_per_digit: int = 100
    replay_per_digit: int = 50
    surrogate_images: int = 500
    fim_per_digit: int = 20
    fim_timesteps: int = 100
    max_train_steps: int = 400
    train_batch_size: int = 32
    # 5e-4 met the targets at training seeds 0, 1 and 2 (p_forgotten <= 0.025, held-out <= 0.046);
    # 2e-4 missed them at two of three (README, the demo). LoRA adapters take LORA_LEARNING_RATE.
    learning_rate: float | None = None
    lora_rank: int | None = None  # SA and naive train LoRA adapters of this rank instead of the UNet
    lora_targets: str = "to_q,to_k,to_v,to_out.0,conv1,conv2"
    # The paper's lambda = 50 is for SD v1.4. This 1M-parameter model's Fisher is orders of magnitude
    # larger per parameter: at lambda >= 0.01 EWC holds it too close to theta* to forget in 400 steps.
    lambda_ewc: float = 1e-4
    gamma: float = 1.0
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 250
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        _check(0 <= self.seed < SEED_LIMIT - 1, f"--seed must be in [0, 2**31 - 1), got {self.seed}")
        _check(0 <= self.digit <= 9, f"--digit must be 0..9, got {self.digit}")
        _check(
            self.surrogate == "noise" or (self.surrogate.isdigit() and len(self.surrogate) == 1),
            f"--surrogate must be 'noise' or a digit 0..9, got {self.surrogate!r}",
        )
        _check(self.surrogate != str(self.digit), "--surrogate is the digit being forgotten: pick another digit or 'noise'")
        if self.learning_rate is None:
            self.learning_rate = LORA_LEARNING_RATE if self.lora_rank else FULL_LEARNING_RATE
        for name in ("samples_per_digit", "replay_per_digit", "surrogate_images", "fim_per_digit", "fim_timesteps",
                     "max_train_steps", "train_batch_size", "learning_rate", "num_inference_steps", "batch_size",
                     "lora_rank"):
            _check_positive(name, getattr(self, name))


def per_digit_prompts(prompts_for, count: int, which) -> list[str]:
    """`count` prompts per digit, cycling through each digit's phrasings; digit-major order."""
    return [prompts_for(d)[i % len(prompts_for(d))] for d in which for i in range(count)]


def noise_images(folder: Path, count: int, size: int, seed: int) -> Path:
    """The paper's surrogate for a class: uniform noise images (grey, like the digits); a folder
    that appears only when complete."""
    if folder.is_dir():
        return folder
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
        Image.fromarray(pixels, "L").convert("RGB").save(work / f"{i:05d}.png", format="PNG")
    os.replace(work, folder)
    return folder


def sample_and_classify(spec: str, prompts: list[str], seeds: list[int], settings, accelerator, classifier):
    """Images and the classifier's probabilities [N, 10] for one model."""
    _, pipe = load_on_device(spec, accelerator)
    images = [image for _, _, image in tqdm(generate(pipe, prompts, seeds, settings), total=len(prompts),
                                            desc=f"sampling {Path(spec).name}", unit="img")]
    return images, digits.classify(images, classifier)


def evaluation_samples(digit: int, per_digit: int, seed: int) -> tuple[list[str], list[int]]:
    """The demo's evaluation prompts and seeds, in the order summarize() reads them: `per_digit`
    per digit on training phrasings (digit-major, seeds (seed, i)), then `per_digit` of `digit` on
    held-out phrasings (seeds (seed + 1, i)). `amnesia-sd eval` samples the same list."""
    prompts = per_digit_prompts(digits.train_prompts, per_digit, range(10))
    heldout = per_digit_prompts(digits.heldout_prompts, per_digit, [digit])
    seeds = [image_seed(seed, i) for i in range(len(prompts))] + [image_seed(seed + 1, i) for i in range(per_digit)]
    return prompts + heldout, seeds


def summarize(probs: torch.Tensor, heldout: torch.Tensor, digit: int, per_digit: int) -> dict:
    by_digit = probs.view(10, per_digit, 10)
    forgotten = by_digit[digit]
    entropy = digits.prediction_entropy(forgotten)
    others = [d for d in range(10) if d != digit]
    correct = torch.stack([by_digit[d].argmax(-1) == d for d in others])
    return {
        "p_forgotten": forgotten[:, digit].mean().item(),
        "entropy_forgotten": entropy.mean().item(),
        "acc_retained": correct.float().mean().item(),
        "p_forgotten_heldout": heldout[:, digit].mean().item(),
    }


def run_demo(config: DemoConfig) -> dict:
    """Everything is built in OUT.partial and put in place when complete; the image sets and the
    Fisher are caches of the base model (in the amnesia-sd cache), reused by later demos."""
    started = time.time()
    out = Path(config.output_dir)
    base = digits.ensure_digits_model()
    guard([Output("--output-dir", out, "metrics.json", "demo")], {"the digits model": base}, config.overwrite)
    accelerator = make_accelerator()
    ref, pipe = load_on_device(str(base), accelerator)
    settings = GenerationSettings(num_inference_steps=config.num_inference_steps,
                                  guidance_scale=config.guidance_scale, seed=config.seed, batch_size=config.batch_size)
    everything_else = [d for d in range(10) if d != config.digit]
    cache = digits.cache_dir() / "demo"
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"{base.name}-s{config.seed}-{config.num_inference_steps}x{config.guidance_scale:g}"

    # The Fisher over all ten digits, once per base model (cached beside it, like the paper's).
    fim = cache / f"{tag}-fim-{config.fim_per_digit}x{config.fim_timesteps}.safetensors"
    if not fim.is_file():
        fim_set = generate_image_set(pipe, ref, per_digit_prompts(digits.train_prompts, config.fim_per_digit, range(10)),
                                     settings, fim.with_suffix(".replay"), "replay", accelerator, reuse=True)
        compute_fim(FimConfig(model=str(base), output=str(fim), replay_dir=str(fim_set.path),
                              num_timesteps=config.fim_timesteps, seed=config.seed, overwrite=True))

    # Generative replay over the remaining digits; the surrogate set for the forgotten one.
    replay = generate_image_set(pipe, ref, per_digit_prompts(digits.train_prompts, config.replay_per_digit, everything_else),
                                settings, cache / f"{tag}-replay-without-{config.digit}-{config.replay_per_digit}",
                                "replay", accelerator, reuse=True)
    surrogate: dict = {}
    if config.surrogate == "noise":
        surrogate["surrogate_images"] = str(noise_images(cache / f"noise-{config.surrogate_images}-s{config.seed}",
                                                         config.surrogate_images, digits.IMAGE_SIZE, config.seed))
    else:
        prompts = per_digit_prompts(digits.train_prompts, config.surrogate_images, [int(config.surrogate)])
        surrogate["surrogate_dir"] = str(generate_image_set(
            pipe, ref, prompts, settings, cache / f"{tag}-surrogate-{config.surrogate}-{config.surrogate_images}",
            "surrogate", accelerator, reuse=True).path)
    del pipe

    work, _ = open_work(out, "demo", {}, keep=False)
    with discard_on_failure(work):
        # The forgotten digit is named by every training phrasing, as SA prompts a class by its label.
        common = dict(
            model=str(base), concept=", ".join(digits.train_prompts(config.digit)), templates=False,
            fim=str(fim), replay_dir=str(replay.path), train_batch_size=config.train_batch_size,
            max_train_steps=config.max_train_steps, learning_rate=config.learning_rate, seed=config.seed,
            checkpointing_steps=config.max_train_steps, lora_rank=config.lora_rank, lora_targets=config.lora_targets, **surrogate,
        )
        forget(ForgetConfig(output_dir=str(work / "sa"), lambda_ewc=config.lambda_ewc, gamma=config.gamma, **common))
        forget(ForgetConfig(output_dir=str(work / "naive"), lambda_ewc=0.0, gamma=0.0, **common))

        # Every model samples the same prompts with the same seeds.
        n = config.samples_per_digit
        prompts, seeds = evaluation_samples(config.digit, n, config.seed)
        classifier = digits.load_digit_classifier()
        metrics: dict = {**stamp(), "forgotten_digit": config.digit, "surrogate": config.surrogate,
                         "samples_per_digit": n, "base_model_path": str(base)}
        if config.lora_rank:  # what a user downloads: the adapter file alone
            metrics["adapter_bytes"] = json.loads((work / "sa" / "amnesia.json").read_text())["lora"]["bytes"]
        rows: list[list[Image.Image]] = [[] for _ in range(10)]
        shown = min(GRID_SAMPLES, n)  # per digit and model, never another digit's samples
        for name, spec in zip(MODELS, (str(base), str(work / "sa"), str(work / "naive"))):
            images, probs = sample_and_classify(spec, prompts, seeds, settings, accelerator, classifier)
            metrics[name] = summarize(probs[: 10 * n], probs[10 * n :], config.digit, n)
            for d in range(10):
                rows[d].extend(images[d * n : d * n + shown])
        labels = [label for name in ("original", "SA", "naive") for label in [name] + [""] * (shown - 1)]
        with atomic_path(work / "grid.png") as tmp:
            make_grid(rows, labels=labels).save(tmp, format="PNG")
        metrics["settings"] = asdict(config)
        metrics["seconds"] = round(time.time() - started, 1)
        write_json(work / "metrics.json", metrics)
    publish(work, out)
    return metrics


def format_table(metrics: dict) -> str:
    keys = ("p_forgotten", "p_forgotten_heldout", "entropy_forgotten", "acc_retained")
    lines = [f"{'model':<10}" + "".join(f"{k:>22}" for k in keys)]
    for name in MODELS:
        lines.append(f"{name:<10}" + "".join(f"{metrics[name][k]:>22.3f}" for k in keys))
    if "adapter_bytes" in metrics:
        lines.append(f"LoRA rank {metrics['settings']['lora_rank']}: the adapter is {metrics['adapter_bytes']:,} bytes")
    return "\n".join(lines)
