"""The amnesia-sd cache: replay sets, preserve sets (forget --preserve) and Fishers per base model,
made once and reused by every `forget` on that model.

An entry is a folder `models/<key>/` keyed by the base model's identity, its UNet config hash and a
digest of its UNet weights as loaded, so a model changed in place never meets a stale entry. Inside,
each set and Fisher is named by a digest of the settings it was made with, and also records
those settings (the set's manifest, the Fisher's metadata), which are checked again on reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from amnesia_sd.core.errors import UserError
from amnesia_sd.core.io import write_json
from amnesia_sd.core.paths import is_our_partial, is_ours, stamp

INFO = "entry.json"  # marks a cache entry of ours
FISHER_FORMAT = "amnesia-sd-fisher"  # the metadata format of a Fisher file (fisher.py writes them)
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
    try:
        if not (entry / INFO).is_file():
            entry.mkdir(parents=True, exist_ok=True)
            write_json(entry / INFO, {**stamp(), **key})
    except OSError as exc:
        raise UserError(f"the amnesia-sd cache {cache_dir()} cannot hold a new entry ({exc.strerror or exc}): point "
                        "AMNESIA_SD_CACHE at a writable folder, or pass --replay-dir and --fim") from None
    return entry


def _record(entry: Path) -> dict | None:
    """An entry's record when the entry is ours: a real folder (not a link) whose entry.json carries our
    stamp, holding nothing but what we write there (image sets and their work folders, Fishers)."""
    try:
        if entry.is_symlink() or not entry.is_dir():
            return None
        record = json.loads((entry / INFO).read_text())
        if not isinstance(record, dict) or record.get("tool") != stamp()["tool"]:
            return None
        return record if all(_our_item(p) for p in entry.iterdir()) else None
    except (OSError, ValueError):
        return None


def _our_item(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.name == INFO:
        return path.is_file()
    if path.name.startswith(("replay-", "preserve-")) and path.is_dir():
        return is_ours(path, "manifest.json") or is_our_partial(path)
    if path.name.startswith("fim-") and path.name.endswith(".safetensors") and path.is_file():
        return is_ours(path, None, (FISHER_FORMAT,))
    return False


def entries() -> list[dict]:
    """Every model entry of ours: its record, path, size in bytes, and what it holds. Folders that
    are not ours (no stamp, or something in them we did not write) are never listed, so never removed."""
    root = cache_dir() / "models"
    found = []
    try:
        folders = sorted(root.iterdir()) if root.is_dir() and not root.is_symlink() else []
    except OSError as exc:
        raise UserError(f"cannot read the amnesia-sd cache {root} ({exc.strerror or exc})") from None
    for entry in folders:
        record = _record(entry)
        if record is None:
            continue
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
        try:
            shutil.rmtree(entry["path"])
        except OSError as exc:
            raise UserError(f"could not remove {entry['path']} ({exc.strerror or exc}); nothing after it was "
                            "touched: check its permissions") from None
    return removed
