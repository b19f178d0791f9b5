"""The one guard every command calls before any work: a user's files are never written or deleted.

- An output may not equal, contain or lie inside any input of the same command, nor the reverse.
- An output that exists must be a finished result of the same kind that amnesia-sd made (its
  marker file carries our stamp), and it is replaced only with --overwrite.
- Every result is built in a sibling work folder `OUT.partial` (ours by its own marker) and
  swapped into place when complete, so a failed or interrupted run leaves the old result intact
  and nothing half-written ever looks finished.
- A file where a folder is expected (or the reverse), or a location that cannot be written, is
  refused before the long work starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from amnesia_sd.core.cost import say
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.io import write_json
from amnesia_sd.core.version import __version__

TOOL = "amnesia-sd"
PARTIAL_MARKER = ".amnesia-sd-partial.json"  # in every work folder we make
LOCK = ".amnesia-sd-lock.json"  # in a work folder while a run uses it: which process, where, since when


def stamp() -> dict:
    """What every marker we write starts with, so that later runs can tell our results apart."""
    return {"tool": TOOL, "tool_version": __version__}


def _stamped(data) -> bool:
    # tool_version alone: results written before the "tool" key existed.
    return isinstance(data, dict) and (data.get("tool") == TOOL or "tool_version" in data)


def real(path: str | Path) -> Path:
    """The path with ~ expanded and every symlink followed (also for paths that do not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def partial_of(out: str | Path) -> Path:
    """The sibling work folder of a result: OUT.partial."""
    out = Path(out)
    if not out.name:  # "." or "" name the current folder
        out = real(out)
    if not out.name:
        raise UserError(f"{out} is the filesystem root and cannot hold a result: pick a new folder")
    return out.with_name(out.name + ".partial")


@dataclass(frozen=True)
class Output:
    """One thing a command writes. `marker`: the file inside a result folder that marks it finished
    and ours (None for a file result: its safetensors metadata carries the stamp, and `formats` the
    metadata formats this command writes: --overwrite replaces only a file of one of those)."""

    flag: str
    path: Path
    marker: str | None = None
    what: str = "result"
    formats: tuple[str, ...] = ()

    @property
    def is_dir(self) -> bool:
        return self.marker is not None


def is_ours(path: Path, marker: str | None, formats: tuple[str, ...] = ()) -> bool:
    """A finished result amnesia-sd made: a folder whose marker holds our stamp, or a safetensors
    file whose metadata does (and, with `formats`, names one of them as its format)."""
    if marker is None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception:  # not safetensors at all: not ours
            return False
        return _stamped(metadata) and (not formats or metadata.get("format") in formats)
    try:
        return _stamped(json.loads((path / marker).read_text()))
    except (OSError, ValueError):
        return False


def is_our_partial(path: Path) -> bool:
    return is_ours(path, PARTIAL_MARKER)


def _relation(output: Path, input_: Path) -> str | None:
    if output == input_:
        return "is"
    if output in input_.parents:
        return "contains"
    if input_ in output.parents:
        return "lies inside"
    return None


def check_overlap(outputs: list[Output], inputs: dict[str, str | Path | None]) -> None:
    """No output (or its work folder) may be, contain or lie inside an input."""
    given = {flag: real(p) for flag, p in inputs.items() if p}
    for output in outputs:
        candidates = [output.path] + ([partial_of(output.path)] if output.is_dir else [])
        for candidate in candidates:
            mine = real(candidate)
            for flag, theirs in given.items():
                relation = _relation(mine, theirs)
                if relation:
                    raise UserError(
                        f"{output.flag} {candidate} {relation} {flag} {theirs}: an output may not be, contain or "
                        f"lie inside an input (it could be overwritten or deleted); pick another {output.flag}"
                    )


def _probe_writable(path: Path, flag: str) -> None:
    """Create and remove a file in the nearest existing folder above `path`."""
    ancestor = real(path).parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path} cannot be made: {ancestor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".amnesia-sd-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{flag} {path} cannot be written ({exc.strerror or exc} in {ancestor}); "
                        "pick a location you can write to") from None


def check_output(output: Output, overwrite: bool) -> bool:
    """Refuse, before any work, an output that is not ours to write. Returns whether a finished
    result of ours is there (to be replaced, with `overwrite`, once the new one is complete)."""
    path, flag = Path(output.path), output.flag
    expect = "a folder" if output.is_dir else "a file"
    if path.exists() and path.is_dir() != output.is_dir:
        raise UserError(f"{flag} {path} exists and is {'a folder' if path.is_dir() else 'a file'}, but {flag} "
                        f"must be {expect}; pick another {flag}")
    finished = path.exists() and is_ours(path, output.marker, output.formats)
    if path.is_file() and not finished and is_ours(path, None):  # ours, but another command's result
        raise UserError(f"{flag} {path} is another kind of amnesia-sd file (not this command's {output.what}); "
                        f"--overwrite replaces only a result of the same kind: pick another {flag}")
    if finished and not overwrite:
        raise UserError(f"{path} already holds a finished {output.what}; pass --overwrite to replace it (the old "
                        f"one is kept until the new one is complete) or pick another {flag}")
    if path.exists() and not finished and (not output.is_dir or any(path.iterdir())):
        raise UserError(f"{flag} {path} exists and is not an amnesia-sd {output.what}; --overwrite only replaces "
                        f"amnesia-sd's own results: pick a new or empty {flag}")
    if output.is_dir:
        work = partial_of(path)
        if work.exists() and not (work.is_dir() and is_our_partial(work)):
            raise UserError(f"{work} exists and was not made by amnesia-sd (it would be the work folder of "
                            f"{flag} {path}); move it away or pick another {flag}")
        if work.is_dir():
            check_lock(work)
    _probe_writable(path, flag)
    return finished


def guard(outputs: list[Output], inputs: dict[str, str | Path | None], overwrite: bool) -> None:
    """Every command's check before any work: overlaps first, then each output."""
    check_overlap(outputs, inputs)
    for output in outputs:
        check_output(output, overwrite)


def _running(pid) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, TypeError, ValueError):
        return False


def check_lock(work: Path) -> None:
    """Refuse a work folder that another running process holds. The lock of a process that is gone
    (killed, crashed, or an earlier run in this same process) is removed, and a dead one's is named."""
    lock = work / LOCK
    try:
        held = json.loads(lock.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        held = {}
    held = held if isinstance(held, dict) else {}
    pid, host = held.get("pid"), held.get("host")
    if host == socket.gethostname() and (pid == os.getpid() or not _running(pid)):
        lock.unlink(missing_ok=True)
        if pid != os.getpid():
            say(f"{work}: its run (process {pid}) is no longer running; its lock was removed")
        return
    raise UserError(f"{work} is in use by another run ({held.get('command', 'amnesia-sd')}, process {pid} on "
                    f"{host}, since {held.get('since')}): wait for it to finish, or stop it; if it is gone, delete "
                    f"{lock}")


def take_lock(work: Path, command: str) -> None:
    """Mark `work` as this process's until publish() (or the folder's removal) releases it."""
    for _ in range(2):
        try:
            fd = os.open(work / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            check_lock(work)  # refuses a live holder; clears a dead one's, then try again
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        return
    raise UserError(f"{work} is being taken by another run at this moment: try again")


def open_work(out: Path, command: str, settings: dict, keep: bool) -> tuple[Path, bool]:
    """OUT.partial, the folder a result is built in. With `keep`, an interrupted run's folder made
    with the same settings is kept (to resume); one made with other settings is refused. Returns
    (folder, whether it was kept)."""
    work = partial_of(out)
    marker = work / PARTIAL_MARKER
    record = {**stamp(), "command": command, "settings": settings}
    if work.exists():
        if not is_our_partial(work):  # check_output refused it already; never delete what is not ours
            raise UserError(f"{work} exists and was not made by amnesia-sd; move it away")
        check_lock(work)
        before = json.loads(marker.read_text())
        if keep and before.get("command") == command:
            differences = diff_settings(before.get("settings", {}), settings)
            if differences:
                raise UserError(f"{work} holds an interrupted run made with other settings ({differences}); rerun "
                                "with the same settings to resume it, or pass --overwrite to start again")
            take_lock(work, command)
            return work, True
        shutil.rmtree(work)
    work.mkdir(parents=True)
    take_lock(work, command)

    write_json(marker, record)
    return work, False


@contextlib.contextmanager
def discard_on_failure(work: Path) -> Iterator[None]:
    """For results that are never resumed: a failed or interrupted run leaves no work folder."""
    try:
        yield
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def diff_settings(before: dict, now: dict) -> str:
    """'key: old -> new' for every setting that differs, or an empty string."""
    keys = sorted(set(before) | set(now))
    return "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k))


def publish(work: Path, out: Path, marker: str) -> None:
    """Put a complete result in place. The output is checked again now, at the swap, not only when
    the run began: what is there must still be nothing, or a finished result of ours (`marker`), else
    nothing is touched and the result stays in the work folder. An old result is moved aside first and
    deleted once the new one is in place, unless it holds files newer than its marker (written last
    when it was finished): those were added by someone since, so it is kept, and said where."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists() and not (out.is_dir() and is_ours(out, marker)):
        found = sorted(p.name for p in out.iterdir())[:3] if out.is_dir() else [out.name]
        raise UserError(f"{out} changed during the run and now holds {', '.join(found)}, which amnesia-sd did not "
                        f"write; nothing there was touched. The finished result is in {work}: move it where you "
                        "want it")
    (work / PARTIAL_MARKER).unlink(missing_ok=True)
    (work / LOCK).unlink(missing_ok=True)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(work, out)
    if old is None:
        return
    finished_at = (old / out.name / marker).stat().st_mtime
    added = sorted(str(p.relative_to(old / out.name)) for p in (old / out.name).rglob("*")
                   if p.is_file() and p.stat().st_mtime > finished_at)
    if added:
        say(f"the replaced result held files added after it was made ({', '.join(added[:3])}"
            f"{', ...' if len(added) > 3 else ''}): it is kept at {old / out.name}")
    else:
        shutil.rmtree(old)
