"""`amnesia-sd sample`: images from a model, optionally beside the base model's on the same seeds."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .config import GenerationSettings, _check, _check_positive
from .errors import UserError
from .generate import generate, image_seed
from .grid import make_grid
from .io import atomic_path, write_json
from .models import DTYPES, load_on_device, make_accelerator


@dataclass
class SampleConfig(GenerationSettings):
    model: str = ""
    prompts: list[str] = field(default_factory=list)
    num_images: int = 4  # per prompt
    output_dir: str = ""
    compare: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.model), "--model is required")
        _check(bool(self.output_dir), "--output-dir is required")
        _check(bool(self.prompts), "no prompts given: pass --prompt or a non-empty --prompts file")
        _check_positive("num_images", self.num_images)


def sample_model(spec: str, prompts: list[str], config: SampleConfig, folder: Path, accelerator) -> list[list]:
    """Sample every prompt num_images times; image k of prompt j has seed image_seed(seed, k), so
    every prompt and every model sees the same noise."""
    _, pipe = load_on_device(spec, accelerator, DTYPES[config.mixed_precision])
    flat = [p for p in prompts for _ in range(config.num_images)]
    seeds = [image_seed(config.seed, k) for _ in prompts for k in range(config.num_images)]
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[list] = [[] for _ in prompts]
    with tqdm(total=len(flat), desc=f"sampling {spec}", unit="img") as bar:
        for position, _, image in generate(pipe, flat, seeds, config):
            j, k = divmod(position, config.num_images)
            with atomic_path(folder / f"p{j:03d}_s{k:03d}.png") as tmp:
                image.save(tmp, format="PNG")
            rows[j].append(image)
            bar.update(1)
    return rows


def sample(config: SampleConfig) -> Path:
    out = Path(config.output_dir)
    if (out / "sample.json").is_file() and not config.overwrite:
        raise UserError(f"{out} already holds samples; pass --overwrite to replace them")
    if out.exists() and config.overwrite:
        shutil.rmtree(out)
    accelerator = make_accelerator()
    if not accelerator.is_main_process:  # a handful of images: one process makes them all
        return out
    rows = sample_model(config.model, config.prompts, config, out / "images", accelerator)
    with atomic_path(out / "grid.png") as tmp:
        make_grid(rows).save(tmp, format="PNG")
    if config.compare:
        base_rows = sample_model(config.compare, config.prompts, config, out / "base", accelerator)
        # Each row: the base's images, then the model's, same seeds in the same order.
        pairs = [b + m for b, m in zip(base_rows, rows)]
        labels = ["base"] + [""] * (config.num_images - 1) + ["model"]
        with atomic_path(out / "compare.png") as tmp:
            make_grid(pairs, labels=labels).save(tmp, format="PNG")
    write_json(out / "prompts.json", config.prompts)
    write_json(out / "sample.json", {k: v for k, v in vars(config).items()})
    return out
