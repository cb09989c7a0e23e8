"""Entry points that run in the process pool, away from the receiving interpreter.

One busy Python thread beside pynetdicom's receive loop cuts its rate several-fold (the GIL),
so header parsing and metadata extraction run here. Functions are module-level so they pickle.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from kp_gateway.dicomutil import read_instance
from kp_gateway.errors import GatewayError
from kp_gateway.model import InstanceRecord

logger = logging.getLogger(__name__)

_DOCUMENTED_MAX = 20_000


class _LruKeys(collections.OrderedDict[tuple[str, str, str], None]):
    """A bounded set of recently documented series keys (insertion order = age)."""

    def __setitem__(self, key: tuple[str, str, str], value: None) -> None:
        super().__setitem__(key, value)
        if len(self) > _DOCUMENTED_MAX:
            self.popitem(last=False)


_documented = _LruKeys()


def inspect_instance(
    path: str, project: str, dataset: str, site_timezone: str, arrived_at: float
) -> InstanceRecord:
    """Read one spooled instance's header, with the series document on first sight.

    Runs in a worker process.
    """
    return read_instance(
        path,
        project=project,
        dataset=dataset,
        documented_series=_documented,
        site_timezone=site_timezone,
        arrived_at=arrived_at,
    )


def inspect_instances(
    jobs: list[tuple[str, str, str, str, float]],
) -> list[InstanceRecord | GatewayError]:
    """:func:`inspect_instance` for a batch: one inter-process round trip for many files.

    Runs in a worker process. A file that fails gives its error in its place; the others
    are unaffected.
    """
    results: list[InstanceRecord | GatewayError] = []
    for job in jobs:
        try:
            results.append(inspect_instance(*job))
        except GatewayError as exc:
            results.append(exc)
    return results


def forget_documented_series() -> int:
    """Clear this process's document cache (tests); returns the process id."""
    _documented.clear()
    return os.getpid()


def _set_nice(increment: int) -> None:
    """Pool initializer; runs in each new worker process."""
    with contextlib.suppress(OSError):
        os.nice(increment)


def make_process_pool(workers: int, *, nice: int = 0) -> ProcessPoolExecutor:
    """A bounded pool of spawned worker processes. Blocking; call at start-up.

    spawn, not fork or forkserver: workers never inherit the SCP's threads or locks, and no
    socket is needed in tempfile's directory (which the SCP points at its spool). `nice` > 0
    lowers the workers' priority (background rendering must not slow the receive path).
    """
    context = multiprocessing.get_context("spawn")
    if nice:
        return ProcessPoolExecutor(workers, context, initializer=_set_nice, initargs=(nice,))
    return ProcessPoolExecutor(workers, context)
