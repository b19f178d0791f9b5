"""`amnesia-sd sample`: images from a model, optionally beside the base model's on the same seeds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from amnesia_sd.core.config import GenerationSettings, _check, _check_positive
from amnesia_sd.core.io import atomic_path, write_json
from amnesia_sd.core.paths import Output, discard_on_failure, guard, open_work, publish, stamp
from amnesia_sd.data.generate import generate, image_seed, planned_sampling
from amnesia_sd.data.grid import make_grid
from amnesia_sd.model.loading import DTYPES, image_size, load_on_device, make_accelerator, model_path

MARKER = "sample.json"


@dataclass
class SampleConfig(GenerationSettings):
    model: str = ""
    prompts: list[str] = field(default_factory=list)
    num_images: int = 4  # per prompt
    output_dir: str = ""
    compare: str | None = None
    prompts_file: str | None = None  # where some of `prompts` came from (an input)
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
    image_size(pipe, config.resolution)  # a size the model cannot make fails before the first image
    config, predicted = planned_sampling(pipe, config, accelerator)
    flat = [p for p in prompts for _ in range(config.num_images)]
    seeds = [image_seed(config.seed, k) for _ in prompts for k in range(config.num_images)]
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[list] = [[] for _ in prompts]
    with tqdm(total=len(flat), desc=f"sampling {spec}", unit="img") as bar:
        for position, _, image in generate(pipe, flat, seeds, config, predicted):
            j, k = divmod(position, config.num_images)
            with atomic_path(folder / f"p{j:03d}_s{k:03d}.png") as tmp:
                image.save(tmp, format="PNG")
            rows[j].append(image)
            bar.update(1)
    return rows


def sample(config: SampleConfig) -> Path:
    """Images, grid.png (and compare.png), built in OUT.partial and put in place when complete."""
    out = Path(config.output_dir)
    guard([Output("--output-dir", out, MARKER, "sample folder")],
          {"--model": model_path(config.model), "--compare": model_path(config.compare),
           "--prompts": config.prompts_file}, config.overwrite)
    accelerator = make_accelerator()
    if not accelerator.is_main_process:  # a handful of images: one process makes them all
        return out
    work, _ = open_work(out, "sample", {}, keep=False)
    with discard_on_failure(work):
        rows = sample_model(config.model, config.prompts, config, work / "images", accelerator)
        with atomic_path(work / "grid.png") as tmp:
            make_grid(rows).save(tmp, format="PNG")
        if config.compare:
            base_rows = sample_model(config.compare, config.prompts, config, work / "base", accelerator)
            # Each row: the base's images, then the model's, same seeds in the same order.
            pairs = [b + m for b, m in zip(base_rows, rows)]
            labels = ["base"] + [""] * (config.num_images - 1) + ["model"]
            with atomic_path(work / "compare.png") as tmp:
                make_grid(pairs, labels=labels).save(tmp, format="PNG")
        write_json(work / "prompts.json", config.prompts)
        write_json(work / MARKER, {**stamp(), **vars(config)})
    publish(work, out, MARKER)
    return out
