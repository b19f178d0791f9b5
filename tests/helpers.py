"""Small shared pieces of the tests: loading the tiny model's parts and making image sets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline


# The installed command, and the environment every subprocess of the tests runs in: offline, and one
# thread each (2 cores; several processes at once would oversubscribe them).
EXE = str(Path(sys.executable).with_name("amnesia-sd"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def load_parts(model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, DDPMScheduler.from_config(pipe.scheduler.config)


def random_latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def unet_weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{model_dir}/unet/diffusion_pytorch_model.safetensors")


def run_command(*args, cwd, code: int = 0):
    """An `amnesia-sd` command run in this process, in the folder `cwd` (relative paths as the user
    gives them), with its own stdout and stderr: the installed command's entry point
    (amnesia_sd.cli:main) only sets TOKENIZERS_PARALLELISM, as conftest does, and calls this same app.
    Asserts the exit code; returns the result (.stdout, .stderr, .output)."""
    import traceback

    import pytest
    from typer.testing import CliRunner

    from amnesia_sd.cli import app

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        result = CliRunner().invoke(app, [str(a) for a in args])
    trace = "".join(traceback.format_exception(result.exception)) if result.exception else ""
    assert result.exit_code == code, f"{result.output}\n{trace}"
    return result


def make_sets(model, root: Path, fisher: bool = False) -> Path:
    """A 2-image replay set and surrogate set of `model` in `root` (and, with `fisher`, a 2-timestep
    Fisher fim.safetensors), made with the commands as a user runs them."""
    quick = ["--num-inference-steps", "2", "--batch-size", "2"]
    run_command("replay", "--model", model, "--output-dir", "replay", "--num-images", "2", *quick, cwd=root)
    run_command("surrogate", "--model", model, "--prompt", "a middle aged man", "--output-dir", "surrogate",
                "--num-images", "2", *quick, cwd=root)
    if fisher:
        run_command("fim", "--model", model, "--replay-dir", "replay", "--num-timesteps", "2", "--output",
                    "fim.safetensors", cwd=root)
    return root


def uniform_timesteps(count, generator):
    """DDPM's timestep draw (families.StableDiffusion.draw_timesteps) for 1000 training timesteps."""
    return torch.randint(1000, (count,), generator=generator)
