"""The files received datasets are written into: :class:`SpoolFile`, the reserve of files
created ahead of need (:class:`PrecreatedFiles`) and :func:`discard_received_file`.

They live in the spool's ``receiving/`` folder until the receive path commits them into the
spool (:meth:`~kp_gateway.pipeline.spool.Spool.commit_file`). A DUL thread writes a file, then
the association thread commits it; the reserve is filled by a thread of its own.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kp_gateway.pipeline.spool import unique_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReceiveBudget:
    """What one received dataset may take of the disk, enforced while it arrives.

    ``max_dataset_bytes`` (0 = no limit) bounds one dataset; ``min_free_bytes`` is the reserve
    the data filesystem keeps. Checked at each flush of a :class:`SpoolFile`, so one
    association sending an endless dataset cannot fill the disk.
    """

    max_dataset_bytes: int = 0
    min_free_bytes: int = 0


class DatasetTooLargeError(OSError):
    """The dataset being received passed ``dicom.max_dataset_bytes``."""


class SpoolFile:
    """An open, empty spool file: what pynetdicom's chunked receive writes a dataset into.

    Has the parts of ``tempfile.NamedTemporaryFile`` pynetdicom uses (``name``, ``write``,
    ``file.flush()``, ``close``) without a buffered file object: pynetdicom flushes after every
    PDV, so writes are gathered until that flush and go to the descriptor in one ``writev``,
    and creating one costs a single ``open``. Every system call here releases the receiving
    interpreter's GIL, which the association threads then compete for again.

    It also keeps the first :attr:`HEAD_BYTES` written, so the receive path can check how the
    dataset starts without reading the file back, and counts the bytes written. A failed write
    (a full disk) is kept in :attr:`error` rather than raised on the DUL thread, where it would
    end the association without an answer; the rest of the data set is then counted, not
    written, and the receive path answers 0xA700. Its :class:`ReceiveBudget` is checked at
    each flush: past the dataset cap, or with the disk below its reserve, the file is emptied
    and the error kept the same way (the fast path aborts the association on the cap).
    Used by one thread at a time (the DUL thread writes, then the association thread commits).
    """

    HEAD_BYTES = 1024
    # Gathered writes are flushed earlier than asked when they reach either bound.
    _MAX_PENDING_BYTES = 1 << 20
    _MAX_PENDING_BUFFERS = 64

    __slots__ = ("_pending", "_pending_bytes", "budget", "error", "fd", "head", "name", "size")

    def __init__(self, name: str, fd: int, budget: ReceiveBudget | None = None) -> None:
        self.name = name
        self.fd = fd
        self.size = 0
        self.head = b""
        self.error: OSError | None = None
        self.budget = budget or _NO_BUDGET
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    @property
    def file(self) -> SpoolFile:
        """pynetdicom flushes ``file``; here that is this object."""
        return self

    @property
    def closed(self) -> bool:
        return self.fd < 0

    @classmethod
    def failed(cls, name: str, error: OSError) -> SpoolFile:
        """A spool file that could not even be created: it counts what is written, keeps
        nothing and reports `error` like a failed write."""
        spool_file = cls(name, -1)
        spool_file.error = error
        return spool_file

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue `data` for the next flush. Raises ValueError when closed."""
        if self.error is not None:
            self.size += len(data)
            return len(data)
        if self.fd < 0:
            raise ValueError(f"write to closed spool file {self.name}")
        chunk = data if type(data) is bytes else bytes(data)
        if len(self.head) < self.HEAD_BYTES:
            self.head += chunk[: self.HEAD_BYTES - len(self.head)]
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        self.size += len(chunk)
        if (
            self._pending_bytes >= self._MAX_PENDING_BYTES
            or len(self._pending) >= self._MAX_PENDING_BUFFERS
        ):
            self.flush()
        return len(chunk)

    def flush(self) -> None:
        """Write what was queued to the descriptor; a failure goes to :attr:`error`."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        total, self._pending_bytes = self._pending_bytes, 0
        if self.error is not None:
            return  # the file is lost already; only the size is still counted
        over_budget = self._over_budget(total)
        if over_budget is not None:
            self.error = over_budget
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # give the disk back at once, not at the answer
            return
        try:
            written = os.writev(self.fd, pending)
            if written < total:  # a short write (a signal, a full disk): finish it or fail
                rest = memoryview(b"".join(pending))[written:]
                while rest:
                    rest = rest[os.write(self.fd, rest) :]
        except OSError as exc:
            self.error = exc

    def _over_budget(self, incoming: int) -> OSError | None:
        """Why `incoming` more bytes may not be written, or None. One fstatvfs."""
        limit = self.budget.max_dataset_bytes
        if limit and self.size > limit:
            return DatasetTooLargeError(
                errno.EFBIG,
                f"the dataset passed dicom.max_dataset_bytes ({limit}) at {self.size} bytes",
            )
        reserve = self.budget.min_free_bytes
        if reserve:
            stat = os.fstatvfs(self.fd)
            free = stat.f_bavail * stat.f_frsize
            if free - incoming < reserve:
                return OSError(
                    errno.ENOSPC,
                    f"the spool filesystem is below dicom.min_free_bytes ({reserve}) "
                    f"with {free} bytes free",
                )
        return None

    @property
    def too_large(self) -> bool:
        """Whether receiving stopped at the dataset cap (the peer is told by an abort)."""
        return isinstance(self.error, DatasetTooLargeError)

    def sync(self, *, durable: bool = True) -> None:
        """Flush, and fsync the file's data and size when `durable`. Blocking; raises OSError,
        also the one kept from an earlier write."""
        self.flush()
        if self.error is not None:
            raise self.error
        if durable:
            os.fsync(self.fd)

    def __del__(self) -> None:
        # Still open when dropped: a received data set that was never served (the association
        # ended between receiving and handling it). Give back the descriptor and the file.
        if self.fd >= 0:
            discard_received_file(self)

    def close(self) -> None:
        """Flush and close; closing twice is allowed (pynetdicom closes after our handler)."""
        if self.fd < 0:
            return
        try:
            self.flush()
        finally:
            fd, self.fd = self.fd, -1
            os.close(fd)


def discard_received_file(received: Any) -> None:
    """Close and delete a file a data set was (being) received into: a :class:`SpoolFile` or
    pynetdicom's own temporary file. Never raises."""
    with contextlib.suppress(OSError, ValueError):
        received.close()
    with contextlib.suppress(OSError):
        os.unlink(received.name)


_NO_BUDGET = ReceiveBudget()


def _create_spool_file(directory: Path, budget: ReceiveBudget) -> SpoolFile:
    path = str(directory / f"{unique_name()}.part")
    # Read and write: the receive path may read the head back (see part10.received_dataset_head).
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return SpoolFile(path, os.open(path, flags, 0o600), budget)


class PrecreatedFiles:
    """Empty spool files created ahead of need, so receiving a dataset never waits to create one.

    Creating a file measured 0.5 to 1 ms on our data filesystem (ext4 without a journal scans
    the inodes deleted in the last 30 s for each new one), about a quarter of the time one
    small C-STORE takes on one association. A thread keeps up to `depth` files ready;
    :meth:`take` hands one out without a system call and creates one in place only when the
    reserve is empty. A crash leaves them, like the files being written at that moment, to
    :meth:`~kp_gateway.pipeline.spool.Spool.create`, which deletes them at the next start.

    :meth:`start` and :meth:`stop` run on any thread (stop joins the filling thread);
    :meth:`take` runs on the thread that receives a dataset.
    """

    def __init__(self, directory: Path, depth: int, budget: ReceiveBudget | None = None) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.directory = directory
        self.budget = budget or _NO_BUDGET
        self._ready: queue.Queue[SpoolFile] = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.created_in_place = 0  # times take() found the reserve empty

    def start(self) -> None:
        """Start filling the reserve. Blocking only to start a thread."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._fill, name="spool-precreate", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while not self._stopping.is_set():
            try:
                spool_file = _create_spool_file(self.directory, self.budget)
            except OSError:
                # Disk trouble shows on the receive path itself (created in place); retry calmly.
                logger.exception("could not pre-create a spool file in %s", self.directory)
                self._stopping.wait(1.0)
                continue
            while True:
                try:
                    self._ready.put(spool_file, timeout=0.5)
                    break
                except queue.Full:
                    if self._stopping.is_set():
                        discard_received_file(spool_file)
                        return

    @property
    def available(self) -> int:
        """Files ready to be taken (the filling thread may hold one more, waiting for room)."""
        return self._ready.qsize()

    def take(self) -> SpoolFile:
        """An open, empty file in the reserve's directory, the caller's to write, close, move.

        Runs on any thread. Never raises: a file that cannot be created comes back with its
        :attr:`SpoolFile.error` set.
        """
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            self.created_in_place += 1
        try:
            return _create_spool_file(self.directory, self.budget)
        except OSError as exc:
            # Raising here would end the receiving thread; the receive path answers 0xA700.
            logger.error("could not create a spool file in %s: %s", self.directory, exc)
            return SpoolFile.failed(str(self.directory / f"{unique_name()}.part"), exc)

    def stop(self) -> None:
        """Stop the filling thread and delete the files nobody took. Blocking."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while True:
            try:
                discard_received_file(self._ready.get_nowait())
            except queue.Empty:
                return


__all__ = [
    "DatasetTooLargeError",
    "PrecreatedFiles",
    "ReceiveBudget",
    "SpoolFile",
    "discard_received_file",
]
