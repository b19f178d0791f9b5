"""Launching `amnesia-sd` as several processes on the CPU (gloo), the ways users launch it:
accelerate launch (DDP, or FSDP with the documented config) and torchrun; and what the tests of
several processes compare."""

import hashlib
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import ENV, EXE, unet_weights

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
QUICK = ["--num-inference-steps", "2", "--batch-size", "2"]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def command(launcher: str, processes: int, *args) -> list[str]:
    if launcher == "single":
        return [EXE, *args]
    if launcher == "fsdp":
        # The FSDP config users are given (docs/multi-gpu.md), in float32 so results compare exactly;
        # without CUDA its processes run on the CPU over gloo.
        return [ACCELERATE, "launch", "--config_file", str(fsdp_config()), "--num_processes", str(processes),
                "--mixed_precision", "no", "--main_process_port", free_port(), EXE, *args]
    if launcher == "accelerate":
        # --multi_gpu picks accelerate's multi-process launcher; without CUDA it runs on the CPU over gloo.
        return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(), EXE, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", free_port(), "-m", "amnesia_sd.cli", *args]


def worker_exit_codes(stderr: str) -> tuple[int, list[int]]:
    """From torchrun's failure report (torchrun itself exits with 1 when a worker fails): the exit code
    of the first failed worker, and those of all the failed workers it lists."""
    report = stderr[stderr.rindex("Failures:"):]
    codes = r"exitcode\s*:\s*(-?\d+)"
    first = int(re.search(codes, report[report.index("Root Cause"):]).group(1))
    return first, [int(c) for c in re.findall(codes, report)]


def launch(launcher: str, processes: int, *args, cwd, check: bool = True):
    done = subprocess.run(command(launcher, processes, *args), cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def fsdp_config() -> Path:
    """The `# fsdp.yaml` block users are given (the README's, the same in docs/multi-gpu.md), written
    to a file."""
    root = Path(__file__).parents[1]
    block, *same = (re.search(r"```yaml\n(# fsdp\.yaml\n.*?)```", (root / page).read_text(), re.S).group(1)
                    for page in ("README.md", "docs/multi-gpu.md"))
    assert same == [block], "the README's and docs/multi-gpu.md's fsdp.yaml differ"
    path = Path(tempfile.gettempdir()) / f"amnesia-test-fsdp-{hashlib.sha256(block.encode()).hexdigest()[:12]}.yaml"
    if not path.is_file():
        path.write_text(block)
    return path


def shared_sets(model: Path, root: Path, images: int = 5, timesteps: int = 8, timestep_batch: int = 4) -> Path:
    """A replay set, its Fisher and a surrogate set in `root`, made by one process (this one)."""
    from amnesia_sd.core.config import FimConfig, SetConfig
    from amnesia_sd.commands.fim import compute_fim
    from amnesia_sd.commands.sets import make_image_set
    from amnesia_sd.data.prompts import replay_prompts

    quick = {"model": str(model), "num_inference_steps": 2, "batch_size": 2}
    make_image_set(SetConfig(output_dir=str(root / "replay"), kind="replay", prompts=replay_prompts(), num_images=images,
                             **quick))
    make_image_set(SetConfig(output_dir=str(root / "surrogate"), kind="surrogate", prompts=["a middle aged man"],
                             num_images=min(images, 4), **quick))
    compute_fim(FimConfig(model=str(model), output=str(root / "fim.safetensors"), replay_dir=str(root / "replay"),
                          num_timesteps=timesteps, timestep_batch_size=timestep_batch))
    return root


def kill_at_checkpoint(launcher: str, args: list[str], work: Path, out: str, step: int = 8) -> list[int]:
    """Preemption: run forget with 2 processes and, once checkpoint-`step` is saved, kill the whole
    launcher and its workers at once, mid-run. Returns the steps of the checkpoints kept."""
    import psutil

    run = subprocess.Popen(command(launcher, 2, *args), cwd=work, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    checkpoints = work / f"{out}.partial" / "checkpoints"  # the run works in OUT.partial until it finishes
    deadline = time.time() + 240
    while not (checkpoints / f"checkpoint-{step}").is_dir() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    launcher_process = psutil.Process(run.pid)
    workers = launcher_process.children(recursive=True)  # they may sit in sessions of their own
    for process in [launcher_process, *workers]:
        process.kill()
    run.wait()
    psutil.wait_procs(workers, timeout=30)
    assert not (work / out / "amnesia.json").exists(), "the run finished before it could be killed"
    return sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))


def forget_args(model, out, batch, *extra):
    return ["forget", "--model", model, "--concept", "Brad Pitt", "--surrogate-dir", "surrogate",
            "--replay-dir", "replay", "--fim", "fim.safetensors", "--output-dir", out, "--train-batch-size",
            str(batch), "--learning-rate", "1e-3", "--lambda-ewc", "1e3", *extra]


def trained_weights(folder: Path) -> dict[str, torch.Tensor]:
    lora = folder / "pytorch_lora_weights.safetensors"
    return load_file(str(lora)) if lora.is_file() else unet_weights(folder)


def assert_same_update(one: Path, two: Path, base: dict[str, torch.Tensor] | None):
    """Two runs made the same update (relative to `base`, or to zero for LoRA adapters)."""
    a, b = trained_weights(one), trained_weights(two)
    assert a.keys() == b.keys()
    update_one = torch.cat([(a[k] - (base[k] if base else 0)).flatten() for k in a])
    update_two = torch.cat([(b[k] - (base[k] if base else 0)).flatten() for k in a])
    assert update_one.abs().max() > 1e-4
    # Adam's first steps are about lr * sign(g), so an element whose gradient is ~1e-8 may differ.
    assert (update_two - update_one).norm() <= 1e-3 * update_one.norm()
