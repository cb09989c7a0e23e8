"""Wake pynetdicom's reactor threads when there is work instead of polling for it.

Each pynetdicom association runs two threads that poll: the DUL thread checks its socket and
its queue of primitives to send, then sleeps ``_run_loop_delay``; the association thread checks
for a complete DIMSE message, then sleeps 1 ms. A short sleep caps the rate of one association
(one C-STORE needs several hand-overs), a very short one burns the receiving interpreter's GIL
on empty checks. Here each sleep becomes a wait that ends as soon as something arrives:

- the DUL thread waits in ``poll`` on its socket plus a wake-up pipe, written when another
  thread queues a primitive for it (the C-STORE response);
- the association thread waits on an event set when the DIMSE provider completes a message or
  the DUL hands it an A-RELEASE / A-ABORT.

Every hand-over between the two threads wakes the other one (including the end of the DUL
thread and a request to stop it), so a waiter may sleep ``idle_s`` when nothing happens:
pynetdicom's timers (ARTIM, ACSE, DIMSE and network timeouts, all seconds) are then checked
that often, and an idle association costs next to no CPU. Threads without a waiter (pynetdicom
used as a client, say) sleep exactly as pynetdicom asks.

:func:`install` runs on the acceptor thread before the association starts; the waiters run on
the reactor threads they belong to.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pynetdicom.dul as pynetdicom_dul

logger = logging.getLogger(__name__)

DUL_WAITER = "_kp_dul_waiter"
ASSOCIATION_WAITER = "_kp_association_waiter"


class _WakingQueue(queue.Queue[Any]):
    """A queue.Queue that calls `wake` after each put (under the queue's own lock)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._wake()


class _WakePipe:
    """A non-blocking pipe whose read end `select` can wait on; closed exactly once."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            # A full pipe means a wake-up is pending already.
            with contextlib.suppress(BlockingIOError):
                os.write(self.write_fd, b"\0")

    def drain(self) -> None:
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):
                os.read(self.read_fd, 4096)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.read_fd)
            os.close(self.write_fd)


class DulWaiter:
    """Lets a DUL thread sleep until its socket is readable or a primitive is queued for it."""

    def __init__(self, dul: Any, idle_s: float, on_exit: Callable[[], None]) -> None:
        self._dul = dul
        self._idle_s = idle_s
        self._pipe = _WakePipe()
        dul.to_provider_queue = _WakingQueue(self._wake_from_other_thread)
        # The pipe goes with the thread; the finalizer covers a DUL that never ran.
        weakref.finalize(dul, self._pipe.close)
        kill_dul = dul.kill_dul

        def close_and_wake() -> None:
            self._pipe.close()
            on_exit()  # the association thread waits for this thread to end

        def kill_dul_and_wake() -> None:
            kill_dul()
            self._pipe.wake()

        add_exit_callback(dul, close_and_wake)
        dul.kill_dul = kill_dul_and_wake

    def _wake_from_other_thread(self) -> None:
        # The DUL queues its own primitives while awake; only other threads need to wake it.
        if threading.current_thread() is not self._dul:
            self._pipe.wake()

    def wait(self) -> None:
        """Sleep until there is something to do, at most ``idle_s``. Runs on the DUL thread."""
        dul = self._dul
        seconds = self._idle_s
        if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
            return
        wrapper = dul.socket
        sock = wrapper.socket if wrapper is not None else None
        if sock is None or sock.fileno() < 0:
            time.sleep(seconds)
            return
        # poll, not select: select() refuses descriptors >= 1024, which a gateway with many
        # open HTTP connections hands out to new associations.
        poller = select.poll()
        try:
            poller.register(sock, select.POLLIN)
            poller.register(self._pipe.read_fd, select.POLLIN)
            events = poller.poll(seconds * 1000)
        except (OSError, ValueError):
            return  # the socket closed under us; pynetdicom notices on its next check
        if any(fd == self._pipe.read_fd for fd, _ in events):
            self._pipe.drain()


class AssociationWaiter:
    """Lets an association thread sleep until a DIMSE message or an ACSE primitive arrives."""

    def __init__(self, assoc: Any, idle_s: float) -> None:
        self._assoc = assoc
        self._idle_s = idle_s
        self._event = threading.Event()
        assoc.dimse.msg_queue = _WakingQueue(self._event.set)
        assoc.dul.to_user_queue = _WakingQueue(self._event.set)

    def wake(self) -> None:
        """End the current or next wait. Runs on any thread."""
        self._event.set()

    def wait(self) -> None:
        """Sleep until there is something to do, at most ``idle_s``. Runs on the association
        thread."""
        assoc = self._assoc
        if not assoc.dimse.msg_queue.empty() or not assoc.dul.to_user_queue.empty():
            return
        # Cleared after the wait: a put between the check above and here still ends the wait,
        # and one between the wait and the clear is found by pynetdicom's own check next.
        self._event.wait(self._idle_s)
        self._event.clear()


class ExitingDUL(pynetdicom_dul.DULServiceProvider):
    """pynetdicom's DUL whose thread runs the callbacks given to :func:`add_exit_callback` as
    it ends, on that thread. Installed by re-classing (the thread's target, bound when the
    DUL was made, cannot be wrapped afterwards)."""

    _kp_exit_callbacks: tuple[Callable[[], None], ...] = ()

    def run(self) -> None:
        try:
            super().run()
        finally:
            for callback in self._kp_exit_callbacks:
                try:
                    callback()
                except Exception:
                    logger.exception("DUL exit callback failed")


def add_exit_callback(dul: Any, callback: Callable[[], None]) -> None:
    """Run `callback` on `dul`'s thread when it ends. Before the DUL starts; any thread."""
    if not isinstance(dul, ExitingDUL):
        dul.__class__ = ExitingDUL
    dul._kp_exit_callbacks = (*dul._kp_exit_callbacks, callback)


class ReactorClock:
    """Stands in for the ``time`` module inside pynetdicom.association or pynetdicom.dul."""

    def __init__(self, waiter_attribute: str) -> None:
        self._waiter_attribute = waiter_attribute

    def sleep(self, seconds: float) -> None:
        waiter = getattr(threading.current_thread(), self._waiter_attribute, None)
        if waiter is None:
            time.sleep(seconds)
        else:
            waiter.wait()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install(assoc: Any, idle_s: float) -> None:
    """Give a new, not yet started association and its DUL their waiters. Acceptor thread."""
    # The association and its DUL are the threads that call sleep, so the waiters hang there.
    association_waiter = AssociationWaiter(assoc, idle_s)
    setattr(assoc, ASSOCIATION_WAITER, association_waiter)
    setattr(assoc.dul, DUL_WAITER, DulWaiter(assoc.dul, idle_s, association_waiter.wake))


__all__ = [
    "ASSOCIATION_WAITER",
    "DUL_WAITER",
    "AssociationWaiter",
    "DulWaiter",
    "ExitingDUL",
    "ReactorClock",
    "add_exit_callback",
    "install",
]
