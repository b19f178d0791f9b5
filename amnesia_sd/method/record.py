"""The finished forget result: the pipeline with the new UNet and the base's other components,
amnesia.json (written last) and a model card."""

from __future__ import annotations

import json
import math
import platform
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from amnesia_sd.core.config import SURROGATE_SOURCES, ForgetConfig, ForgottenModelSettings, split_concepts
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.io import write_json, write_text
from amnesia_sd.core.paths import Output, guard, stamp
from amnesia_sd.model.families import FAMILIES, family_of
from amnesia_sd.model.loading import LORA_WEIGHTS, ModelRef, load_pipeline, merge_lora, model_path
FINISHED = "amnesia.json"  # written last into a forget result: its presence marks it finished


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


def write_result(work: Path, ref: ModelRef, unet, trainable, config: ForgetConfig, summary: dict,
                 state: dict | None = None) -> None:
    """Save the result into the work folder: the pipeline with the new UNet and the base's other
    components, or the LoRA adapters (and with --fuse, the pipeline with them merged);
    amnesia.json, written last, marks the result finished. `state`: the whole denoiser's state dict
    when `unet` holds only this process's shards (FSDP)."""
    import accelerate
    import diffusers
    import transformers


    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    base = load_pipeline(ref, safety_checker=ref.kind != "file")
    family = family_of(base)
    if config.lora_rank:
        trainable.save(unet, work, family, state)
        lora_file = work / LORA_WEIGHTS
        summary["lora"] = {"rank": config.lora_rank, "alpha": config.lora_rank, "trained_alpha": config.lora_alpha_value(),
                           "targets": config.lora_target_list(), "adapted_layers": len(trainable.modules),
                           "file": LORA_WEIGHTS, "bytes": lora_file.stat().st_size, "fused_pipeline": config.fuse}
        if config.fuse:  # merged from the file just written
            merge_lora(base, work)
    else:
        if state is None:
            base.register_modules(**{family.denoiser: unet.to("cpu")})  # fp32 master weights
        else:
            family.denoiser_of(base).load_state_dict(state, assign=True)  # takes the gathered tensors: no second copy
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
    preserve = record.get("preserve")
    held = (f"\n- neighbours held in the replay (--preserve): {preserve['value']} ({preserve['images']:,} images drawn "
            "by the base model)") if preserve else ""
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
- replay set: {replay['prompted']:,} prompted images{f", {replay['unconditional']:,} of the empty prompt" if replay['unconditional'] else ""}{held}
- EMA decay: {s['ema_decay'] or 'off'}{'' if not s['ema_decay'] or s['ema_warmup'] else ' from the first step (no warm-up)'}; mixed precision: {s['mixed_precision']}; seed {s['seed']}
- final losses: {losses}
- {len(record['concept_prompts'])} concept prompts; the full settings are in `amnesia.json`.

## Limits
Erasure is measured, not guaranteed: paraphrases, misspellings or adversarial prompts may still bring
the concept back. Check with held-out prompts before you ship this model.
"""


def read_record(model: str) -> dict:
    """MODEL/amnesia.json, checked for the fields eval reads; {} when there is none."""
    path = Path(model).expanduser() / FINISHED
    if not path.is_file():
        return {}
    fix = "it should be written by `amnesia-sd forget`; pass --base and --concept to evaluate this model anyway"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise UserError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); {fix}") from None
    expected = {"base_model": str, "concepts": list, "settings": dict}
    problems = [] if isinstance(record, dict) else [f"it holds a {type(record).__name__}, not an object"]
    if not problems:
        problems = [f"{key} is a {type(record[key]).__name__}, not a {kind.__name__}"
                    for key, kind in expected.items() if key in record and not isinstance(record[key], kind)]
        if isinstance(record.get("concepts"), list) and not all(isinstance(c, str) for c in record["concepts"]):
            problems.append("concepts holds something other than text")
    if problems:
        raise UserError(f"{path} is malformed ({'; '.join(problems)}); {fix}")
    return record


def recorded_concepts(record: dict) -> list[list[str]]:
    """The forgotten concepts in an amnesia.json, one list of alternatives per concept."""
    if isinstance(record.get("pairs"), list):
        return [split_concepts(p["concept"]) for p in record["pairs"]]
    return [list(record["concepts"])] if record.get("concepts") else []


def recorded_surrogates(record: dict) -> list[str]:
    """The surrogate prompts an amnesia.json names (CLIP's distractors: what the concept now shows)."""
    if isinstance(record.get("pairs"), list):
        return list(dict.fromkeys(p["maps_to"] for p in record["pairs"] if p.get("surrogate")))
    surrogate = (record.get("settings") or {}).get("surrogate")  # results of one concept, before pairs
    return [surrogate] if isinstance(surrogate, str) else []


def forgotten_model(config: ForgottenModelSettings, output: Output,
                    inputs: dict) -> tuple[dict, str, list[list[str]]]:
    """For eval and attack, before any work: the model's amnesia.json ({} when there is none), its
    base (--base, else the recorded one) and the forgotten concepts, one list of alternatives each
    (--concept, else the recorded ones); the output checked against every input."""
    record = read_record(config.model)
    base = config.base or str(record.get("base_model") or "").removeprefix("hub:")
    clip_path = Path(config.clip_model).expanduser()
    guard([output], {"--model": model_path(config.model), "--base": model_path(base), **inputs,
                     "--clip-model": clip_path if clip_path.exists() else None}, config.overwrite)
    if not base:
        raise UserError(f"--base is required: {config.model} has no amnesia.json that names its base model")
    groups = [split_concepts(config.concept)] if config.concept else recorded_concepts(record)
    if not any(groups):
        raise UserError(f"--concept is required: {config.model} has no amnesia.json that names the concept")
    return record, base, groups
