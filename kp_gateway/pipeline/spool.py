"""The durable spool: where an instance lives from acknowledgement until it is indexed.

Layout under ``<data dir>/spool``::

    tmp/                         *.part files being written, scratch folders
    receiving/                   empty files made ahead for pynetdicom's chunked receive,
                                 and the datasets being received into them
    incoming/<source id>/        one folder per association or upload
        routing.json             project, dataset, AE titles (written once, fsynced)
        <name>.dcm               acknowledged instances, fsynced file and folder

An instance is acknowledged (C-STORE 0x0000, upload accepted) only once its file and folder are
fsynced here; it is deleted only after the index committed it. Anything found here at start-up
is therefore acknowledged work that was not finished, and is finished without re-sending.

The files being received in ``receiving/`` belong to :mod:`kp_gateway.dicom.receive_files`.
Functions are blocking; association threads call them directly, the loop via to_thread.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

from kp_gateway.datadir import DataDir
from kp_gateway.durable import fsync_dir, fsync_file, write_atomic
from kp_gateway.model import Routing

logger = logging.getLogger(__name__)

ROUTING_FILE = "routing.json"

# Spool file names: random per process, then a counter. uuid4() per file would be a getrandom
# system call on the receive path (and another release of the GIL there).
_NAME_PREFIX = uuid.uuid4().hex[:16]
_name_counter = itertools.count()


def unique_name() -> str:
    """A file name unique across processes and restarts. Thread-safe (itertools.count)."""
    return f"{_NAME_PREFIX}{next(_name_counter):012x}"


class Spool:
    """The spool folders of one data directory."""

    def __init__(self, data_dir: Path, *, fsync: bool = True) -> None:
        layout = DataDir.at(data_dir)
        self.root = layout.spool
        self.tmp = layout.scratch
        self.receiving = self.root / "receiving"
        self.incoming = self.root / "incoming"
        self.quarantine = layout.quarantine
        self.fsync = fsync

    def create(self) -> None:
        """Create the folders. Blocking."""
        for path in (self.tmp, self.receiving, self.incoming, self.quarantine):
            path.mkdir(parents=True, exist_ok=True)
        # Leftover partial files and scratch folders were never acknowledged: drop them.
        for leftover in (*self.tmp.iterdir(), *self.receiving.iterdir()):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    def open_source(self, routing: Routing) -> Path:
        """Create the folder of one source with its routing record, durably. Blocking."""
        folder = self.incoming / routing.source_id
        folder.mkdir(exist_ok=True)
        write_atomic(folder / ROUTING_FILE, asdict(routing), fsync=self.fsync)
        if self.fsync:
            fsync_dir(self.incoming)  # the new folder's own entry
        return folder

    def commit_file(self, src: Path | str, folder: Path, *, already_synced: bool = False) -> Path:
        """fsync `src` and move it into `folder` under a fresh name, durably. Blocking.

        `src` must be on the spool's filesystem (``tmp/``), so the move is an atomic rename.
        """
        if self.fsync and not already_synced:
            fsync_file(src)
        dst = folder / f"{unique_name()}.dcm"
        os.rename(src, dst)
        if self.fsync:
            try:
                fsync_dir(folder)
            except OSError:
                # Not durable, so not acknowledged: it must not be recovered at the next start.
                with contextlib.suppress(OSError):
                    os.unlink(dst)
                raise
        return dst

    def write_file(self, data: bytes | memoryview, folder: Path) -> Path:
        """Write `data` as a new spooled instance, durably. Blocking."""
        tmp = self.tmp / f"{unique_name()}.part"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        return self.commit_file(tmp, folder, already_synced=True)

    def discard(self, path: Path) -> None:
        """Delete a spool file that was not acknowledged or is finished. Blocking."""
        path.unlink(missing_ok=True)

    def remove_source_if_empty(self, source_id: str) -> None:
        """Remove a finished source's folder when it holds nothing but its routing. Blocking."""
        folder = self.incoming / source_id
        try:
            if any(p.suffix == ".dcm" for p in folder.iterdir()):
                return
            shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:
            return

    def pending(self) -> list[tuple[Routing, list[Path]]]:
        """Acknowledged instances left by a previous run, per source. Blocking."""
        found: list[tuple[Routing, list[Path]]] = []
        if not self.incoming.is_dir():
            return found
        for folder in sorted(self.incoming.iterdir()):
            if not folder.is_dir():
                continue
            files = sorted(folder.glob("*.dcm"), key=lambda p: p.stat().st_mtime)
            try:
                with open(folder / ROUTING_FILE, encoding="utf-8") as fh:
                    routing = Routing(**json.load(fh))
            except (OSError, ValueError, TypeError):
                if files:
                    # Cannot happen by construction (routing is fsynced before the first ack);
                    # keep the files for a human rather than guess where they belong.
                    target = self.quarantine / "routing" / folder.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    logger.error(
                        "spool folder %s has no readable routing; moved to %s", folder, target
                    )
                    os.replace(folder, target)
                else:
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            if files:
                found.append((routing, files))
            else:
                shutil.rmtree(folder, ignore_errors=True)
        return found

    def quarantine_file(self, stage: str, path: Path) -> Path | None:
        """Move a spool file that kept failing to ``quarantine/<stage>/``. Blocking."""
        target_dir = self.quarantine / stage
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / path.name
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        # Keep the routing beside it so a human can re-import it to the right place.
        routing = path.parent / ROUTING_FILE
        if routing.exists():
            shutil.copyfile(routing, target.with_suffix(".routing.json"))
        return target
