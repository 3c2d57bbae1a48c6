"""Atomic outputs: complete or absent, and as readable as the umask allows (results are shared)."""

import os
import stat

import pytest

from llmpar.io import atomic_path, write_json, write_text


@pytest.fixture
def umask():
    """Set a umask for one test and restore the process's afterwards."""
    old = os.umask(0o077)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_mode_of_the_umask(tmp_path, umask, mask, mode):
    """Under umask 022 a table, a figure or the report is readable by group and others (0644), as a file
    that open() creates would be; a stricter umask keeps it private."""
    umask(mask)
    write_text(tmp_path / "report.html", "<html></html>")
    write_json(tmp_path / "sub" / "summary.json", {"a": 1})
    with atomic_path(tmp_path / "figure.png") as tmp:
        tmp.write_bytes(b"png")
    for name in ("report.html", "sub/summary.json", "figure.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_a_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "metrics.csv") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
