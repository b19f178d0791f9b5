"""Atomic writes: the result appears whole or not at all, readable like any new file."""

import os
import stat

import pytest

from amnesia_sd.core.io import atomic_path, write_json


def test_written_files_get_ordinary_permissions(tmp_path):
    write_json(tmp_path / "report.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
