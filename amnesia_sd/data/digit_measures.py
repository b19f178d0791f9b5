"""The digits model's measurements, shared by `demo` and `eval`: which prompts and seeds are sampled,
and the four numbers read from the classifier's probabilities."""

from __future__ import annotations

import torch

from amnesia_sd.data.generate import image_seed
from amnesia_sd.model import digits

SAMPLES_PER_DIGIT = 100  # images per digit that demo and eval judge
BATCH_SIZE = 250  # the digits model's 16 px images: one batch of them is cheap


def per_digit_prompts(prompts_for, count: int, which) -> list[str]:
    """`count` prompts per digit, cycling through each digit's phrasings; digit-major order."""
    return [prompts_for(d)[i % len(prompts_for(d))] for d in which for i in range(count)]


def evaluation_samples(digit: int | list[int], per_digit: int, seed: int) -> tuple[list[str], list[int]]:
    """The demo's evaluation prompts and seeds, in the order summarize() reads them: `per_digit`
    per digit on training phrasings (digit-major, seeds (seed, i)), then `per_digit` of each
    forgotten digit on held-out phrasings (seeds (seed + 1, i), i counting on across the forgotten
    digits). `amnesia-sd eval` samples the same list."""
    forgotten = [digit] if isinstance(digit, int) else list(digit)
    prompts = per_digit_prompts(digits.train_prompts, per_digit, range(10))
    heldout = per_digit_prompts(digits.heldout_prompts, per_digit, forgotten)
    seeds = [image_seed(seed, i) for i in range(len(prompts))] + [image_seed(seed + 1, i) for i in range(len(heldout))]
    return prompts + heldout, seeds


def summarize(probs: torch.Tensor, heldout: torch.Tensor, digit: int | list[int], per_digit: int) -> dict:
    """The demo's numbers. For several forgotten digits, p_forgotten, p_forgotten_heldout and
    entropy_forgotten are means over them, `per_digit` holds each one's, and acc_retained is over
    the digits not forgotten."""
    forgotten = [digit] if isinstance(digit, int) else list(digit)
    by_digit = probs.view(10, per_digit, 10)
    heldout = heldout.view(len(forgotten), per_digit, 10)
    each = {str(d): {"p_forgotten": by_digit[d][:, d].mean().item(),
                "p_forgotten_heldout": heldout[k][:, d].mean().item(),
                "entropy_forgotten": digits.prediction_entropy(by_digit[d]).mean().item()}
            for k, d in enumerate(forgotten)}
    others = [d for d in range(10) if d not in forgotten]
    correct = torch.stack([by_digit[d].argmax(-1) == d for d in others])
    result = {key: sum(e[key] for e in each.values()) / len(each)
              for key in ("p_forgotten", "entropy_forgotten", "p_forgotten_heldout")}
    result["acc_retained"] = correct.float().mean().item()
    if len(forgotten) > 1:
        result["per_digit"] = each
    return result
