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
from .models import ModelRef, load_pipeline, merge_lora
from .paths import stamp
from .trainable import LORA_WEIGHTS


def recorded_path(path: Path, work: Path) -> str:
    """A set inside the result is recorded relative to it ("data/replay"), so the record stays true
    when the folder is published or moved; any other set by its absolute path."""
    path, work = path.resolve(), work.resolve()
    return str(path.relative_to(work)) if work in path.parents else str(path)


def write_result(work: Path, ref: ModelRef, unet, trainable, config: ForgetConfig, summary: dict,
                 surrogate: ImageSet) -> None:
    """Save the result into the work folder: the pipeline with the new UNet and the base's other
    components, or the LoRA adapters (and with --fuse, the pipeline with them merged);
    amnesia.json, written last, marks the result finished."""
    import accelerate
    import diffusers
    import transformers

    from .families import family_of

    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    base = load_pipeline(ref, safety_checker=ref.kind != "file")
    family = family_of(base)
    if config.lora_rank:
        trainable.save(unet, work, family)
        lora_file = work / LORA_WEIGHTS
        summary["lora"] = {"rank": config.lora_rank, "alpha": config.lora_rank, "trained_alpha": config.lora_alpha_value(),
                           "targets": config.lora_target_list(), "adapted_layers": len(trainable.modules),
                           "file": LORA_WEIGHTS, "bytes": lora_file.stat().st_size, "fused_pipeline": config.fuse}
        if config.fuse:  # merged from the file just written
            merge_lora(base, work)
    else:
        base.register_modules(unet=unet.to("cpu"))  # fp32 master weights
    if not config.lora_rank or config.fuse:
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
    from .families import FAMILIES

    s = record["settings"]
    family = FAMILIES[record["architecture"]]
    encoders = "text encoders, tokenizers" if len(family.text_encoders) > 1 else "text encoder, tokenizer"
    losses = ", ".join(f"{k} {v:.4g}" for k, v in record["final_losses"].items() if not math.isnan(v))
    lora = record.get("lora")
    if lora:
        what = (f"This LoRA adapter (rank {lora['rank']}, {lora['bytes']:,} bytes, on {lora['adapted_layers']} "
                f"layers of the UNet) for `{record['base_model']}` ({family.title}) was trained by")
        load = (f"""pipe = {family.pipeline}.from_pretrained("{record['base_model'].removeprefix('hub:')}")
pipe.load_lora_weights("path/to/this/folder")  # pipe.fuse_lora() merges it""" +
                (f"""
# or the pipeline with the adapter merged, saved beside it:
pipe = {family.pipeline}.from_pretrained("path/to/this/folder")""" if lora["fused_pipeline"] else ""))
        trained = "trained LoRA adapters on the UNet"
        kept = f"The base model's weights are unchanged; {encoders}, VAE and scheduler are the base's."
    else:
        what = f"This {family.title} pipeline was made from `{record['base_model']}` by"
        load = f"""pipe = {family.pipeline}.from_pretrained("path/to/this/folder")"""
        trained = "fine-tuned only the UNet"
        kept = f"Every other component\n(VAE, {encoders}, scheduler) is the base model's, unchanged."
    return f"""---
library_name: diffusers
tags: [stable-diffusion{", stable-diffusion-xl" if family.name == "sdxl" else ""}, text-to-image, concept-erasure, selective-amnesia, amnesia-sd]
---
# {', '.join(record['concepts'])} forgotten with Selective Amnesia

{what}
amnesia-sd {record['tool_version']}, which {trained} with Selective
Amnesia (Heng & Soh, NeurIPS 2023). Prompts naming **{', '.join(record['concepts'])}** now map to the
surrogate **{record['surrogate']}**; Elastic Weight Consolidation (lambda = {s['lambda_ewc']}) and
generative replay (gamma = {s['gamma']}) keep the rest of the model as it was. {kept}

## Load it
```python
from diffusers import {family.pipeline}
{load}
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
