"""Memory plan against measurement: the planner's predicted activation bytes (amnesia_sd.model.memory,
counted on the meta device) against a real forward+backward of the full SD v1.4 UNet (random
weights, no download) on the CPU at 64x64 latents, batch 1 and 2, fp32 and bf16 autocast, for a
Fisher chunk (eval mode, every weight's gradient) and a training step (train mode).

Measured: the peak resident memory of the process during the forward+backward (Linux's VmHWM,
reset just before) above what it held before, with the weights' gradients already allocated (so
the difference is activations and temporaries) and freed heap pages returned first (malloc_trim).
Each row is measured in a fresh process: after other rows, the heap's fragmentation adds up to
0.5 GiB to a step's peak (training fp32 batch 1 read 2.62 GiB after the bf16 rows, 2.18 alone).
Target: every |predicted - measured| / measured within 0.15. It prints one JSON object, on its last
line, with every row and max_relative_error (the rows also go to stderr as they are measured). The
tiny UNet of --smoke is dominated by the allocator's and the runtime's own overheads: no target.

    python benchmarks/memory_plan.py            # about 5 minutes on 2 cores
    python benchmarks/memory_plan.py --smoke    # the tiny UNet: seconds (no target)
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import time

import torch
from diffusers import UNet2DConditionModel

from amnesia_sd.model.families import FAMILIES
from amnesia_sd.model.memory import activation_peak
from unets import SD14_UNET, TINY_UNET

SD = FAMILIES["sd"]


def resident() -> int:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024


def peak_resident() -> int:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) * 1024


def measure(unet, batch: int, latent: int, precision: str, phase: str) -> int:
    """Peak bytes above the start of one forward+backward, gradients already allocated."""
    unet.train(phase == "training")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 4, latent, latent), generator=g)
    cond = torch.randn((batch, 77, unet.config.cross_attention_dim), generator=g)
    t = torch.full((batch,), 500)
    for p in unet.parameters():  # resident, as after the first chunk or step
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = resident()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        out = unet(x, t, cond).sample
    out.float().pow(2).mean().backward()
    del out
    return peak_resident() - start


def build(smoke: bool):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config, latent = (TINY_UNET, 8) if smoke else (SD14_UNET, 64)
    with torch.device("meta"):
        meta = UNet2DConditionModel(**config)
    return meta, latent, (lambda: UNet2DConditionModel(**config))


def main() -> None:
    smoke = "--smoke" in sys.argv
    meta, latent, make = build(smoke)
    if "--row" in sys.argv:  # the child: one measurement in a fresh process
        phase, precision, batch = sys.argv[sys.argv.index("--row") + 1].split(",")
        print(measure(make(), int(batch), latent, precision, phase))
        return
    rows = []
    for phase in ("fisher",) if smoke else ("fisher", "training"):  # smoke: the code path, in fewer rows
        for precision in ("fp32",) if smoke else ("fp32", "bf16"):
            for batch in (1, 2):
                started = time.time()
                predicted = activation_peak(SD, meta, batch, (latent, latent), "no" if precision == "fp32" else "bf16",
                                            False)
                child = subprocess.run([sys.executable, __file__, "--row", f"{phase},{precision},{batch}",
                                        *(["--smoke"] if smoke else [])], capture_output=True, text=True, check=True)
                measured = int(child.stdout.split()[-1])
                rows.append({"phase": phase, "precision": precision, "batch": batch, "predicted_gib": predicted / 2**30,
                             "measured_gib": measured / 2**30,
                             "relative_error": abs(predicted - measured) / max(measured, 1),
                             "seconds": round(time.time() - started, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    print(json.dumps({"benchmark": "memory_plan", "unet": "tiny" if smoke else "SD v1.4 (random weights)",
                      "latent": latent, "threads": torch.get_num_threads(), "target": 0.15, "rows": rows,
                      "max_relative_error": max(r["relative_error"] for r in rows)}))


if __name__ == "__main__":
    main()
