"""The amnesia-sd cache: replay sets and Fishers per base model, made once and reused by every
`forget` on that model.

An entry is a folder `models/<key>/` keyed by the base model's identity, its UNet config hash and a
digest of its UNet weights as loaded, so a model changed in place never meets a stale entry. Inside,
each replay set and Fisher is named by a digest of the settings it was made with, and also records
those settings (the set's manifest, the Fisher's metadata), which are checked again on reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .errors import UserError
from .io import write_json
from .paths import stamp

INFO = "entry.json"  # marks a cache entry of ours
SAMPLES_PER_TENSOR = 64


def cache_dir() -> Path:
    """$AMNESIA_SD_CACHE, else $XDG_CACHE_HOME/amnesia-sd, else ~/.cache/amnesia-sd."""
    if os.environ.get("AMNESIA_SD_CACHE"):
        return Path(os.environ["AMNESIA_SD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "amnesia-sd"


def digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def weights_digest(unet) -> str:
    """A digest of the UNet's weights from evenly spaced elements of every tensor: any fine-tune
    changes almost every weight, so a few per tensor tell models apart at no cost."""
    h = hashlib.sha256()
    for name, p in unet.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(flat[::step][:SAMPLES_PER_TENSOR].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_entry(origin: dict, unet) -> Path:
    """The cache folder of one base model (made, with its record, on first use)."""
    key = {**origin, "unet_weights": weights_digest(unet)}
    entry = cache_dir() / "models" / digest(key)
    if not (entry / INFO).is_file():
        entry.mkdir(parents=True, exist_ok=True)
        write_json(entry / INFO, {**stamp(), **key})
    return entry


def entries() -> list[dict]:
    """Every model entry: its record, path, size in bytes, and what it holds."""
    root = cache_dir() / "models"
    found = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            record = json.loads((entry / INFO).read_text())
        except (OSError, ValueError):
            continue  # not an entry of ours
        files = [f for f in entry.rglob("*") if f.is_file()]
        found.append({"path": str(entry), "base_model": record.get("base_model"),
                      "bytes": sum(f.stat().st_size for f in files),
                      "items": sorted(p.name for p in entry.iterdir() if p.name != INFO)})
    return found


def clear(base_model: str | None = None) -> list[dict]:
    """Remove every entry of ours (or those of one base model); returns what was removed."""
    removed = [e for e in entries() if base_model is None or e["base_model"] in (base_model, f"hub:{base_model}")]
    if base_model is not None and not removed:
        raise UserError(f"the cache holds nothing for {base_model}; `amnesia-sd cache list` shows what it holds")
    for entry in removed:
        shutil.rmtree(entry["path"])
    return removed
