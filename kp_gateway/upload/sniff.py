"""What an uploaded file is: recognised by its content (DICOM, NIfTI, zip), a dataset without
preamble rewritten as Part-10, and the check of a fully received upload before it is accepted.

Pure, except the functions documented as blocking (worker threads via ``asyncio.to_thread``).
"""

from __future__ import annotations

import enum
import os
import struct
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from kp_gateway.dicom.part10 import check_instance, fd_reader, read_file_meta
from kp_gateway.errors import InvalidDicomError, RejectedInputError, UnsupportedMediaError
from kp_gateway.uids import is_valid_uid
from kp_gateway.upload.archive import ArchiveLimits, ArchiveMember, list_members, open_member

HEAD_BYTES = 1024  # the Part-10 preamble, "DICM" and a NIfTI-1/2 header all fit
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
# The user guide spells the basic layout's side-cars with "_" and with "-".
_NIFTI_SIDECARS = (
    "dataset.json",
    "meta_data.json",
    "meta-data.json",
    "seg_info.json",
    "seg-info.json",
)
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


class MemberKind(enum.StrEnum):
    """What a member (or a single-file upload) turned out to be."""

    DICOM = "dicom"  # a Part-10 file, spooled byte for byte
    RAW_DICOM = "raw_dicom"  # looks like a dataset without preamble; converted to Part-10
    NIFTI = "nifti"  # a NIfTI image or one of its JSON side-cars
    OTHER = "other"


def looks_like_zip(head: bytes, filename: str) -> bool:
    """Pure. True when a single upload must be opened as a zip (magic bytes or a .zip name)."""
    return head[:4] in _ZIP_MAGICS or filename.lower().endswith(".zip")


def sniff(head: bytes, name: str) -> MemberKind:
    """Pure. Classify a file from its first bytes, and from its name for NIfTI only.

    DICOM is recognised by its header, never by its name: a Part-10 file has "DICM" at offset
    128 (PS3.10 7.1); a dataset without preamble starts with a group 0002 or 0008 element,
    which :func:`to_part10` then confirms by parsing it.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return MemberKind.DICOM
    lower = name.lower()
    if lower.endswith(_NIFTI_SUFFIXES) or lower.rsplit("/", 1)[-1] in _NIFTI_SIDECARS:
        return MemberKind.NIFTI
    if len(head) >= 8:
        (group_le,) = struct.unpack("<H", head[:2])
        (group_be,) = struct.unpack(">H", head[:2])
        if group_le in (0x0002, 0x0008) or group_be == 0x0008:
            return MemberKind.RAW_DICOM
    return MemberKind.OTHER


def read_head(path: Path) -> bytes:
    """Blocking. The first :data:`HEAD_BYTES` bytes of `path`."""
    with open(path, "rb") as fh:
        return fh.read(HEAD_BYTES)


def member_head(archive: Path, member: ArchiveMember, limits: ArchiveLimits) -> bytes:
    """Blocking. The first :data:`HEAD_BYTES` decompressed bytes of one member."""
    with open_member(archive, member, limits) as src:
        return src.read(HEAD_BYTES)


# PS3.4 Annex F: a DICOMDIR is the index of a file-set (Media Storage Directory), not an instance.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


def is_dicomdir(path: Path) -> bool:
    """Blocking. True if a Part-10 file's meta names the Media Storage Directory SOP class."""
    try:
        meta = read_file_meta_info(path)
    except (PydicomInvalidDicomError, ValueError, TypeError, EOFError, OSError, KeyError):
        return False  # not readable as Part-10: the import path reports what is wrong
    return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY


def check_complete_instance(path: Path) -> None:
    """Blocking. Refuse a Part-10 file that is not a whole, identifiable instance.

    The same check the C-STORE path runs before it answers
    (:func:`kp_gateway.dicom.part10.check_instance`): valid UIDs, no value past the end of the
    file, a sequence or encapsulated Pixel Data ending in its delimiter, a native Pixel Data as
    long as the image needs. Only element headers and a few small values are read: memory
    follows the header, never the Pixel Data.

    Raises
    ------
    InvalidDicomError
        Not a Part-10 file; no valid SOP Class/Instance, Study or Series UID; a value, item or
        fragment running past the end of the file; an image whose pixel data is missing or short.
    """
    try:
        with open(path, "rb") as fh:
            read = fd_reader(fh.fileno())
            dataset_start, transfer_syntax = read_file_meta(read)
            check_instance(read, os.fstat(fh.fileno()).st_size, dataset_start, transfer_syntax)
    except OSError as exc:
        raise InvalidDicomError(f"cannot read the file ({exc})") from exc


def to_part10(src: Path) -> Path:
    """Blocking. Rewrite a dataset without preamble (`src`) as a Part-10 file, in place.

    The elements are written back in the encoding they were read in, under a file meta group
    (PS3.10 7.1) naming that transfer syntax; `src` is replaced atomically.

    Raises
    ------
    InvalidDicomError
        The bytes do not parse as a dataset, or the SOP Class/Instance, Study or Series UID is
        missing or invalid (a random file that merely starts with 08 00 ends here).
    """
    try:
        ds = pydicom.dcmread(src, force=True)
        uids = [
            str(ds.get(k, ""))
            for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        ]
        implicit, little = ds.original_encoding
    except (PydicomInvalidDicomError, ValueError, TypeError, EOFError, OSError, KeyError) as exc:
        raise InvalidDicomError(f"not a readable DICOM dataset ({exc})") from exc
    if not all(is_valid_uid(uid) for uid in uids):
        raise InvalidDicomError("not DICOM: no valid SOP Class, SOP Instance, Study or Series UID")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(uids[0])
    meta.MediaStorageSOPInstanceUID = UID(uids[1])
    stated = (getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID")
    if stated is not None and UID(str(stated)).is_compressed:
        # A file meta group without its preamble names the real syntax: encapsulated Pixel
        # Data read as explicit VR is still JPEG, J2K or RLE.
        meta.TransferSyntaxUID = UID(str(stated))
    elif implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta = meta
    # Group 0002 inside the dataset body is invalid in Part-10 and would be written twice.
    for elem in [e for e in ds if e.tag.group == 0x0002]:
        del ds[elem.tag]
    dst = src.with_name(f"{src.stem}.p10.part")
    try:
        ds.save_as(dst, enforce_file_format=True)
    except (ValueError, TypeError, OSError, struct.error) as exc:
        dst.unlink(missing_ok=True)
        raise InvalidDicomError(f"cannot write the dataset as Part-10 ({exc})") from exc
    os.replace(dst, src)
    return src


def inspect_body(
    body: Path, filename: str, kind: str, extension: str, limits: ArchiveLimits
) -> tuple[str, int]:
    """Blocking. Check a fully received upload before it is accepted (answered 202).

    Returns ``("zip", member count)`` or ``("file", 1)``. A single dataset without preamble
    under ``kind=dicom`` is converted to Part-10 in place here, so that a non-DICOM file is
    refused synchronously.

    Raises
    ------
    UnsafeArchiveError, PayloadTooLargeError
        From :func:`kp_gateway.upload.archive.list_members`: corrupt, encrypted, traversal, bomb.
    UnsupportedMediaError
        Nothing the requested kind can import (no DICOM member under ``kind=dicom``).
    InvalidDicomError
        A single file under ``kind=dicom`` that is not DICOM.
    """
    head = read_head(body)
    if not head:
        raise RejectedInputError("the upload is empty")
    if looks_like_zip(head, filename):
        members = list_members(body, limits)
        if not members:
            raise UnsupportedMediaError("the archive holds no files (dot-files are ignored)")
        ext = extension.lower()
        if kind == "dicom" and not any(
            (not ext or m.name.lower().endswith(ext)) and _member_is_dicom(body, m, limits)
            for m in members
        ):
            raise UnsupportedMediaError(
                "the archive holds no DICOM files" + (f" ending in {ext}" if ext else "")
            )
        if kind == "nifti" and not any(m.name.lower().endswith(_NIFTI_SUFFIXES) for m in members):
            raise UnsupportedMediaError("the archive holds no .nii or .nii.gz files")
        return "zip", len(members)
    found = sniff(head, filename)
    if kind == "dicom":
        if found == MemberKind.RAW_DICOM:
            to_part10(body)
        elif found != MemberKind.DICOM:
            raise InvalidDicomError("the upload is not a DICOM file (no DICM header, no dataset)")
    if kind == "nifti" and found != MemberKind.NIFTI:
        raise UnsupportedMediaError("the upload is not a .nii or .nii.gz file")
    return "file", 1


def _member_is_dicom(body: Path, member: ArchiveMember, limits: ArchiveLimits) -> bool:
    try:
        head = member_head(body, member, limits)
    except RejectedInputError:
        return False  # reported per file during the import
    return sniff(head, member.name) in (MemberKind.DICOM, MemberKind.RAW_DICOM)


__all__ = [
    "HEAD_BYTES",
    "MEDIA_STORAGE_DIRECTORY",
    "MemberKind",
    "check_complete_instance",
    "inspect_body",
    "is_dicomdir",
    "looks_like_zip",
    "member_head",
    "read_head",
    "sniff",
    "to_part10",
]
