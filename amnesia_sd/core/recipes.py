"""Bundled recipes: named sets of forget settings (amnesia_sd/recipe_files/*.yaml), the layer between
the defaults and a config file. Each file holds `description:` and ForgetConfig keys."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from amnesia_sd.core.errors import UserError


def _files() -> dict[str, Any]:
    folder = resources.files("amnesia_sd").joinpath("recipe_files")
    return {f.name.removesuffix(".yaml"): f for f in folder.iterdir() if f.name.endswith(".yaml")}


def recipes() -> dict[str, dict[str, Any]]:
    """Every bundled recipe by name: {description, settings}."""
    found = {}
    for name, f in sorted(_files().items()):
        data = yaml.safe_load(f.read_text(encoding="utf-8"))
        found[name] = {"description": data.pop("description"), "settings": data}
    return found


def recipe_settings(name: str) -> dict[str, Any]:
    """A recipe's settings, with `recipe` set to its name (so the result records it)."""
    known = recipes()
    if name not in known:
        raise UserError(f"--recipe {name!r} is not a bundled recipe: choose one of {', '.join(known)} "
                        "(`amnesia-sd recipes` lists their settings)")
    return {**known[name]["settings"], "recipe": name}
