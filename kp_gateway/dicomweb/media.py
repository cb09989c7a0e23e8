"""Content negotiation of PS3.18 §8.7: what an ``Accept`` header allows, and the media type of
each transfer syntax's frames."""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import Message

from kp_gateway.errors import NotAcceptableError

DICOM_JSON = "application/dicom+json"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# The media type of a compressed frame, by transfer syntax (PS3.18 table 8.7.3-5).
_FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One entry of an Accept header: ``type/subtype`` and its parameters (lower-case keys)."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)

    def matches(self, media_type: str) -> bool:
        if self.media_type in ("*/*", media_type):
            return True
        main = media_type.split("/")[0]
        return self.media_type == f"{main}/*"


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, most preferred first (q=0 dropped); ``*/*``
    when there is none."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[tuple[float, int, MediaRange]] = []
    for position, part in enumerate(_split_outside_quotes(header)):
        if not part.strip():
            continue
        message = Message()
        message["content-type"] = part.strip()
        media_type = message.get_content_type()
        # email falls back to text/plain for a malformed type: keep what was written.
        written = part.split(";", 1)[0].strip().lower()
        if written != media_type:
            media_type = written
        params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
        try:
            quality = float(params.pop("q", "1"))
        except ValueError:
            quality = 1.0
        if quality > 0:
            ranges.append((-quality, position, MediaRange(media_type, params)))
    return [r for _, _, r in sorted(ranges, key=lambda t: (t[0], t[1]))]


def _split_outside_quotes(header: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in header:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def frame_media_type(transfer_syntax_uid: str) -> str:
    """The media type of one frame stored in that transfer syntax."""
    return _FRAME_MEDIA.get(transfer_syntax_uid, "application/octet-stream")


def _part_type(accepted: MediaRange) -> str | None:
    """The part type of ``multipart/related; type=...``, or None for another range."""
    if accepted.media_type == "multipart/related":
        return accepted.params.get("type", "application/octet-stream").lower()
    return None


def choose_json(header: str | None) -> str:
    """``application/dicom+json`` (or ``application/json``) when the header allows it.

    Raises
    ------
    NotAcceptableError
        The header allows neither.
    """
    for accepted in parse_accept(header):
        for media_type in (DICOM_JSON, "application/json"):
            if accepted.matches(media_type):
                return DICOM_JSON if accepted.media_type != "application/json" else media_type
    raise NotAcceptableError(f"only {DICOM_JSON} is offered here, not {header!r}")


def check_instances_accept(header: str | None, stored_syntaxes: set[str]) -> None:
    """WADO-RS retrieval of instances answers ``multipart/related; type="application/dicom"``
    with the bytes as stored: allowed when the header accepts that type and the transfer
    syntax asked for is ``*``, absent, or the one every instance is stored in.

    Raises
    ------
    NotAcceptableError
        Another type, or a transfer syntax the gateway would have to transcode into.
    """
    for accepted in parse_accept(header):
        part = _part_type(accepted)
        if accepted.media_type in ("*/*", "multipart/*"):
            return
        if part not in ("application/dicom", "application/*", "*/*"):
            continue
        wanted = accepted.params.get("transfer-syntax", "*")
        if wanted == "*" or stored_syntaxes <= {wanted}:
            return
    raise NotAcceptableError(
        "instances are served as stored, in "
        f"{', '.join(sorted(stored_syntaxes))}; the gateway does not transcode "
        f"(ask with transfer-syntax=*), not {header!r}"
    )


@dataclass(frozen=True, slots=True)
class FrameChoice:
    """How to answer a frames request: decode to native or send as stored."""

    decode: bool


def choose_frames(header: str | None, stored_syntax: str) -> FrameChoice:
    """Frames come as stored when the header accepts their media type (or
    ``transfer-syntax=*``), else decoded to native little endian when it accepts
    ``application/octet-stream``.

    Raises
    ------
    NotAcceptableError
        Neither is acceptable.
    """
    stored_media = frame_media_type(stored_syntax)
    native = stored_media == "application/octet-stream"
    for accepted in parse_accept(header):
        part = _part_type(accepted)
        if accepted.media_type in ("*/*", "multipart/*"):
            return FrameChoice(decode=not native)
        if part is None:
            continue
        wanted = accepted.params.get("transfer-syntax")
        if wanted == "*" or (wanted == stored_syntax and part in (stored_media, "*/*")):
            return FrameChoice(decode=False)
        if part == stored_media and wanted is None and not native:
            return FrameChoice(decode=False)
        if part in ("application/octet-stream", "*/*") and wanted in (None, EXPLICIT_LE):
            return FrameChoice(decode=not native)
    raise NotAcceptableError(
        f"frames are stored as {stored_media} ({stored_syntax}); ask for that, "
        f"application/octet-stream or transfer-syntax=*, not {header!r}"
    )
