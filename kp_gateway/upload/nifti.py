"""The NIfTI importer of HTTP uploads: plan and convert in a worker process, emit case by case.

:class:`NiftiUploadImporter` is the :data:`kp_gateway.upload.importer.NiftiImporter` the app
installs. It runs on the event loop; planning (:func:`plan_tree`) and conversion
(:func:`convert_case_files`) run in its own one-process pool (nice 10), never in the receiving
interpreter (a converting thread would hold the GIL against pynetdicom's receive loop) and never
in the ingest pool (a long conversion there would delay the header parse of every received
instance queued behind it). Uploads convert one case at a time between them; a case's memory
is bounded by ``upload.nifti_max_volume_bytes`` and the checks of
:func:`kp_gateway.convert.nifti.convert_case`. A worker that dies (killed for memory) costs its
case a per-file error; the pool is replaced and the next case goes on.

For every case, in plan order:

1. the whole case is converted into a private folder under the job's ``tmp_dir`` (the spool's
   filesystem), images first, then the SEG (:func:`~kp_gateway.convert.nifti.convert_case`
   orders them);
2. only when the conversion succeeded are its files emitted, images before the SEG, so the
   pipeline never sees a half-converted case and the SEG thumbnail finds its images;
3. a case that fails becomes one per-file error naming the case's first image and the reason,
   and nothing of it is emitted.

UIDs are derived from a seed (by default the upload's project and dataset), the dataset folder
inside the tree and the case id, so importing the same tree into the same place again gives the
same UIDs: the instances are stored again under the same keys, never duplicated.

Worker functions are module-level so they pickle, and import the converter (highdicom, nibabel)
lazily: the receiving interpreter never loads it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kp_gateway.errors import ConversionError
from kp_gateway.model import Routing
from kp_gateway.pipeline.process_pool import make_process_pool

if TYPE_CHECKING:
    from kp_gateway.convert.nifti_layout import CasePlan, NiftiPlan
    from kp_gateway.upload.importer import NiftiJob

__all__ = [
    "CaseFiles",
    "NiftiUploadImporter",
    "convert_case_files",
    "default_uid_seed",
    "plan_tree",
]

logger = logging.getLogger(__name__)

# Per-job work folders under the spool's tmp/; anything with this prefix that no running job
# owns is a leftover of a stopped or crashed gateway.
_WORKSPACE_PREFIX = "nifti-"
# The "file" of an error that concerns the tree as a whole (planning failed).
TREE_ERROR_NAME = "(NIfTI tree)"
# Conversion runs beside receiving: below it in CPU priority, like the series stages.
_CONVERSION_NICE = 10
# Default of upload.nifti_max_volume_bytes (kp_gateway.convert.nifti.DEFAULT_MAX_VOLUME_BYTES;
# not imported from there, which would load nibabel and highdicom into the receiving process).
_DEFAULT_MAX_VOLUME_BYTES = 2 * 1024**3


@dataclass(frozen=True, slots=True)
class CaseFiles:
    """What the worker reports for one converted case (plain data: cheap to pickle)."""

    files: tuple[tuple[str, str], ...]  # (path, name for errors), images first, then the SEG
    series: tuple[tuple[str, str], ...]  # (kind, SeriesInstanceUID) in emission order
    warnings: tuple[str, ...]


def default_uid_seed(routing: Routing) -> str:
    """Pure. The UID seed of an upload: its project and dataset."""
    return f"upload/{routing.project}/{routing.dataset}"


def plan_tree(tree: Path) -> NiftiPlan:
    """Plan an extracted NIfTI tree. Runs in a worker process.

    Raises ConversionError (from :func:`~kp_gateway.convert.nifti_layout.plan_nifti_tree`)
    when the tree as a whole cannot be planned.
    """
    from kp_gateway.convert.nifti_layout import plan_nifti_tree

    return plan_nifti_tree(tree)


def convert_case_files(
    plan: NiftiPlan,
    case: CasePlan,
    out_dir: Path,
    seed: str,
    max_volume_bytes: int = _DEFAULT_MAX_VOLUME_BYTES,
) -> CaseFiles:
    """Convert one case into `out_dir`. Runs in a worker process.

    Raises ConversionError (prefixed with the case) when the case cannot be converted; the
    converter leaves nothing of the case in `out_dir` then.
    """
    from kp_gateway.convert.nifti import convert_case

    converted = convert_case(
        plan, case, out_dir, dataset_uid_seed=seed, max_volume_bytes=max_volume_bytes
    )
    files: list[tuple[str, str]] = []
    warnings: list[str] = []
    for series in converted:
        source = _relative(series.source, plan.root)
        what = "SEG" if series.kind == "seg" else "instance"
        for path in series.files:
            files.append((str(path), f"{source} ({what} {int(path.stem)})"))
        warnings.extend(series.warnings)
    return CaseFiles(
        files=tuple(files),
        series=tuple((s.kind, s.series_instance_uid) for s in converted),
        warnings=tuple(warnings),
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _case_name(case: CasePlan, root: Path) -> str:
    """The file an error about `case` is attributed to: its first image, tree-relative."""
    return _relative(case.series[0].path, root) if case.series else case.case_id


def _sweep(tmp_dir: Path, active: set[Path]) -> None:
    """Blocking. Remove work folders of earlier runs that no running job owns."""
    for leftover in tmp_dir.glob(f"{_WORKSPACE_PREFIX}*"):
        if leftover not in active and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


class NiftiUploadImporter:
    """Converts the NIfTI tree of an upload case by case and emits the DICOM files.

    Runs on the event loop; see the module docstring for the order and the guarantees.

    Parameters
    ----------
    executor
        Where planning and conversion run. None (the app's choice): a one-process pool of
        its own, created at first use, replaced if its worker dies, shut down by
        :meth:`aclose`. Never the ingest pool (module docstring).
    max_volume_bytes
        Largest voxel array one NIfTI image may declare (``upload.nifti_max_volume_bytes``).
    dataset_uid_seed_from
        Maps an upload's routing to the seed of every derived UID. The default
        (:func:`default_uid_seed`) makes UIDs depend on project, dataset and the paths in
        the tree, so re-importing the same tree into the same dataset is idempotent.
    """

    def __init__(
        self,
        executor: Executor | None = None,
        *,
        max_volume_bytes: int = _DEFAULT_MAX_VOLUME_BYTES,
        dataset_uid_seed_from: Callable[[Routing], str] = default_uid_seed,
    ) -> None:
        self._executor = executor
        self._owns_executor = executor is None
        self._max_volume_bytes = max_volume_bytes
        self._seed_from = dataset_uid_seed_from
        self._active: set[Path] = set()

    def _pool(self) -> Executor:
        if self._executor is None:
            # Creating the pool starts no process; the first call spawns the worker.
            self._executor = make_process_pool(1, nice=_CONVERSION_NICE)
        return self._executor

    def _replace_broken_pool(self, broken: Executor) -> bool:
        """Drop an owned pool whose worker died; False when the pool is not ours to replace."""
        if not self._owns_executor:
            return False
        if self._executor is broken:
            self._executor = None
            broken.shutdown(wait=False, cancel_futures=True)
        return True

    async def aclose(self) -> None:
        """Shut down an owned pool (waits for a running conversion). Runs on the loop."""
        if self._owns_executor and self._executor is not None:
            pool, self._executor = self._executor, None
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    async def __call__(self, job: NiftiJob) -> list[tuple[str, str]]:
        """Import `job.tree`; returns per-file errors as (tree-relative path, reason).

        Cases ``job.cases_done + job.cases_failed`` and later are converted (the earlier ones
        were finished by an interrupted run of the same import). Raises what `job.emit`
        raises (ShuttingDownError when the gateway stops) and BrokenExecutor when the pool
        died; every per-case problem is returned instead.
        """
        loop = asyncio.get_running_loop()
        workspace = job.tmp_dir / f"{_WORKSPACE_PREFIX}{uuid.uuid4().hex}"
        await asyncio.to_thread(_sweep, job.tmp_dir, set(self._active))
        self._active.add(workspace)
        try:
            try:
                plan = await loop.run_in_executor(self._pool(), plan_tree, job.tree)
            except ConversionError as exc:
                logger.info("NIfTI tree of %s not imported: %s", job.routing.source_id, exc)
                return [(TREE_ERROR_NAME, str(exc))]
            for warning in plan.warnings:
                job.warn(warning)
            return await self._convert_cases(job, plan, workspace)
        finally:
            await asyncio.to_thread(shutil.rmtree, workspace, ignore_errors=True)
            self._active.discard(workspace)

    async def _convert_cases(
        self, job: NiftiJob, plan: NiftiPlan, workspace: Path
    ) -> list[tuple[str, str]]:
        loop = asyncio.get_running_loop()
        seed = self._seed_from(job.routing)
        total, done, failed = len(plan.cases), job.cases_done, job.cases_failed
        errors: list[tuple[str, str]] = []
        job.progress(total, done, failed)
        for index, case in enumerate(plan.cases):
            if index < job.cases_done + job.cases_failed:
                continue  # finished before the gateway stopped; its instances are spooled
            name = _case_name(case, plan.root)
            out_dir = workspace / f"case-{index}"
            pool = self._pool()
            try:
                result = await loop.run_in_executor(
                    pool, convert_case_files, plan, case, out_dir, seed, self._max_volume_bytes
                )
            except ConversionError as exc:
                errors.append((name, str(exc)))
                failed += 1
            except BrokenExecutor:
                if not self._replace_broken_pool(pool):
                    raise  # a shared pool is gone: nothing else can be converted or ingested
                logger.error("NIfTI conversion worker died on case %s", name)
                reason = "the conversion worker process died (out of memory?)"
                errors.append((name, f"case {case.case_id}: {reason}"))
                failed += 1
            # A worker-side failure that is not a conversion error (a converter bug, memory)
            # still concerns this case only: report it and go on with the next case.
            except Exception as exc:
                logger.exception("converting case %s of %s failed", name, job.routing.source_id)
                errors.append((name, f"case {case.case_id}: conversion failed: {exc!r}"))
                failed += 1
            else:
                for warning in result.warnings:
                    job.warn(warning)
                for path, file_name in result.files:
                    await job.emit(Path(path), file_name)
                done += 1
                logger.debug(
                    "case %s of %s: %d files in %d series",
                    case.case_id,
                    job.routing.source_id,
                    len(result.files),
                    len(result.series),
                )
            finally:
                await asyncio.to_thread(shutil.rmtree, out_dir, ignore_errors=True)
            job.progress(total, done, failed)
        return errors
