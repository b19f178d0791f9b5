"""What a command will cost, said before it starts (in denoiser passes, the unit that dominates every
step), and the measured rate with an ETA once the first batch is done."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def generation_passes(images: int, steps: int, guidance_scale: float) -> int:
    """One denoiser pass per image and sampling step, two with classifier-free guidance (> 1)."""
    return images * steps * (2 if guidance_scale > 1 else 1)


def say(line: str) -> None:
    """One line from the first process, above any open progress bar."""
    if os.environ.get("RANK", "0") == "0":
        tqdm.write(line)
        sys.stdout.flush()  # before any error line on stderr, also when stdout is a file or a pipe


def announce(what: str, parts: list[tuple[str, int | None]]) -> None:
    """'cost of forget: replay set (...): 100,000 passes; Fisher (...): cached; ...; N denoiser passes in all'.
    A part with None passes is cached (costs nothing)."""
    described = [f"{name}: {'cached' if passes is None else f'{passes:,} passes'}" for name, passes in parts]
    total = sum(p for _, p in parts if p)
    say(f"cost of {what}: {'; '.join(described)}; {total:,} denoiser passes in all (a forward+backward pass "
        "costs about 3 forward passes); rate and ETA follow the first batch")


def first_batch(bar: tqdm, passes_per_unit: float, label: str) -> None:
    """After the bar's first update: the measured rate and the ETA of this step, once (the bar has a total)."""
    if bar.disable or getattr(bar, "_rate_said", False):
        return
    done = bar.n - bar.initial  # a resumed bar starts at what was already done
    if done <= 0:
        return
    bar._rate_said = True
    elapsed = bar.format_dict["elapsed"] or 1e-9
    rate = done * passes_per_unit / elapsed
    # A slow rate as passes/s would print as "0.0 denoiser passes/s"; seconds per pass stays readable.
    speed = f"{rate:,.1f} denoiser passes/s" if rate >= 1 else f"{1 / rate:,.1f} s per denoiser pass"
    if bar.n >= bar.total:  # the first batch was the whole job: nothing left to estimate
        say(f"{label}: finished in {tqdm.format_interval(elapsed)} at {speed}")
        return
    remaining = (bar.total - bar.n) * passes_per_unit / rate
    say(f"{label}: {speed} after the first batch; about {tqdm.format_interval(remaining)} to go")
