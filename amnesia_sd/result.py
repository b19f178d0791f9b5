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
from .config import SURROGATE_SOURCES, ForgetConfig, split_concepts
from .io import write_json, write_text
from .models import ModelRef, load_pipeline, merge_lora
from .paths import stamp
from .trainable import LORA_WEIGHTS


def recorded_path(path: Path, work: Path) -> str:
    """A set inside the result is recorded relative to it ("data/replay"), so the record stays true
    when the folder is published or moved; any other set by its absolute path."""
    path, work = path.resolve(), work.resolve()
    return str(path.relative_to(work)) if work in path.parents else str(path)


def surrogate_of(pair: dict) -> tuple[str, str]:
    """What a pair's concept maps to (a prompt, or a folder of the user's images), and how the
    surrogate was given: prompt, surrogate_dir or surrogate_images."""
    kind = next(k for k in SURROGATE_SOURCES if pair.get(k))
    return pair["maps_to"], {"surrogate": "prompt"}.get(kind, kind)


def write_result(work: Path, ref: ModelRef, unet, trainable, config: ForgetConfig, summary: dict) -> None:
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
    pairs = summary["pairs"]
    record = {
        **stamp(),
        "method": "Selective Amnesia (Heng & Soh, NeurIPS 2023)",
        "base_model": ref.identity,
        # Every concept the model has forgotten (earlier runs' too, in a sequence), each alternative.
        "concepts": [c for p in pairs for c in split_concepts(p["concept"])],
        "recipe": config.recipe,
        "settings": asdict(config),
        **summary,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        },
    }
    if len(pairs) == 1:  # one concept: also the fields results have always had
        record["surrogate"], record["surrogate_source"] = surrogate_of(pairs[0])
        record["surrogate_set"] = pairs[0]["surrogate_set"]
    write_text(work / "README.md", model_card(record))
    write_json(work / FINISHED, record)


def model_card(record: dict) -> str:
    from .families import FAMILIES

    s = record["settings"]
    replay = record["replay_images"]
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
    mapping = "\n".join(f"- **{p['concept']}** -> {surrogate_of(p)[0]}" + (" (an earlier run's; kept forgotten)"
                                                                          if p.get("earlier_run") else "")
                        for p in record["pairs"])
    history = "".join(f"\n- run {i + 1}: `{r['base_model']}`, forgot {', '.join(r['concepts'])} ({r['steps']} steps)"
                      for i, r in enumerate(record.get("history", [])))
    if history:
        history = "\n\nIt was forgotten in a sequence of runs, each on the result of the one before:" + history + \
            f"\n- run {len(record['history']) + 1}: this one, on `{record['base_model']}`"
    recipe = f" (recipe `{record['recipe']}`)" if record.get("recipe") else ""
    return f"""---
library_name: diffusers
tags: [stable-diffusion{", stable-diffusion-xl" if family.name == "sdxl" else ""}, text-to-image, concept-erasure, selective-amnesia, amnesia-sd]
---
# {', '.join(record['concepts'])} forgotten with Selective Amnesia

{what}
amnesia-sd {record['tool_version']}, which {trained} with Selective
Amnesia (Heng & Soh, NeurIPS 2023){recipe}. Prompts naming each concept now map to its surrogate:

{mapping}

Elastic Weight Consolidation (lambda = {s['lambda_ewc']}) and generative replay (gamma = {s['gamma']})
keep the rest of the model as it was. {kept}{history}

## Load it
```python
from diffusers import {family.pipeline}
{load}
```

## How it was trained
- steps: {record['steps']} (batch {s['train_batch_size']} surrogate + {s['train_batch_size']} replay per device,
  gradient accumulation {s['gradient_accumulation_steps']}), learning rate {s['learning_rate']}, AdamW
- parameters trained: `{s['train_method']}` ({record['trainable_parameters']:,} parameters)
- replay set: {replay['prompted']:,} prompted images{f", {replay['unconditional']:,} of the empty prompt" if replay['unconditional'] else ""}
- EMA decay: {s['ema_decay'] or 'off'}{'' if not s['ema_decay'] or s['ema_warmup'] else ' from the first step (no warm-up)'}; mixed precision: {s['mixed_precision']}; seed {s['seed']}
- final losses: {losses}
- {len(record['concept_prompts'])} concept prompts; the full settings are in `amnesia.json`.

## Limits
Erasure is measured, not guaranteed: paraphrases, misspellings or adversarial prompts may still bring
the concept back. Check with held-out prompts before you ship this model.
"""
