"""S3 error translation and multipart part sizing (pure functions of backends.s3)."""

from __future__ import annotations

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from kp_gateway.backends.s3 import MAX_PARTS, MIN_PART_BYTES, part_size_for, translate_error
from kp_gateway.errors import BackendRejectedError, BackendUnavailableError

MiB = 1 << 20


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (client_error("SlowDown", 503), BackendUnavailableError),
        (client_error("ServiceUnavailable", 503), BackendUnavailableError),
        (client_error("InternalError", 500), BackendUnavailableError),
        (client_error("RequestTimeout", 400), BackendUnavailableError),
        (client_error("TooManyRequests", 429), BackendUnavailableError),
        (client_error("AccessDenied", 403), BackendRejectedError),
        (client_error("InvalidAccessKeyId", 403), BackendRejectedError),
        (client_error("SignatureDoesNotMatch", 403), BackendRejectedError),
        (client_error("NoSuchBucket", 404), BackendRejectedError),
        (client_error("EntityTooLarge", 400), BackendRejectedError),
        (EndpointConnectionError(endpoint_url="http://x"), BackendUnavailableError),
        (ConnectTimeoutError(endpoint_url="http://x"), BackendUnavailableError),
        (ReadTimeoutError(endpoint_url="http://x"), BackendUnavailableError),
        (NoCredentialsError(), BackendRejectedError),
        (ConnectionResetError("reset"), BackendUnavailableError),
        (TimeoutError(), BackendUnavailableError),
    ],
)
def test_translate_error_maps_to_backend_errors(exc: Exception, expected: type) -> None:
    """Transient failures retry (Unavailable); auth, bucket and 4xx problems do not."""
    translated = translate_error(exc, "storing k")
    assert type(translated) is expected
    assert "storing k" in str(translated)


@pytest.mark.parametrize(
    ("size", "part"),
    [
        (12 * MiB, 8 * MiB),
        (1 << 40, 110 * MiB),  # 1 TiB needs 105 MiB parts to fit 10,000; rounded to MiB
    ],
)
def test_part_size_for_bounds(size: int, part: int) -> None:
    """Parts stay at the preferred size unless 10,000 of them would not hold the object."""
    got = part_size_for(size)
    assert got >= MIN_PART_BYTES
    assert -(-size // got) <= MAX_PARTS
    assert got % MiB == 0
    assert got <= part
