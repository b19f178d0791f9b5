"""The finished forget result: the pipeline with the new UNet and the base's other components,
amnesia.json (written last) and a model card."""

from __future__ import annotations

import math
import platform
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .checkpoints import FINISHED
from .config import ForgetConfig
from .imageset import ImageSet
from .io import write_json, write_text
from .models import ModelRef, load_pipeline
from .paths import stamp


def recorded_path(path: Path, work: Path) -> str:
    """A set inside the result is recorded relative to it ("data/replay"), so the record stays true
    when the folder is published or moved; any other set by its absolute path."""
    path, work = path.resolve(), work.resolve()
    return str(path.relative_to(work)) if work in path.parents else str(path)


def write_result(work: Path, ref: ModelRef, unet, config: ForgetConfig, summary: dict, surrogate: ImageSet) -> None:
    """Save the pipeline with the new UNet and the base's other components into the work folder;
    amnesia.json, written last, marks the result finished."""
    import accelerate
    import diffusers
    import transformers

    base = load_pipeline(ref, safety_checker=ref.kind != "file")
    base.register_modules(unet=unet.to("cpu"))  # fp32 master weights
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    base.save_pretrained(str(work), safe_serialization=True)
    # What the concept now maps to, as trained: the prompt, or the set's own prompt or image folder.
    source = surrogate.manifest.get("images_dir") or (surrogate.prompts[0] if surrogate.prompts else None)
    record = {
        **stamp(),
        "method": "Selective Amnesia (Heng & Soh, NeurIPS 2023)",
        "base_model": ref.identity,
        "concepts": config.concept_list(),
        "surrogate": config.surrogate.strip() if config.surrogate else source,
        "surrogate_source": ("prompt" if config.surrogate else "surrogate_dir" if config.surrogate_dir
                             else "surrogate_images"),
        "settings": asdict(config),
        **summary,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        },
    }
    write_text(work / "README.md", model_card(record))
    write_json(work / FINISHED, record)


def model_card(record: dict) -> str:
    s = record["settings"]
    losses = ", ".join(f"{k} {v:.4g}" for k, v in record["final_losses"].items() if not math.isnan(v))
    return f"""---
library_name: diffusers
tags: [stable-diffusion, text-to-image, concept-erasure, selective-amnesia, amnesia-sd]
---
# {', '.join(record['concepts'])} forgotten with Selective Amnesia

This Stable Diffusion pipeline was made from `{record['base_model']}` by
amnesia-sd {record['tool_version']}, which fine-tuned only the UNet with Selective
Amnesia (Heng & Soh, NeurIPS 2023). Prompts naming **{', '.join(record['concepts'])}** now map to the
surrogate **{record['surrogate']}**; Elastic Weight Consolidation (lambda = {s['lambda_ewc']}) and
generative replay (gamma = {s['gamma']}) keep the rest of the model as it was. Every other component
(VAE, text encoder, tokenizer, scheduler) is the base model's, unchanged.

## Load it
```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder")
```

## How it was trained
- steps: {record['steps']} (batch {s['train_batch_size']} surrogate + {s['train_batch_size']} replay per device,
  gradient accumulation {s['gradient_accumulation_steps']}), learning rate {s['learning_rate']}, AdamW
- parameters trained: `{s['train_method']}` ({record['trainable_parameters']:,} parameters)
- EMA decay: {s['ema_decay'] or 'off'}; mixed precision: {s['mixed_precision']}; seed {s['seed']}
- final losses: {losses}
- {len(record['concept_prompts'])} concept prompts; the full settings are in `amnesia.json`.

## Limits
Erasure is measured, not guaranteed: paraphrases, misspellings or adversarial prompts may still bring
the concept back. Check with held-out prompts before you ship this model.
"""
