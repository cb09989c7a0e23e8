"""The two exception mapping tables: DIMSE statuses and HTTP statuses."""

from __future__ import annotations

import pytest

from kp_gateway import errors as e


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (e.InvalidDicomError("x"), 0xC210),
        (e.PipelineFull("x"), 0xA700),
        (e.ShuttingDownError("x"), 0xA700),
        (e.BackendUnavailableError("x"), 0xA700),
        (e.BackendRejectedError("x"), 0xA700),
        (e.ObjectNotFoundError("x"), 0xA700),
        (e.UnsafeArchiveError("x"), 0xC210),
        (RuntimeError("bug"), 0xC000),
    ],
)
def test_dimse_status_for_each_exception(exc: BaseException, status: int) -> None:
    """Each failure maps to its C-STORE status; a bug is 0xC000, never pynetdicom's 0xC211."""
    assert e.dimse_status_for(exc) == status


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (e.UnknownProjectError("x"), 404),
        (e.PayloadTooLargeError("x"), 413),
        (e.UnsupportedMediaError("x"), 415),
        (e.ConversionError("x"), 422),
        (e.UnsafeArchiveError("x"), 400),
        (e.InvalidDicomError("x"), 400),
        (e.PipelineFull("x"), 503),
        (e.BackendUnavailableError("x"), 503),
        (e.BackendRejectedError("x"), 500),
        (e.ObjectNotFoundError("x"), 404),
        (e.AdminOnlyError("x"), 403),
        (e.ReadOnlyTokenError("x"), 403),
        (e.UnknownTokenError("x"), 404),
        (e.TokenQuotaError("x"), 429),
        (ValueError("bug"), 500),
    ],
)
def test_http_status_for_each_exception(exc: BaseException, status: int) -> None:
    """Each failure maps to its HTTP status."""
    assert e.http_status_for(exc) == status


def test_error_code_is_snake_case_without_suffix() -> None:
    """JSON error codes are stable snake_case names."""
    assert e.error_code_for(e.UnsafeArchiveError("x")) == "unsafe_archive"
    assert e.error_code_for(e.PipelineFull("x")) == "pipeline_full"
