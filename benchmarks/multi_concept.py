"""Several concepts on the digits model: forgetting two and three digits in one run and one after
another (issue 14), against forgetting one digit.

Each case is `amnesia-sd demo` with its defaults (400 steps per digit in one run; 400 per run in a
sequence, whose later runs take gamma 3 and a learning-rate warm-up of 100 steps), so the numbers
are the demo's: per forgotten digit p_forgotten and p_forgotten_heldout,
acc_retained over the digits kept, and the time the forgetting took (SA and naive runs). Sequences
are run with each later run's Fisher and replay set taken from the base model ("reuse") and made
again on the model being trained ("recompute"). Targets: every forgotten digit p_forgotten <= 0.05
and p_forgotten_heldout <= 0.10, acc_retained within 3 points of the original.
Prints one JSON object (and writes it to --out).

    python benchmarks/multi_concept.py [--samples-per-digit 100] [--only TEXT ...] [--seed 0] [--out multi_concept.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from amnesia_sd.studies.demo import DemoConfig, demo

CASES = [
    ("one digit", [0], False, "reuse"),
    ("two digits, one run", [0, 1], False, "reuse"),
    ("two digits, sequential, Fisher reused", [0, 1], True, "reuse"),
    ("two digits, sequential, Fisher recomputed", [0, 1], True, "recompute"),
    ("three digits, one run", [0, 1, 2], False, "reuse"),
    ("three digits, sequential, Fisher reused", [0, 1, 2], True, "reuse"),
    ("three digits, sequential, Fisher recomputed", [0, 1, 2], True, "recompute"),
]


def meets(metrics: dict) -> bool:
    sa, original = metrics["sa"], metrics["original"]
    each = sa.get("per_digit") or {metrics["forgotten_digits"][0]: sa}
    return (all(e["p_forgotten"] <= 0.05 and e["p_forgotten_heldout"] <= 0.10 for e in each.values())
            and sa["acc_retained"] >= original["acc_retained"] - 0.03)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-per-digit", type=int, default=DemoConfig.samples_per_digit)
    parser.add_argument("--only", action="append", help="run only the cases whose name contains this text "
                                                         "(repeat for several)")
    parser.add_argument("--seed", type=int, default=DemoConfig.seed, help="the demo's --seed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, digit, sequential, fisher in CASES:
            if args.only and not any(text in name for text in args.only):
                continue
            m = demo(DemoConfig(digit=digit, sequential=sequential, sequential_fisher=fisher, seed=args.seed,
                                    samples_per_digit=args.samples_per_digit, output_dir=f"{tmp}/{len(results)}"))
            results[name] = {
                "digits": digit, "sequential": sequential, "sequential_fisher": fisher if sequential else None,
                "seed": args.seed, "unconditional_replay": m["settings"]["unconditional_replay"],
                "max_train_steps": m["settings"]["max_train_steps"], "forget_seconds": m["forget_seconds"],
                "seconds": m["seconds"], "meets_targets": meets(m),
                **{model: m[model] for model in ("original", "sa", "naive")},
            }
            print(json.dumps({name: results[name]}), flush=True)
    one = results.get("one digit")
    if one:
        for r in results.values():
            r["sa_forget_time_vs_one_digit"] = round(r["forget_seconds"]["sa"] / one["forget_seconds"]["sa"], 2)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
