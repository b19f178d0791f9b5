"""What `amnesia-sd eval --neighbors` measures: how much of each neighbour of the forgotten concept
(another celebrity, painter, object, digit) a forgotten model keeps, against its base on the same
seeds. HUB (ICCV 2025) found that Selective Amnesia over-erases: forgetting one celebrity also
wipes similar ones. The pinpoint score says how much is kept: of the seeds on which the base's image
shows a neighbour, the share on which the forgotten model's image shows it too (the judge's
agreement), averaged over the neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence

from amnesia_sd.core.errors import UserError
from amnesia_sd.data.detectors import Sample, mean, named_digits
from amnesia_sd.data.generate import image_seed
from amnesia_sd.data.prompts import spread

SD_IMAGES_PER_NEIGHBOR = 8
ROLES = ("base", "forgotten")


def neighbor_samples(name: str, phrasings: list[str], count: int, seed: int, guidance: float) -> list[Sample]:
    """The neighbour through the held-out phrasings, on a seed stream of its own: neighbour images
    never start from the noise of another set's, and image i of every neighbour from the same."""
    return [Sample(p, image_seed(seed, i, "neighbor"), guidance)
            for i, p in enumerate(spread([t.format(name) for t in phrasings], count))]


def neighbor_digits(names: list[str], forgotten: list[int]) -> list[int]:
    """The digit each neighbour name names ("8", "eight", "the number 8"), on the digits model."""
    found: dict[int, str] = {}
    for name in names:
        named = named_digits([name])
        if len(named) != 1:
            raise UserError(f"--neighbors names {name!r}, which is {'no digit' if not named else 'several digits'}: "
                            "the digits model's neighbours are digits, e.g. --neighbors '1, 7, eight'")
        digit = named.pop()
        if digit in forgotten:
            raise UserError(f"--neighbors names {name!r}, the digit {digit} being forgotten: a neighbour is something "
                            "else to keep; drop it from the list")
        if digit in found:
            raise UserError(f"--neighbors names the digit {digit} twice ({found[digit]!r} and {name!r}): name it once")
        found[digit] = name
    return list(found)


def kept(base: Sequence[bool], forgotten: Sequence[bool]) -> float | None:
    """Of the seeds on which the base shows the neighbour, the share on which the forgotten model
    does too; None where the base never shows it (nothing there to keep)."""
    pairs = [f for b, f in zip(base, forgotten) if b]
    return mean(pairs) if pairs else None


def summarize_neighbor(images: list[dict]) -> dict:
    """One neighbour's numbers from its image pairs: each pair holds per role the image and, where a
    judge ran, its verdict ("neighbor": {"shows", "p"}), and the pair's similarity per measure."""
    judged = all("neighbor" in image[role] for image in images for role in ROLES)
    shows = {role: [image[role]["neighbor"]["shows"] for image in images] for role in ROLES} if judged else None
    return {
        "base_rate": mean(shows["base"]) if shows else None,
        "forgotten_rate": mean(shows["forgotten"]) if shows else None,
        "kept": kept(shows["base"], shows["forgotten"]) if shows else None,
        "similarity": {m: mean([image["similarity"][m] for image in images]) for m in images[0]["similarity"]},
        "images": images,
    }


def pinpoint(per_neighbor: dict[str, dict]) -> float | None:
    """The mean share kept over the neighbours the base shows at all; None without a judge."""
    values = [entry["kept"] for entry in per_neighbor.values() if entry["kept"] is not None]
    return mean(values) if values else None
