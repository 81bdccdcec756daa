"""medsa._fs.atomic_write: the one atomic writer for user work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medsa._fs import atomic_write, atomic_write_text


def test_replaces_the_target_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    seen = []
    atomic_write(target, lambda tmp: (seen.append(tmp), Path(tmp).write_text("new")), suffix=".gz")
    assert target.read_text() == "new"
    assert seen[0].endswith(".tmp.gz") and Path(seen[0]).parent == tmp_path
    assert os.listdir(tmp_path) == ["out.json"]


@pytest.mark.parametrize("fsync", [False, True])
def test_a_failed_write_keeps_the_old_file(tmp_path: Path, fsync: bool) -> None:
    target = atomic_write_text(tmp_path / "a.txt", "good")

    def half(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half, fsync=fsync)
    assert target.read_text() == "good" and os.listdir(tmp_path) == ["a.txt"]


def test_os_errors_name_the_target_not_the_temporary_file(tmp_path: Path) -> None:
    def full(tmp: str) -> None:
        raise OSError(28, "No space left on device", tmp)

    with pytest.raises(OSError, match="No space left") as info:
        atomic_write(tmp_path / "b.csv", full)
    assert info.value.filename == str(tmp_path / "b.csv") and info.value.errno == 28
    with pytest.raises(FileNotFoundError) as missing:
        atomic_write_text(tmp_path / "no" / "c.txt", "x")
    assert missing.value.filename == str(tmp_path / "no" / "c.txt")
    assert os.listdir(tmp_path) == []
