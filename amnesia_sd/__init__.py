"""amnesia-sd: make a Stable Diffusion model forget a concept with Selective Amnesia.

The Python API is what the CLI calls, one function and one config per command (docs/python-api.md):

    from amnesia_sd import ForgetConfig, forget
    forget(ForgetConfig(model="CompVis/stable-diffusion-v1-4", concept="Brad Pitt",
                        surrogate="a middle aged man", output_dir="brad-pitt-forgotten"))

The package is in layers, each importing only those below it: core (settings, errors, files), model,
data, method (what several commands share), commands (one module each, never importing another),
studies (the digits demo), and on top this API and cli.py.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from amnesia_sd.core.version import __version__

# Each name is imported when first used, so `import amnesia_sd.cli` (and `amnesia-sd --help`, or a
# mistyped flag) answers without loading torch and diffusers.
API = {
    "make_image_set": "amnesia_sd.commands.sets", "SetConfig": "amnesia_sd.core.config",
    "compute_fim": "amnesia_sd.commands.fim", "FimConfig": "amnesia_sd.core.config",
    "forget": "amnesia_sd.commands.forget", "ForgetConfig": "amnesia_sd.core.config",
    "sample": "amnesia_sd.commands.sample", "SampleConfig": "amnesia_sd.commands.sample",
    "evaluate": "amnesia_sd.commands.evaluate", "EvalConfig": "amnesia_sd.commands.evaluate",
    "attack": "amnesia_sd.commands.attack", "AttackConfig": "amnesia_sd.commands.attack",
    "export": "amnesia_sd.commands.export", "ExportConfig": "amnesia_sd.commands.export",
    "demo": "amnesia_sd.studies.demo", "DemoConfig": "amnesia_sd.studies.demo",
    "UserError": "amnesia_sd.core.errors", "Interrupted": "amnesia_sd.core.errors",
}
__all__ = ["__version__", *API]

if TYPE_CHECKING:  # what editors and type checkers see
    from amnesia_sd.commands.attack import AttackConfig, attack
    from amnesia_sd.commands.evaluate import EvalConfig, evaluate
    from amnesia_sd.commands.export import ExportConfig, export
    from amnesia_sd.commands.fim import compute_fim
    from amnesia_sd.commands.forget import forget
    from amnesia_sd.commands.sample import SampleConfig, sample
    from amnesia_sd.commands.sets import make_image_set
    from amnesia_sd.core.config import FimConfig, ForgetConfig, SetConfig
    from amnesia_sd.core.errors import Interrupted, UserError
    from amnesia_sd.studies.demo import DemoConfig, demo


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'amnesia_sd' has no attribute {name!r}")
    value = getattr(importlib.import_module(API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
