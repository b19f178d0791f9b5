"""Prompt files: the bundled replay and template lists, and the user's own."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from amnesia_sd.core.errors import UserError


def bundled(name: str) -> Path:
    """Path of a file under the repository's prompts/ folder (installed as amnesia_sd.prompt_lists)."""
    return Path(str(resources.files("amnesia_sd.prompt_lists").joinpath(name)))


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"prompts file {path} is a folder: pass a text file with one prompt per line")
    if not path.is_file():
        raise UserError(f"prompts file {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"prompts file {path} cannot be read as UTF-8 text: {exc}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"prompts file {path} is empty: put one prompt per line")
    return prompts


NEIGHBOR_LISTS = ("celebrities", "artists", "objects", "nudity")  # prompts/neighbors/NAME.txt


def neighbor_names(value: str, concepts: list[str], flag: str) -> list[str]:
    """The neighbours `value` names: a bundled list's name (NEIGHBOR_LISTS), or names separated by
    commas. A bundled list leaves out the concepts themselves; a name that is one of them is refused:
    a concept cannot be forgotten and kept at once."""
    text = value.strip()
    if text in NEIGHBOR_LISTS:
        forgotten = {c.strip().lower() for c in concepts}
        return [n for n in read_prompts(bundled(f"neighbors/{text}.txt")) if n.lower() not in forgotten]
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UserError(f"{flag} is empty: give names separated by commas (\"Tom Cruise, Leonardo DiCaprio\") or "
                        f"one of the bundled lists: {', '.join(NEIGHBOR_LISTS)}")
    clash = [n for n in names if n.lower() in {c.strip().lower() for c in concepts}]
    if clash:
        raise UserError(f"{flag} names {clash[0]!r}, which is the concept being forgotten: a neighbour is "
                        "something else to keep; drop it from the list")
    return names


def read_templates(path: str | Path, flag: str, fills: str) -> list[str]:
    """A file of templates, each line with exactly one {} where `fills` goes; errors name `flag`."""
    try:
        templates = read_prompts(path)
    except UserError as exc:
        raise UserError(f"{flag}: {exc}") from None
    wrong = [t for t in templates if t.count("{}") != 1]
    if wrong:
        raise UserError(f"{flag}: every line needs exactly one {{}} where {fills} goes, not {wrong[0]!r}")
    return templates


def replay_prompts(path: str | Path | None = None) -> list[str]:
    return read_prompts(path if path else bundled("replay.txt"))


def concept_prompts(concepts: list[str], use_templates: bool) -> list[str]:
    """Every concept alternative through every template ('a photo of {}', ...), or bare."""
    if not use_templates:
        return list(concepts)
    templates = read_prompts(bundled("concept_templates.txt"))
    return [t.format(c) for c in concepts for t in templates]


def with_unconditional(prompts: list[str], share: float) -> list[str]:
    """The replay prompts, then round(share x their number) empty prompts: samples of the model's
    unconditional distribution, which classifier-free guidance steers from. Appended, so the
    Fisher's "first N images" of a set stay the conditional ones."""
    return list(prompts) + [""] * round(share * len(prompts))


def repeat_to(prompts: list[str], n: int | None) -> list[str]:
    """The first n prompts, cycling through the list when n is larger; None keeps them all."""
    if n is None:
        return list(prompts)
    return [prompts[i % len(prompts)] for i in range(n)]


def spread(prompts: list[str], n: int) -> list[str]:
    """n prompts evenly spread over the list (every template and every alternative get their
    turn), cycling when n is larger."""
    if n >= len(prompts):
        return repeat_to(prompts, n)
    return [prompts[i * len(prompts) // n] for i in range(n)]
