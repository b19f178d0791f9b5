"""forget's run folder and checkpoints: the run works in OUT.partial, its checkpoints record the
settings that shaped them (a resumed run must match them), and only finite weights are ever saved.

Nothing in a checkpoint is unpickled: accelerate keeps the weights (safetensors) and the optimizer
(read with weights_only); our own state (learning-rate schedule, EMA, the adversary's token) is
written here as safetensors and JSON, never registered with accelerate, whose custom objects are
pickles it loads with weights_only=False. A digest of every file, written last at save time, must
match before a checkpoint is loaded: a file changed or added since is refused, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from amnesia_sd.core.config import ForgetConfig
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.io import write_json
from amnesia_sd.core.paths import Output, check_output, check_overlap, diff_settings, open_work, partial_of, real
from amnesia_sd.data.imageset import is_finished, link_set
from amnesia_sd.method.record import FINISHED
from amnesia_sd.model.loading import model_path
from amnesia_sd.model.shards import local

# Settings a resumed run may change: how long it runs, how often it saves, and where from.
RESUMABLE_CHANGES = ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
                     "overwrite", "output_dir", "config_file", "batch_size", "max_memory",
                     "gradient_checkpointing")  # recomputes the same activations: the same trajectory
CHECKPOINT_SETTINGS = "amnesia-settings.json"  # in every checkpoint: the settings that shaped it
STATE_TENSORS, STATE_JSON = "amnesia-state.safetensors", "amnesia-state.json"  # our objects' state_dicts
DIGEST = "amnesia-digest.json"  # sha256 of every other file, written last


def training_settings(config: ForgetConfig, num_processes: int, fsdp: bool = False) -> dict:
    """What shapes the training trajectory, and (FSDP) how its checkpoints are laid out: a resumed
    run must match it."""
    settings = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    return {**settings, "num_processes": num_processes, **({"fsdp": True} if fsdp else {})}


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


def check_paths(config: ForgetConfig, out: Path, inherited: list[dict], preserve: Path | None = None) -> bool:
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
    inputs["the earlier run's preserve set"] = preserve
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


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    return int(name.removeprefix("checkpoint-")) if name.startswith("checkpoint-") and \
        name.removeprefix("checkpoint-").isdigit() else None


def find_checkpoint(work: Path, resume: str | None) -> Path | None:
    """'latest' or a checkpoint-N folder of this run's own work folder (OUT.partial/checkpoints):
    a checkpoint from anywhere else is never loaded."""
    if not resume:
        return None
    root = work / "checkpoints"
    if resume != "latest":
        path = Path(resume)
        if checkpoint_step(path) is None or real(path).parent != real(root) or not path.is_dir():
            raise UserError(f"--resume-from-checkpoint {resume} is not a checkpoint-N folder of this run ({root}): "
                            "pass 'latest' or one of its checkpoint-N folders")
        return path
    found = sorted((p for p in root.glob("checkpoint-*") if checkpoint_step(p) is not None), key=checkpoint_step)
    return found[-1] if found else None


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != DIGEST}


def check_digest(checkpoint: Path) -> None:
    """The checkpoint holds exactly the files it was saved with, byte for byte."""
    try:
        saved = json.loads((checkpoint / DIGEST).read_text())
    except (OSError, ValueError):
        raise UserError(f"{checkpoint} has no readable {DIGEST} (it was made by an older amnesia-sd, or not by "
                        "amnesia-sd): it is not loaded; start again with --overwrite") from None
    now = _digests(checkpoint)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise UserError(f"{checkpoint} changed after it was saved ({', '.join(changed[:3])}): it is not loaded; resume "
                        "from another checkpoint or start again with --overwrite")


# What the index files of sharded (FSDP) checkpoints may name: torch.distributed.checkpoint reads
# them with plain pickle, so before it does, they are read here by an unpickler that builds nothing
# else (as torch.load's weights_only does for the shards themselves).
INDEX_CLASSES = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("torch", "Size"),
                 ("torch.serialization", "_get_layout")}
INDEX_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in INDEX_CLASSES or module in INDEX_MODULES or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def check_sharded_index(checkpoint: Path) -> None:
    """The .metadata files of a sharded checkpoint hold only checkpoint metadata."""
    for index in sorted(checkpoint.rglob(".metadata")):
        try:
            with index.open("rb") as f:
                _IndexUnpickler(f).load()
        except Exception as exc:  # anything that is not plain checkpoint metadata is refused unread
            raise UserError(f"{index} is not a torch.distributed.checkpoint index ({type(exc).__name__}: {exc}): "
                            "it is not loaded; resume from another checkpoint or start again with --overwrite") from None


def _flatten(value, tensors: dict):
    """A state_dict as JSON, its tensors set aside (by key) for a safetensors file."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _flatten(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_flatten(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot checkpoint a {type(value).__name__} without pickle")


def _unflatten(node, tensors: dict):
    (kind, value), = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: _unflatten(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        items = [_unflatten(v, tensors) for v in value]
        return items if kind == "list" else tuple(items)
    return value


def load_state(checkpoint: Path, objects: dict) -> None:
    """Our objects' states from a checkpoint that save_checkpoint wrote (digest checked before)."""
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint / STATE_TENSORS))
    states = json.loads((checkpoint / STATE_JSON).read_text())
    for name, obj in objects.items():
        obj.load_state_dict(_unflatten(states[name], tensors))


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
    """One fused pass (over this process's rows under FSDP): the norm of a tensor with NaN or inf is
    not finite."""
    return bool(torch.isfinite(torch.stack(torch._foreach_norm([local(p) for p in params]))).all()) if params else True


def save_checkpoint(accelerator, work: Path, step: int, keep: int | None, settings: dict, objects: dict) -> None:
    """Written under a temporary name and renamed, so a half-written checkpoint is never 'latest'.
    Called by every process (under FSDP each writes its shards); the first writes `objects` (name ->
    object with state_dict) as safetensors + JSON, the digest last, and renames."""
    root = work / "checkpoints"
    tmp, final = root / f".tmp-checkpoint-{step}", root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish_checkpoint(tmp, final, root, keep, settings, objects)
    accelerator.wait_for_everyone()


def _finish_checkpoint(tmp: Path, final: Path, root: Path, keep: int | None, settings: dict, objects: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict = {}
    states = {name: _flatten(obj.state_dict(), tensors) for name, obj in objects.items()}
    save_file(tensors, str(tmp / STATE_TENSORS))
    write_json(tmp / STATE_JSON, states)
    write_json(tmp / CHECKPOINT_SETTINGS, settings)
    write_json(tmp / DIGEST, _digests(tmp))
    os.replace(tmp, final)
    if keep:
        old = sorted((p for p in root.glob("checkpoint-*") if checkpoint_step(p) is not None),
                     key=checkpoint_step)[:-keep]
        for path in old:
            shutil.rmtree(path)


# Far beyond what any run of the method uses: a non-finite run with one of these names it as the cause.
UNUSUAL = {"learning_rate": (1e-2, "the default is 1e-5, the paper's 1.6e-4"),
           "lambda_ewc": (1e6, "the paper's is 50"), "gamma": (1e3, "the paper's is 1")}


def broken_run(what: str, step: int, work: Path, config: ForgetConfig | None = None) -> UserError:
    kept = find_checkpoint(work, "latest")
    unusual = [f"--{name.replace('_', '-')} {getattr(config, name):g} ({usual})" for name, (limit, usual)
               in UNUSUAL.items() if config is not None and abs(getattr(config, name)) > limit]
    fix = f"lower {' and '.join(unusual)}" if unusual else "a lower --learning-rate"
    return UserError(
        f"{what} at step {step}; training stopped and nothing was written as finished. "
        + (f"Last good checkpoint: {kept}; resume with --resume-from-checkpoint latest and {fix}" if kept
           else f"No checkpoint was saved yet; start again with {fix}")
    )


