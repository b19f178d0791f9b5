"""Finding and loading the base model: a hub id, a diffusers folder or a single-file checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from amnesia_sd.core.errors import UserError
from amnesia_sd.model.digits import SPECS as DIGITS_SPECS
from amnesia_sd.model.digits import ensure_digits_model
from amnesia_sd.model.families import detect_family, family_of

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from; `identity` is what manifests and model cards record."""

    spec: str
    kind: str  # "folder", "file", "hub", or "lora" (a LoRA result of forget, on the base it records)
    location: str

    @property
    def identity(self) -> str:
        return self.location if self.kind != "hub" else f"hub:{self.location}"


def resolve_model(spec: str) -> ModelRef:
    """Decide what `--model` names without loading anything, so bad paths fail fast."""
    if spec in DIGITS_SPECS:  # the built-in digits models
        return ModelRef(spec, "folder", str(ensure_digits_model(family=DIGITS_SPECS[spec])))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and lora_base(path):
            return ModelRef(spec, "lora", str(path.resolve()))
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"model folder {spec} is not a diffusers pipeline (no model_index.json); "
                "pass a pipeline folder, a .safetensors/.ckpt checkpoint or a hub id"
            )
        return ModelRef(spec, "folder", str(path.resolve()))
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"model file {spec} must be a .safetensors or .ckpt checkpoint")
        if not os.access(path, os.R_OK):
            raise UserError(f"model file {spec} is not readable")
        return ModelRef(spec, "file", str(path.resolve()))
    looks_like_path = spec.startswith((".", "/", "~")) or path.suffix in SINGLE_FILE_SUFFIXES or spec.count("/") > 1
    if looks_like_path:
        raise UserError(f"model path {spec} does not exist")
    return ModelRef(spec, "hub", spec)


def lora_base(path: Path) -> str | None:
    """The base model a LoRA result of `forget` was trained on (None if `path` is not one)."""
    try:
        record = json.loads((path / "amnesia.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "lora" not in record or not (path / LORA_WEIGHTS).is_file():
        return None
    return record["base_model"].removeprefix("hub:")


def model_path(spec: str | None) -> Path | None:
    """The local file or folder `--model` names (None for a hub id): an input no output may touch."""
    if not spec:
        return None
    ref = resolve_model(spec)
    return Path(ref.location) if ref.kind != "hub" else None


def origin(ref: ModelRef, pipe) -> dict:
    """What Fishers and image sets record about the model they were made from."""
    family = family_of(pipe)
    return {"base_model": ref.identity, "architecture": family.name,
            "unet_config_hash": unet_config_hash(family.denoiser_of(pipe)), "prediction_type": family.prediction_type(pipe)}


def origin_mismatches(what: str, recorded: dict, expected: dict) -> list[str]:
    """'what: key recorded X, this model Y' for each recorded origin key that differs."""
    return [f"{what}: {key} {recorded[key]!r}, this model {value!r}"
            for key, value in expected.items() if key in recorded and recorded[key] != value]


def load_pipeline(ref: ModelRef, dtype: torch.dtype = torch.float32, safety_checker: bool = False):
    """Load the pipeline of the model's family (families.py); without `safety_checker` SD 1.x/2.x's
    safety checker is left out (SDXL has none)."""
    if ref.kind == "lora":
        return _load_with_lora(ref, dtype, safety_checker)
    try:
        family = detect_family(ref.kind, ref.location)
        extra = {} if safety_checker or family.name != "sd" else {"safety_checker": None,
                                                                   "requires_safety_checker": False}
        load = family.pipeline_class().from_single_file if ref.kind == "file" else \
            family.pipeline_class().from_pretrained
        pipe = load(ref.location, torch_dtype=dtype, **extra)
    except UserError:
        raise
    except Exception as exc:  # diffusers raises many kinds here; the user needs one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if ref.kind == "hub" and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise UserError(
                f"model {ref.spec!r} is not a local path and is not in the Hugging Face cache, and "
                "HF_HUB_OFFLINE is set: download it first (huggingface-cli download "
                f"{ref.spec}) or pass a local diffusers folder"
            ) from None
        if ref.kind == "file":
            raise UserError(
                f"could not load checkpoint {ref.spec!r}: {reason} (diffusers converts single-file checkpoints "
                "with configs it looks up on the hub: run once online, or pass a diffusers folder)"
            ) from None
        raise UserError(f"could not load model {ref.spec!r}: {reason}") from None
    pipe.set_progress_bar_config(disable=True)
    family.check(pipe)
    return pipe


def _load_with_lora(ref: ModelRef, dtype: torch.dtype, safety_checker: bool):
    """The base pipeline with a LoRA result's adapter merged into its UNet."""
    base = lora_base(Path(ref.location))
    try:
        base_ref = resolve_model(base)
    except UserError as exc:
        raise UserError(f"the LoRA result {ref.spec} was trained on {base}, which cannot be found ({exc}); "
                        "pass the base model's location as it is now") from None
    return merge_lora(load_pipeline(base_ref, dtype, safety_checker), ref.location)


def merge_lora(pipe, folder: str | Path):
    """Merge the LoRA file of a result folder into the pipeline's UNet with diffusers' own loader."""
    from safetensors.torch import load_file


    # Results of earlier versions name attention adapters lora.down/up and conv adapters lora_A/B;
    # diffusers drops the former from such a mixed file, so every key is read in peft's names.
    state = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
             for k, v in load_file(str(Path(folder) / LORA_WEIGHTS)).items()}
    pipe.load_lora_weights(state)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the merged weights stay; the adapter layers go
    return pipe


def unet_config_hash(unet) -> str:
    """A short fingerprint of the denoiser's architecture (UNet or transformer), to match Fisher
    files to models (the key keeps its first name)."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def native_resolution(pipe) -> int:
    return family_of(pipe).native_resolution(pipe)


def latent_size(pipe, resolution: int | None) -> tuple[int, int]:
    """The latents' height and width at image_size(pipe, resolution)."""
    side = image_size(pipe, resolution) // pipe.vae_scale_factor
    return side, side


def image_size(pipe, resolution: int | None) -> int:
    """The size images are made at: --resolution, checked as the pipeline will check it (SD and SDXL:
    a multiple of 8 and of the VAE's factor; SD3: of the VAE's factor times the patch; Flux: twice
    the VAE's factor), or the native size."""
    size = resolution or native_resolution(pipe)
    factor = family_of(pipe).size_multiple(pipe)
    if size % factor:
        raise UserError(f"--resolution {size} is not a multiple of {factor} (what this {family_of(pipe).title} "
                        f"pipeline takes, its VAE downsampling by {pipe.vae_scale_factor}): use e.g. "
                        f"{max(factor, size // factor * factor)}")
    return size


def make_accelerator(mixed_precision: str = "no", **kwargs):
    """One Accelerator per command: a single process here; under `accelerate launch` DDP, or FSDP2
    with an FSDP config (also on machines without accelerators)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Library use runs several commands in one process (the demo does): each gets its own
    # settings. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    # Launched as several processes on a machine without CUDA (CI, CPU clusters): accelerate only
    # forms a (gloo) process group when told to use the CPU; otherwise each process runs alone.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = several and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, **kwargs)
    if cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _fsdp_on_cpu(accelerator)
    if sharded(accelerator) and mixed_precision in ("bf16", "fp16"):
        # Computing in 16 bits, gradients reduced in float32 (accelerate's default reduces in 16
        # bits): the Fisher squares the sum of the processes' shares of a sample's gradient, and
        # the EWC gradient is added to the reduced one, so they are summed as one process would.
        from torch.distributed.fsdp import MixedPrecisionPolicy

        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=DTYPES[mixed_precision], reduce_dtype=torch.float32)
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """`accelerate launch` with an FSDP config on machines without accelerators (CPU clusters, CI):
    accelerate selects FSDP only for accelerator devices and would fall back to DDP over gloo. Its
    FSDP2 code (prepare, state dicts, sharded checkpoints) runs on the CPU as it is (torch's
    fully_shard works over gloo), so the state is set as accelerate sets it on a GPU, with the
    plugin it reads from the launcher's FSDP_* variables."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # its mixed precision: below
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def sharded(accelerator) -> bool:
    return accelerator.distributed_type.value == "FSDP"


def check_sharding(accelerator, command: str) -> None:
    """What `command` (fim, forget) trains or differentiates under: DDP, or accelerate's FSDP2;
    DeepSpeed, FSDP1 and FSDP with fp16 are refused before any work, in one line."""
    kind = accelerator.distributed_type.value
    if kind == "DEEPSPEED":
        raise UserError(f"{command} does not run under DeepSpeed: ZeRO keeps gradients in flat partitioned buffers "
                        "that its own optimizer step consumes, so the EWC gradient 2 lambda F (theta - theta*) cannot "
                        "be added to each weight's slice exactly; use an FSDP config (distributed_type: FSDP, "
                        "fsdp_version: 2) or MULTI_GPU, see docs/multi-gpu.md")
    if kind != "FSDP":
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise UserError(f"{command} runs under FSDP version 2 (per-parameter shards that the EWC penalty reads): set "
                        f"fsdp_version: 2 in the accelerate config (it is {plugin.fsdp_version})")
    if accelerator.mixed_precision == "fp16":
        raise UserError(f"{command} under FSDP takes --mixed-precision bf16 or no: fp16 needs a loss scale agreed "
                        "across shards, which it does not keep; bf16 needs none")


def load_on_device(spec: str, accelerator, dtype: torch.dtype = torch.float32):
    """Resolve and load the base pipeline onto the accelerator's device."""
    ref = resolve_model(spec)
    pipe = load_pipeline(ref, dtype=dtype)
    return ref, pipe.to(accelerator.device)
