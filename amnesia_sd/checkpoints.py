"""forget's run folder and checkpoints: the run works in OUT.partial, its checkpoints record the
settings that shaped them (a resumed run must match them), and only finite weights are ever saved."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .config import ForgetConfig
from .errors import UserError
from .imageset import is_finished, link_set
from .io import write_json
from .models import model_path
from .paths import Output, check_output, check_overlap, diff_settings, open_work, partial_of, real

FINISHED = "amnesia.json"  # written last into a forget result: its presence marks it finished
# Settings a resumed run may change: how long it runs, how often it saves, and where from.
RESUMABLE_CHANGES = ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
                     "overwrite", "output_dir", "config_file", "batch_size", "max_memory",
                     "gradient_checkpointing")  # recomputes the same activations: the same trajectory
CHECKPOINT_SETTINGS = "amnesia-settings.json"  # in every checkpoint: the settings that shaped it


def training_settings(config: ForgetConfig, num_processes: int) -> dict:
    """What shapes the training trajectory: a resumed run must match it."""
    settings = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    return {**settings, "num_processes": num_processes}


def result_output(out: Path) -> Output:
    return Output("--output-dir", out, FINISHED, "forgotten model")


def earlier_run(model: str) -> tuple[dict, list[dict]] | None:
    """When --model is a forget result (sequential forgetting): its amnesia.json, and the pairs it
    trained, each with its finished surrogate set (`set`, a Path) and the concept prompts it used."""
    folder = model_path(model)
    if folder is None or not (folder / FINISHED).is_file():
        return None
    where = folder / FINISHED
    try:
        record = json.loads(where.read_text(encoding="utf-8"))
        # Results made before several concepts per run recorded one pair at the top level.
        pairs = record.get("pairs") or [{"concept": ", ".join(record["concepts"]), "surrogate_set": record["surrogate_set"],
                                         "concept_prompts": record["concept_prompts"]}]
        pairs = [{**p, "set": Path(p["surrogate_set"]) if Path(p["surrogate_set"]).is_absolute()
                  else folder / p["surrogate_set"]} for p in pairs]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{where} is not a readable amnesia-sd record ({type(exc).__name__}: {exc}); sequential "
                        "forgetting replays the concepts it lists, so it must be the file `amnesia-sd forget` "
                        "wrote") from None
    for pair in pairs:
        if not is_finished(pair["set"]):
            raise UserError(f"the surrogate set of the earlier concept {pair['concept']!r} is missing at {pair['set']}: "
                            "forgetting more keeps it forgotten by replaying that set; restore it, or forget all "
                            "concepts in one run from the base model")
    return record, pairs


def check_paths(config: ForgetConfig, out: Path, inherited: list[dict]) -> bool:
    """The guard, before any work: no output touches an input; OUT is new, empty or a finished
    result of ours (replaced only with --overwrite). Returns whether one is there."""
    work = partial_of(out)
    inputs = {"--model": model_path(config.model), "--fim": config.fim, "--replay-dir": config.replay_dir,
              "--prompts": config.prompts_file, "--config": config.config_file}
    for i, pair in enumerate(config.pairs()):
        inputs[f"--surrogate-dir of concept {i + 1}"] = pair["surrogate_dir"]
        inputs[f"--surrogate-images of concept {i + 1}"] = pair["surrogate_images"]
    for i, pair in enumerate(inherited):  # the pairs of an earlier run (earlier_run)
        inputs[f"the surrogate set of earlier concept {i + 1}"] = pair["set"]
    resume = config.resume_from_checkpoint
    if resume and resume != "latest" and real(work / "checkpoints") not in real(resume).parents:
        inputs["--resume-from-checkpoint"] = resume  # a checkpoint of this run's own work folder is ours
    output = result_output(out)
    check_overlap([output], inputs)
    finished = check_output(output, config.overwrite)
    if any((work / "checkpoints").glob("checkpoint-*")) and not (config.resume_from_checkpoint or config.overwrite):
        raise UserError(
            f"{work} holds checkpoints of an unfinished run: resume it with --resume-from-checkpoint latest, "
            "or pass --overwrite to start again"
        )
    return finished


def open_run(out: Path, config: ForgetConfig, finished: bool) -> Path:
    """The work folder OUT.partial: kept from an interrupted run (its cached sets are reused), or
    new with --overwrite. Matching cached sets of a finished OUT being replaced are hard-linked in."""
    work, _ = open_work(out, "forget", {}, keep=not config.overwrite)
    if finished and (out / "data").is_dir():
        for entry in (out / "data").iterdir():
            target = work / "data" / entry.name
            if is_finished(entry) and not target.exists():  # settings are checked on reuse
                link_set(entry, target)
    return work


def find_checkpoint(work: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        if not (path / CHECKPOINT_SETTINGS).is_file():
            raise UserError(f"--resume-from-checkpoint {resume} is not a checkpoint of `amnesia-sd forget` (no "
                            f"{CHECKPOINT_SETTINGS}); pass 'latest' or a checkpoint-N folder of an earlier run")
        return path
    found = sorted((work / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def check_resume(checkpoint: Path, settings: dict) -> None:
    """A checkpoint resumes only the run it was made by: same settings, except those that may change."""
    try:
        before = json.loads((checkpoint / CHECKPOINT_SETTINGS).read_text())
    except (OSError, ValueError):
        raise UserError(f"{checkpoint} is not a complete checkpoint (no readable {CHECKPOINT_SETTINGS}); "
                        "pass another one or --overwrite to start again") from None
    differences = diff_settings(before, settings)
    if differences:
        raise UserError(f"{checkpoint} was made with other settings ({differences}); resume with the same "
                        "settings (only --max-train-steps and the checkpoint cadence may change), or pass "
                        "--overwrite to start again")


def weights_finite(params: list[torch.Tensor]) -> bool:
    """One fused pass: the norm of a tensor with NaN or inf is not finite."""
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all()) if params else True


def save_checkpoint(accelerator, work: Path, step: int, keep: int | None, settings: dict) -> None:
    """Written under a temporary name and renamed, so a half-written checkpoint is never 'latest'."""
    root = work / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp, final = root / f".tmp-checkpoint-{step}", root / f"checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp))
    write_json(tmp / CHECKPOINT_SETTINGS, settings)
    os.replace(tmp, final)
    if keep:
        old = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]
        for path in old:
            shutil.rmtree(path)


def broken_run(what: str, step: int, work: Path) -> UserError:
    kept = find_checkpoint(work, "latest")
    return UserError(
        f"{what} at step {step}; training stopped and nothing was written as finished. "
        + (f"Last good checkpoint: {kept}; resume with --resume-from-checkpoint latest and a lower "
           "--learning-rate" if kept else "No checkpoint was saved yet; lower --learning-rate")
    )


