"""Image sets on disk: the generative-replay set and the surrogate set q(x|c_f).

A set is a folder with images/NNNNNN.png, prompts.txt (line i is image i's prompt),
latents.safetensors (key "latents", [N, C, h, w] float32, scaled by the VAE's scaling factor, ready
for the UNet; beside it, one row per image of the family's image conditioning, such as SDXL's
"time_ids") and manifest.json, written last, which marks the set as finished. While it is being
made the folder is called NAME.partial; an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from amnesia_sd.core.config import GenerationSettings
from amnesia_sd.core.cost import first_batch, generation_passes
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.io import atomic_path, write_json, write_text
from amnesia_sd.core.paths import Output, check_output, is_ours, open_work, partial_of, publish, stamp
from amnesia_sd.data.generate import encode, generate, image_seed, planned_sampling, process_share
from amnesia_sd.model.families import Conditioning, family_of
from amnesia_sd.model.loading import ModelRef, image_size, unet_config_hash

MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ImageSet:
    path: Path
    prompts: list[str]
    latents: torch.Tensor
    manifest: dict
    conditioning: Conditioning  # the family's image part, one row per image (families.py)


def is_finished(path: str | Path) -> bool:
    return is_ours(Path(path), MANIFEST)


def link_set(source: str | Path, target: str | Path) -> None:
    """A finished set at `target` sharing `source`'s files (hard links where the file system allows,
    else copies); it appears only when complete. Our set files are replaced, never written in place,
    so sharing them is safe."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    target = Path(target)
    partial = partial_of(target)
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, partial, copy_function=link_or_copy)
    os.replace(partial, target)


def set_output(path: str | Path) -> Output:
    return Output("--output-dir", Path(path), MANIFEST, "image set")


def load_image_set(path: str | Path, pipe=None) -> ImageSet:
    """Load a finished set; with `pipe`, check it fits that model."""
    path = Path(path)
    if not is_finished(path):
        raise UserError(
            f"{path} is not a finished image set (no amnesia-sd {MANIFEST}); create one with "
            "`amnesia-sd replay` or `amnesia-sd surrogate`"
        )
    manifest = json.loads((path / MANIFEST).read_text())
    try:
        tensors = load_file(str(path / "latents.safetensors"))
        latents = tensors.pop("latents")
        prompts = (path / "prompts.txt").read_text(encoding="utf-8").split("\n")[: len(latents)]
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise UserError(f"image set {path} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                        "make it again") from None
    if len(prompts) != len(latents):
        raise UserError(f"image set {path} is damaged: {len(prompts)} prompts for {len(latents)} latents")
    if not torch.isfinite(latents).all():
        raise UserError(f"image set {path} holds non-finite latents; make it again")
    if any(len(v) != len(latents) for v in tensors.values()):
        raise UserError(f"image set {path} is damaged: its conditioning does not have one row per latent; make it again")
    image_set = ImageSet(path, prompts, latents, manifest, tensors)
    if pipe is not None:
        check_fits(image_set, pipe)
    return image_set


def check_fits(image_set: ImageSet, pipe) -> None:
    """The set's latents and image conditioning are what this model takes."""
    family = family_of(pipe)
    unet = family.denoiser_of(pipe)
    missing = [k for k in family.image_keys if k not in image_set.conditioning]
    if missing:
        raise UserError(
            f"image set {image_set.path} has no {', '.join(missing)} for its images, which this "
            f"{family.title} model needs: it was made with another model "
            f"({image_set.manifest.get('base_model')}); make it with this one")
    channels, expected = image_set.latents.shape[1], family.latent_channels(unet.config)
    if channels != expected:
        raise UserError(
            f"image set {image_set.path} has {channels}-channel latents but the model's {family.denoiser} takes "
            f"{expected}: it was made with another model ({image_set.manifest.get('base_model')})"
        )


def _finish(partial: Path, out: Path, prompts: list[str], manifest: dict) -> None:
    """Gather the per-image latents into one file, then write the manifest and move into place."""
    files = [load_file(str(partial / "latents" / f"{i:06d}.safetensors")) for i in range(len(prompts))]
    latents = torch.stack([f.pop("latent") for f in files])
    conditioning = {k: torch.stack([f[k] for f in files]) for k in files[0]}
    if not torch.isfinite(latents).all():  # never a finished set of NaN
        bad = (~torch.isfinite(latents.flatten(1))).any(1).nonzero().flatten().tolist()
        raise UserError(f"{len(bad)} of {len(latents)} latents are not finite (e.g. image {bad[0]}); "
                        f"nothing was finished: check the model and settings (fp16 overflow? try bf16)")
    with atomic_path(partial / "latents.safetensors") as tmp:
        save_file({"latents": latents.contiguous(), **conditioning}, str(tmp))
    write_text(partial / "prompts.txt", "\n".join(prompts))
    shutil.rmtree(partial / "latents")
    manifest["latent_shape"] = list(latents.shape[1:])
    write_json(partial / MANIFEST, {**stamp(), **manifest})
    publish(partial, out, MANIFEST)


def _save_image(partial: Path, index: int, latent: torch.Tensor, image: Image.Image, prompt: str,
                conditioning: Conditioning) -> None:
    # Latent first, image last: an index counts as done only when its image exists.
    if not torch.isfinite(latent).all():  # stop at the first broken image, not after hours of them
        raise UserError(f"image {index} ({prompt!r}) came out non-finite (NaN or inf); nothing was finished: "
                        "check the model and settings (fp16 overflow? try --mixed-precision bf16 or no)")
    with atomic_path(partial / "latents" / f"{index:06d}.safetensors") as tmp:
        save_file({"latent": latent.contiguous(), **conditioning}, str(tmp))
    with atomic_path(partial / "images" / f"{index:06d}.png") as tmp:
        image.save(tmp, format="PNG")


def _start(out: Path, overwrite: bool, record: dict, accelerator) -> Path:
    """Check the destination on every process (all fail alike); the main process opens the work
    folder, kept from an interrupted run with the same settings."""
    check_output(set_output(out), overwrite)
    partial = partial_of(out)
    accelerator.wait_for_everyone()  # every process has checked before the work folder changes
    if accelerator.is_main_process:
        partial, _ = open_work(out, "image set", record, keep=not overwrite)
        (partial / "images").mkdir(exist_ok=True)
        (partial / "latents").mkdir(exist_ok=True)
    accelerator.wait_for_everyone()
    return partial


def set_record(pipe, ref: ModelRef, prompts: list[str], settings: GenerationSettings, kind: str,
               stream: str = "image") -> dict:
    """What a generated set's manifest records: its origin and every setting that shapes it."""
    size = image_size(pipe, settings.resolution)
    family = family_of(pipe)
    return {
        **({"seed_stream": stream} if stream != "image" else {}),  # (sets of the image stream predate the key)
        "kind": kind,
        "source": "generated",
        "base_model": ref.identity,
        "architecture": family.name,
        "unet_config_hash": unet_config_hash(family.denoiser_of(pipe)),
        "num_images": len(prompts),
        "resolution": size,
        "micro_conditioning": {k: list(v) for k, v in family.micro_conditioning(size).items()},
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        "scheduler": family.sampler or type(pipe.scheduler).__name__,
        **({"max_sequence_length": family.max_sequence_length} if family.max_sequence_length else {}),
        "seed": settings.seed,
        "prompts_sha": _digest(prompts),
    }


def is_cached(out: str | Path, record: dict) -> bool:
    """A finished set of ours made with exactly these settings."""
    out = Path(out)
    return is_finished(out) and all(json.loads((out / MANIFEST).read_text()).get(k) == v for k, v in record.items())


def generate_image_set(
    pipe,
    ref: ModelRef,
    prompts: list[str],
    settings: GenerationSettings,
    out_dir: str | Path,
    kind: str,
    accelerator,
    overwrite: bool = False,
    reuse: bool = False,
    stream: str = "image",
) -> ImageSet:
    """Sample one image per prompt with the base model; processes share the work by index; image
    i's seed is image_seed(settings.seed, i, stream).

    With `reuse`, a finished set made with exactly these settings is returned as it is (a cache).
    """
    out = Path(out_dir)
    record = set_record(pipe, ref, prompts, settings, kind, stream)
    if reuse and is_cached(out, record):
        return load_image_set(out)
    if reuse and is_finished(out):
        overwrite = True  # a cache of ours made with other settings is stale
    partial = _start(out, overwrite, record, accelerator)
    settings, predicted = planned_sampling(pipe, settings, accelerator)
    # A resumed run redoes whole batches, so every image is still made in the batch it would have
    # been made in without the interruption.
    b = settings.batch_size
    mine = process_share(len(prompts), b, accelerator.process_index, accelerator.num_processes)
    todo = [i for k in range(0, len(mine), b) for i in mine[k : k + b]
            if not all((partial / "images" / f"{j:06d}.png").is_file() for j in mine[k : k + b])]
    bar = tqdm(
        total=len(prompts), initial=len(prompts) - len(todo) * accelerator.num_processes,
        desc=f"{kind} images", unit="img", disable=not accelerator.is_main_process,
    )
    per_image = generation_passes(1, settings.num_inference_steps, settings.guidance_scale)
    family = family_of(pipe)
    conditioning = family.image_conditioning(family.micro_conditioning(image_size(pipe, settings.resolution)),
                                             settings.guidance_scale)
    # Under the run's mixed precision (bf16 on a GPU by default): the pipeline may hold float32 weights.
    with accelerator.autocast():
        for position, latent, image in generate(
            pipe, [prompts[i] for i in todo], [image_seed(settings.seed, i, stream) for i in todo], settings, predicted
        ):
            _save_image(partial, todo[position], latent, image, prompts[todo[position]], conditioning)
            bar.update(accelerator.num_processes)
            if position + 1 == min(b, len(todo)):
                first_batch(bar, per_image, f"{kind} images")
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish(partial, out, prompts, record)
    accelerator.wait_for_everyone()
    return load_image_set(out)


def _load_rgb(path: Path, size: int) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to `size`, then centre-crop a square; also return the original
    (height, width) and the crop's (top, left), which SDXL conditions on."""
    try:
        image = Image.open(path).convert("RGB")
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None
    original = (image.height, image.width)
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size)), original, (top, left)


@torch.no_grad()
def encode_image_folder(
    pipe, ref: ModelRef, images_dir: str | Path, out_dir: str | Path, resolution: int | None,
    accelerator, overwrite: bool = False, batch_size: int = 8, reuse: bool = False, kind: str = "surrogate",
) -> ImageSet:
    """Turn the user's own images into a set: resized, centre-cropped, VAE-encoded. `kind` names
    the set (surrogate; concept for `attack`) and the flag the errors point at (--KIND-images)."""
    source = Path(images_dir)
    flag = f"--{kind}-images"
    if not source.is_dir():
        raise UserError(f"{flag} {source} is not a folder")
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{flag} {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    out = Path(out_dir)
    size = image_size(pipe, resolution)
    family = family_of(pipe)
    record = {"kind": kind, "source": "images", "images_dir": str(source.resolve()),
              "base_model": ref.identity, "architecture": family.name,
              "unet_config_hash": unet_config_hash(family.denoiser_of(pipe)),
              "num_images": len(files), "resolution": size,
              "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}
    if reuse and is_finished(out):
        if all(json.loads((out / MANIFEST).read_text()).get(k) == v for k, v in record.items()):
            return load_image_set(out)
        overwrite = True  # a cache of ours made from other images is stale
    partial = _start(out, overwrite, record, accelerator)
    if accelerator.is_main_process:
        for start in tqdm(range(0, len(files), batch_size), desc="encoding images", unit="batch"):
            loaded = [_load_rgb(f, size) for f in files[start : start + batch_size]]
            pixels = torch.from_numpy(np.stack([np.asarray(im) for im, _, _ in loaded])).permute(0, 3, 1, 2)
            latents = encode(pipe.vae, pixels.float() / 127.5 - 1)
            for offset, (latent, (image, original, crop)) in enumerate(zip(latents.cpu(), loaded)):
                conditioning = family.image_conditioning(family.micro_conditioning(size, original, crop))
                _save_image(partial, start + offset, latent, image, files[start + offset].name, conditioning)
        _finish(partial, out, [""] * len(files), record)
    accelerator.wait_for_everyone()
    return load_image_set(out)


def _digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


