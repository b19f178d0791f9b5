"""The documentation holds together: README.md and docs/*.md link only to files and headings that
exist, every command and flag of the CLI is documented in docs/, the README stays short, and
mkdocs.yml's nav lists every page. No model is loaded; this runs in about a second."""

import html
import json
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_MAX_LINES = 260
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str):
    """(line number, line) for every line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                continue
            yield number, line
        elif match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                and not line.strip()[len(match.group(1)):].strip():
            fence = None


def heading_text(raw: str) -> str:
    """A heading's text as rendered: code spans keep their content, links their text, emphasis goes."""

    def plain(part: str) -> str:
        part = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", part)
        return re.sub(r"[*]|(?<!\w)_+|_+(?!\w)", "", part)

    parts, last = [], 0
    for match in CODE_SPAN.finditer(raw):
        parts += [plain(raw[last:match.start()]), match.group(2)]
        last = match.end()
    return "".join([*parts, plain(raw[last:])])


def github_slug(text: str) -> str:
    """GitHub's heading anchor (github-slugger): lowercase, drop punctuation but hyphens, underscores
    and spaces, each space becomes a hyphen (runs are not collapsed)."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def mkdocs_slug(text: str) -> str:
    """Python-Markdown's toc slugify, which mkdocs uses: ASCII only, runs of spaces and hyphens collapse."""
    text = unicodedata.normalize("NFKD", html.unescape(text)).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> dict[str, str]:
    """Every anchor GitHub gives the page's headings (duplicates get -1, -2, ...), with its heading text."""
    found, counts = {}, {}
    for _, line in prose_lines(page.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        text = heading_text(match.group(2))
        slug = github_slug(text)
        if slug in counts:
            counts[slug] += 1
            unique = f"{slug}-{counts[slug]}"
        else:
            counts[slug] = 0
            unique = slug
        found[unique] = text
    return found


def links(page: Path):
    """(line number, target) of every inline link, image and reference definition outside code."""
    for number, line in prose_lines(page.read_text()):
        definition = REFERENCE_DEF.match(line)
        if definition:
            yield number, definition.group(1)
            continue
        for match in INLINE_LINK.finditer(CODE_SPAN.sub("", line)):
            yield number, match.group(1)


def test_the_link_checker_reads_markdown_as_github_does(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Can it come back? (`amnesia-sd attack`)\n## Use it in A1111 / ComfyUI\n## Notes\n## Notes\n"
                    "## `forget --adversarial` and **more**\n```md\n# not a heading\n[x](missing.md)\n```\n"
                    "See [a](#notes-1), `[code](nowhere.md)`, ![img](pic.png) and [b](https://example.com).\n")
    assert list(anchors(page)) == ["can-it-come-back-amnesia-sd-attack", "use-it-in-a1111--comfyui", "notes",
                                   "notes-1", "forget---adversarial-and-more"]
    assert list(links(page)) == [(10, "#notes-1"), (10, "pic.png"), (10, "https://example.com")]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for number, target in links(page):
        if not target or SCHEME.match(target):  # http(s), mailto and other absolute addresses
            continue
        path, _, anchor = target.partition("#")
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        file = (page.parent / unquote(path)).resolve() if path else page
        if not file.exists():
            broken.append(f"{where}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
            continue
        if not anchor:
            continue
        if file.suffix != ".md":
            broken.append(f"{where}: an anchor into a file that is not Markdown")
            continue
        headings = anchors(file)
        if anchor not in headings:
            broken.append(f"{where}: no heading of {file.name} has this anchor (it has: {', '.join(headings)})")
        elif mkdocs_slug(headings[anchor]) != anchor:
            # The anchor works on GitHub but not on the mkdocs site: word the heading so both agree.
            broken.append(f"{where}: mkdocs makes #{mkdocs_slug(headings[anchor])} of this heading")
    assert not broken, "broken links:\n" + "\n".join(broken)


def cli_commands_and_options():
    """(`amnesia-sd <command>`, [long option names]) for every command and group of the CLI."""
    import typer

    from amnesia_sd.cli import app

    found = []

    def walk(command, path):
        options = [name for param in command.params
                   if getattr(param, "param_type_name", None) == "option" and not getattr(param, "hidden", False)
                   for name in (*param.opts, *param.secondary_opts) if name.startswith("--") and name != "--help"]
        if path:
            found.append((" ".join(["amnesia-sd", *path]), options))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            if not getattr(sub, "hidden", False):
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


def test_every_command_and_flag_is_in_the_docs():
    text = "\n".join(page.read_text() for page in sorted(DOCS.rglob("*.md")))
    found = cli_commands_and_options()
    assert any(command == "amnesia-sd forget" and "--concept" in options for command, options in found), found
    missing = []
    for command, options in found:
        if not re.search(rf"(?<![\w-]){re.escape(command)}(?![\w-])", text):
            missing.append(command)
        missing += [f"{command} {option}" for option in options
                    if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text)]
    assert not missing, "not in docs/*.md (add them to docs/commands.md):\n" + "\n".join(missing)


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def nav_pages(entry):
    if isinstance(entry, str):
        yield entry
    elif isinstance(entry, list):
        for item in entry:
            yield from nav_pages(item)
    elif isinstance(entry, dict):
        for value in entry.values():
            yield from nav_pages(value)


def test_mkdocs_nav_lists_every_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["site_name"] and config["docs_dir"] == "docs"
    assert config["theme"]["name"] in ("mkdocs", "readthedocs")  # built-in themes: no download
    nav = [page for page in nav_pages(config["nav"]) if not SCHEME.match(page)]
    assert len(nav) == len(set(nav)), nav
    pages = {str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md")}
    assert not pages - set(nav), f"pages not in mkdocs.yml's nav: {sorted(pages - set(nav))}"
    assert set(nav) <= pages, f"nav entries with no page in docs/: {sorted(set(nav) - pages)}"


def test_the_python_api_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/python-api.md's code, run as it is on the built-in digits model, does what it says."""
    code = "\n".join(re.findall(r"```python\n(.*?)```", (DOCS / "python-api.md").read_text(), re.S))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AMNESIA_SD_CACHE", str(tmp_path / "cache"))
    exec(compile(code, "docs/python-api.md", "exec"), {})
    record = json.loads((tmp_path / "three-forgotten" / "amnesia.json").read_text())
    assert record["concepts"] == ["the number 3"] and record["steps"] == 10
    assert json.loads((tmp_path / "three-report" / "report.json").read_text())["summary"]
    assert sorted(p.name for p in (tmp_path / "three-samples").glob("*.png"))
    assert "already holds a finished forgotten model" in capsys.readouterr().out
