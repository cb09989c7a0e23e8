"""The gateway's exception hierarchy and how each exception maps to a DICOM or HTTP status.

::

    GatewayError
    ├── ConfigError(GatewayError, ValueError)   start-up only; names the dotted key; exit code 2
    ├── DataDirLockedError                      another serve or reindex holds storage.path; exit 2
    ├── IncompatibleDependencyError             an installed library is not the version relied on
    ├── RejectedInputError                      the sender's fault; never retried
    │   ├── InvalidDicomError                   undecodable, no SOP UIDs, bad file meta, cut off
    │   │   └── DatasetMismatchError            C-STORE dataset UIDs differ from the request's
    │   ├── UnknownProjectError                 called AE / ?project= names no project
    │   ├── UnsafeArchiveError                  traversal, symlink, encrypted, corrupt zip
    │   ├── PayloadTooLargeError                upload or extracted size over a cap
    │   ├── UnsupportedMediaError               not a zip / DICOM / NIfTI where one is required
    │   ├── BadQueryError                       a DICOMweb query or path PS3.18 does not allow
    │   ├── NotAcceptableError                  no representation the Accept header allows (406)
    │   ├── UnknownResourceError                no such study, series, instance or frame (404)
    │   ├── ConversionError                     NIfTI could not become conformant DICOM
    │   ├── ForbiddenRequestError               refused whatever the credentials (403)
    │   │   ├── AdminOnlyError                  a project token on a route for the admin token
    │   │   └── ReadOnlyTokenError              a read token asked to change its project
    │   ├── UnknownTokenError                   no such project token (404)
    │   └── TokenQuotaError                     the gateway holds its most project tokens (429)
    ├── PipelineFull                            capacity; transient for the sender
    ├── InsufficientStorageError                the disk is full or below its reserve (507 / 0xA700)
    ├── ShuttingDownError                       intake closed
    └── BackendError                            raised only by backends/*, always ``from`` the cause
        ├── BackendUnavailableError             transient (timeouts, disk full, connection) -> RETRY
        └── BackendRejectedError                permanent (bad bucket, constraint) -> FAIL
            └── ObjectNotFoundError             storage has no object under that key

Only ``dicom/scp.py`` and ``http/app.py`` turn these into wire statuses, through the two tables
below.
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    # The JSON ``error`` code when the class name does not give the one clients know.
    code: ClassVar[str | None] = None


class ConfigError(GatewayError, ValueError):
    """A configuration key is unknown or has a bad value (start-up only)."""


class DataDirLockedError(GatewayError):
    """Another kp-gateway process (serve or reindex) holds the data directory's lock."""


class IncompatibleDependencyError(GatewayError):
    """An installed library is not the version whose internals the gateway relies on."""


class RejectedInputError(GatewayError):
    """The input itself is unacceptable; retrying cannot help."""


class InvalidDicomError(RejectedInputError):
    """The bytes are not a decodable DICOM instance with the UIDs we need."""


class DatasetMismatchError(InvalidDicomError):
    """A C-STORE's dataset names another SOP Class or Instance UID than its request."""


class UnknownProjectError(RejectedInputError):
    """The named project does not exist."""


class UnsafeArchiveError(RejectedInputError):
    """A zip archive is corrupt, encrypted or tries to escape its extraction root."""


class PayloadTooLargeError(RejectedInputError):
    """An upload, an archive member or an archive's total size exceeds a configured cap."""


class UnsupportedMediaError(RejectedInputError):
    """The payload is not of a kind this route accepts."""


class BadQueryError(RejectedInputError):
    """A DICOMweb request PS3.18 does not allow: unknown attribute, bad range, bad frame list."""

    code = "bad_query"


class NotAcceptableError(RejectedInputError):
    """Nothing the gateway can answer matches the request's Accept header."""

    code = "not_acceptable"


class UnknownResourceError(RejectedInputError):
    """The study, series, instance, frame or bulk data a DICOMweb path names does not exist."""

    code = "not_found"


class ConversionError(RejectedInputError):
    """NIfTI input could not be converted into conformant DICOM."""


class UnknownUploadError(RejectedInputError):
    """No upload with the requested id (or it is not a tus upload)."""

    code = "not_found"


class UploadConflictError(RejectedInputError):
    """The upload's state does not allow the request (import running, a PATCH in progress)."""

    code = "conflict"


class UploadOffsetError(UploadConflictError):
    """A tus PATCH starts elsewhere than at the bytes received so far (tus 1.0: 409)."""

    code = "offset_mismatch"

    def __init__(self, detail: str, *, offset: int) -> None:
        super().__init__(detail)
        self.offset = offset


class UploadFailedError(RejectedInputError):
    """The tus upload failed already; resuming it cannot help (410 Gone)."""

    code = "gone"


class UploadQuotaError(RejectedInputError):
    """Unfinished resumable uploads already hold their quota (number or declared bytes)."""

    code = "too_many_unfinished_uploads"


class ForbiddenRequestError(RejectedInputError):
    """The request is refused whatever its credentials (403)."""

    code = "forbidden"


class CrossOriginError(ForbiddenRequestError):
    """A browser request from another origin tried to change state with our cookie."""

    code = "cross_origin"


class HostNotAllowedError(ForbiddenRequestError):
    """The Host header names no host this gateway serves (DNS rebinding)."""

    code = "host_not_allowed"


class AdminOnlyError(ForbiddenRequestError):
    """A project token asked for a route only the admin token may use (403)."""

    code = "admin_only"


class ReadOnlyTokenError(ForbiddenRequestError):
    """A token with the ``read`` scope asked to change its project (403)."""

    code = "read_only"


class UnknownTokenError(RejectedInputError):
    """No project token with that id (in that project)."""

    code = "not_found"


class TokenQuotaError(RejectedInputError):
    """The gateway already holds ``http.max_tokens`` project tokens (429)."""

    code = "too_many_tokens"


class FeatureUnavailableError(GatewayError):
    """The request needs a component this gateway was started without."""

    code = "not_implemented"


class PipelineFull(GatewayError):
    """The pipeline stayed saturated past the admission wait."""


class InsufficientStorageError(GatewayError):
    """The data filesystem is full, or would fall below its configured reserve."""


class ShuttingDownError(GatewayError):
    """The gateway is draining and accepts no new work."""


class BackendError(GatewayError):
    """A storage or index backend failed; raised only inside ``backends``."""


class BackendUnavailableError(BackendError):
    """A transient backend failure (disk full, timeout, connection); worth retrying."""


class BackendRejectedError(BackendError):
    """A permanent backend failure; retrying cannot help."""


class ObjectNotFoundError(BackendRejectedError):
    """Object storage holds nothing under the key (read or fetch of a missing object)."""


# C-STORE response statuses, PS3.4 Annex B.2.3 and PS3.7 C.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210  # what pynetdicom's own apps answer for "unable to decode"
# "Data Set does not match SOP Class": what DCMTK's storescp answers when the dataset's SOP
# Class or Instance UID differs from the request's.
STATUS_DATASET_MISMATCH = 0xA900
STATUS_PROCESSING_FAILURE = 0xC000

_DIMSE_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (DatasetMismatchError, STATUS_DATASET_MISMATCH),
    (InvalidDicomError, STATUS_CANNOT_UNDERSTAND),
    (PipelineFull, STATUS_OUT_OF_RESOURCES),
    (InsufficientStorageError, STATUS_OUT_OF_RESOURCES),
    (ShuttingDownError, STATUS_OUT_OF_RESOURCES),
    # A write that failed (disk full, backend down) is "out of resources", as qrscp answers.
    (BackendError, STATUS_OUT_OF_RESOURCES),
    (RejectedInputError, STATUS_CANNOT_UNDERSTAND),
)

_HTTP_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, 400),
    (UnknownProjectError, 404),
    (ObjectNotFoundError, 404),
    (PayloadTooLargeError, 413),
    (UnsupportedMediaError, 415),
    (NotAcceptableError, 406),
    (UnknownResourceError, 404),
    (ConversionError, 422),
    (UnknownUploadError, 404),
    (UploadConflictError, 409),
    (UploadFailedError, 410),
    (UploadQuotaError, 429),
    (UnknownTokenError, 404),
    (TokenQuotaError, 429),
    (ForbiddenRequestError, 403),
    (FeatureUnavailableError, 501),
    (UnsafeArchiveError, 400),
    (InvalidDicomError, 400),
    (RejectedInputError, 400),
    (PipelineFull, 503),
    (InsufficientStorageError, 507),
    (ShuttingDownError, 503),
    (BackendUnavailableError, 503),
    (BackendRejectedError, 500),
)


def dimse_status_for(exc: BaseException) -> int:
    """Return the C-STORE status for `exc`; 0xC000 for anything unexpected (a bug)."""
    for exc_type, status in _DIMSE_STATUS:
        if isinstance(exc, exc_type):
            return status
    return STATUS_PROCESSING_FAILURE


def http_status_for(exc: BaseException) -> int:
    """Return the HTTP status for `exc`; 500 for anything unexpected (a bug)."""
    for exc_type, status in _HTTP_STATUS:
        if isinstance(exc, exc_type):
            return status
    return 500


def error_code_for(exc: BaseException) -> str:
    """Return the stable machine-readable ``error`` code of the JSON error body."""
    if isinstance(exc, GatewayError) and exc.code:
        return exc.code
    name = type(exc).__name__
    if name.endswith("Error"):
        name = name[: -len("Error")]
    # CamelCase -> snake_case, e.g. UnsafeArchive -> unsafe_archive
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
