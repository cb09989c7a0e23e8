"""The durable spool: unique file names and commits that cannot be made durable."""

from __future__ import annotations

from pathlib import Path

import pytest

from kp_gateway.pipeline import spool as spool_module
from kp_gateway.pipeline.spool import Spool, unique_name


def test_unique_names_do_not_repeat() -> None:
    names = {unique_name() for _ in range(10_000)}
    assert len(names) == 10_000


def test_commit_that_cannot_be_made_durable_leaves_nothing_to_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the folder's fsync fails, the renamed file goes: it was never acknowledged."""
    spool = Spool(tmp_path)
    spool.create()
    folder = spool.incoming / "source"
    folder.mkdir()
    src = spool.tmp / "x.part"
    src.write_bytes(b"bytes")

    def failing_fsync_dir(path: Path) -> None:  # fault injection: the disk fails the fsync
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module, "fsync_dir", failing_fsync_dir)
    with pytest.raises(OSError, match="Input/output"):
        spool.commit_file(src, folder)
    assert list(folder.iterdir()) == []
