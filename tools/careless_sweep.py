"""Try amnesia-sd as a careless user would, on the built-in digits model: every command with its
path flags pointed at the other inputs, at user files and folders, at results of other kinds, and
with numbers and words that make no sense. A case holds when the command either succeeds or
refuses with exit code 2 and one `error:` line, never a traceback, and every file it was not asked
to write is byte for byte what it was before.

    python tools/careless_sweep.py            # prints one line per case, then the count held
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

EXE = str(Path(sys.executable).with_name("amnesia-sd"))
QUICK = ["--num-inference-steps", "2", "--batch-size", "4"]


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="amnesia-careless-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "AMNESIA_SD_CACHE": str(root / "cache")}

    def run(*args, cwd=root):
        return subprocess.run([EXE, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)

    # What a user has lying around: their own files and folders, and results made by each command.
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("mine")
    (root / "photo.png").write_bytes(b"not really a png")
    (root / "empty").mkdir()
    for args in (["replay", "--model", "digits", "--output-dir", "replay", "--num-images", "8", *QUICK],
                 ["surrogate", "--model", "digits", "--prompt", "noise", "--output-dir", "surrogate", "--num-images",
                  "4", *QUICK],
                 ["fim", "--model", "digits", "--replay-dir", "replay", "--output", "fim.safetensors",
                  "--num-timesteps", "4"],
                 ["forget", "--model", "digits", "--concept", "zero", "--surrogate-dir", "surrogate", "--replay-dir",
                  "replay", "--fim", "fim.safetensors", "--output-dir", "forgotten", "--max-train-steps", "2"],
                 ["export", "--model", "forgotten", "--output", "model.safetensors"]):
        done = run(*args)
        assert done.returncode == 0, done.stderr[-2000:]
    base = ["--model", "digits"]
    forget = ["forget", "--model", "digits", "--concept", "zero", "--surrogate-dir", "surrogate", "--replay-dir",
              "replay", "--fim", "fim.safetensors", "--max-train-steps", "2"]
    things = {"the model result": "forgotten", "a user folder": "mine", "a user file": "mine/notes.txt",
              "the replay set": "replay", "the surrogate set": "surrogate", "the Fisher": "fim.safetensors",
              "an export": "model.safetensors", "a fake png": "photo.png"}
    cases = []
    for what, path in things.items():
        cases += [(f"replay --output-dir {what}", ["replay", *base, "--output-dir", path, "--num-images", "2", *QUICK,
                                                   "--overwrite"]),
                  (f"fim --output {what}", ["fim", *base, "--replay-dir", "replay", "--output", path, "--overwrite"]),
                  (f"forget --output-dir {what}", [*forget, "--output-dir", path, "--overwrite"]),
                  (f"export --output {what}", ["export", "--model", "forgotten", "--output", path, "--overwrite"]),
                  (f"sample --output-dir {what}", ["sample", *base, "--prompt", "zero", "--output-dir", path, *QUICK,
                                                   "--overwrite"]),
                  (f"forget --fim {what}", [*forget[:-4], "--fim", path, "--output-dir", "o", "--max-train-steps",
                                            "2"]),
                  (f"forget --replay-dir {what}", [*forget[:7], "--replay-dir", path, "--fim", "fim.safetensors",
                                                   "--output-dir", "o2", "--max-train-steps", "2"]),
                  (f"eval --model {what}", ["eval", "--model", path, "--output-dir", "ev", "--num-images", "2", *QUICK])]
    for value in ("0", "-1", "nan", "inf", "1e308", "abc", ""):
        cases += [(f"forget --learning-rate {value!r}", [*forget, "--output-dir", "o3", "--learning-rate", value]),
                  (f"forget --lambda-ewc {value!r}", [*forget, "--output-dir", "o3", "--lambda-ewc", value]),
                  (f"replay --num-images {value!r}", ["replay", *base, "--output-dir", "r3", "--num-images", value]),
                  (f"forget --max-memory {value!r}", [*forget, "--output-dir", "o3", "--max-memory", value])]
    cases += [("forget on itself", [*forget, "--output-dir", "replay/inner"]),
              ("forget --resume-from-checkpoint a user folder", [*forget, "--output-dir", "o4",
                                                                  "--resume-from-checkpoint", "mine"]),
              ("attack --token an existing word", ["attack", "--model", "forgotten", "--output-dir", "a",
                                                   "--token", "zero", "--steps", "2", "--num-images", "2", *QUICK]),
              ("cache clear twice", ["cache", "clear"]), ("cache clear again", ["cache", "clear"]),
              ("unknown command", ["unlearn"]), ("no flags", ["forget"]),
              ("config file that is a folder", [*forget, "--output-dir", "o5", "--config", "mine"])]
    held = 0
    for name, args in cases:
        before = hashes(root)
        done = run(*args)
        after = hashes(root)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        changed = [k for k in before if after.get(k) != before[k]]
        # What the case was asked to write may change; nothing else may.
        asked = [str(a) for a in args[1:]]
        foreign = [k for k in changed if not any(k == a or k.startswith(a.rstrip("/") + "/") for a in asked)
                   and not k.startswith("cache/")]
        ok = (done.returncode == 0 or (done.returncode == 2 and len(errors) == 1)) and \
            "Traceback" not in done.stderr and not foreign
        held += ok
        print(f"{'held' if ok else 'FAILED'}: {name}: exit {done.returncode}; "
              + (errors[0][:160] if errors else "ok") + (f"; changed {foreign}" if foreign else ""), flush=True)
        for leftover in ("o", "o2", "o3", "o4", "o5", "ev", "r3", "a"):
            shutil.rmtree(root / leftover, ignore_errors=True)
    print(f"{held} of {len(cases)} cases held")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
