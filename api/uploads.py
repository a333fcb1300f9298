"""Uploads for ``/infer_file``: stream the multipart body to disk under a limit, extract safely.

The reference writes the upload under the client's own file name (``../../x.zip`` escapes the upload
folder), extracts tar members unfiltered and has no size limit (``docs/reference-contract.md``, "The
reference's defects"). Here the upload is written under a random name in ``uploads_dir`` while it
streams in, and refused with 413 as soon as it passes the limit. Extraction first reads every member
header and refuses the whole archive (400, nothing written) when a member is absolute, contains
``..``, is a link, a device or a FIFO, is encrypted, or when the members would unpack past the size
or count limit. It then extracts into a fresh folder beside the destination, counting the bytes
really decompressed (a zip header can lie about sizes), and renames it into place only when
everything succeeded.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import lzma
import os
import re
import secrets
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import anyio
from python_multipart.multipart import parse_options_header

from nnunet_node.api.dicomweb.multipart import Part, boundary_of, iter_parts, parse_media_type
from nnunet_node.core.errors import InvalidRequest, PayloadTooLarge, StorageFull, UnsafeArchive

LOGGER = logging.getLogger(__name__)

MB = 1024 * 1024
MAX_MEMBERS = 100_000
"""More members than any study needs (a 5000-slice CT is 5000), few enough to bound the work."""
MAX_FIELD_BYTES = 1 * MB
"""A non-file form field (the JSON ``request``) larger than this is refused with 413."""
MAX_PARTS = 16
_COPY_CHUNK = 1 * MB
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


# --------------------------------------------------------------------------------------------
# Multipart upload, streamed to disk
# --------------------------------------------------------------------------------------------


@dataclass
class Upload:
    """A parsed ``multipart/form-data`` body: text fields, and the one file part written to disk."""

    fields: dict[str, str]
    file_path: Path | None
    file_size: int = 0

    def discard(self) -> None:
        if self.file_path is not None:
            self.file_path.unlink(missing_ok=True)


async def receive_multipart(
    content_type: str,
    stream: AsyncIterator[bytes],
    uploads_dir: Path,
    *,
    max_bytes: int,
    file_field: str = "file",
) -> Upload:
    """Parse a ``multipart/form-data`` body (RFC 7578) from ``stream``, writing the part
    ``file_field`` to a new file with a random name in ``uploads_dir``.

    The parts come from :func:`api.dicomweb.multipart.iter_parts`, the streaming reader STOW-RS
    uses (python-multipart; a part past a few MB spills to a file in ``uploads_dir``, which is
    then renamed into place). Raises :class:`PayloadTooLarge` once a part passes ``max_bytes``
    (a text field :data:`MAX_FIELD_BYTES`) and :class:`InvalidRequest` for a body that is not
    form data; nothing is left in ``uploads_dir`` then. The client's file name is never used.
    """
    media = parse_media_type(content_type)
    if media.type != "multipart/form-data" or not media.param("boundary"):
        raise InvalidRequest("the body must be multipart/form-data with a boundary")
    boundary = boundary_of(media)
    uploads_dir.mkdir(parents=True, exist_ok=True)
    target = uploads_dir / f"{secrets.token_hex(16)}.upload"
    fields: dict[str, str] = {}
    file_seen = False
    size = 0
    count = 0
    try:
        async for part in iter_parts(
            stream,
            boundary,
            max_bytes=max_bytes + MAX_PARTS * MAX_FIELD_BYTES,
            max_part_bytes=max(max_bytes, MAX_FIELD_BYTES),
            spill_dir=uploads_dir,
        ):
            try:
                count += 1
                if count > MAX_PARTS:
                    raise InvalidRequest(f"too many form fields (more than {MAX_PARTS})")
                disposition, options = parse_options_header(
                    part.headers.get("content-disposition", "")
                )
                if disposition != b"form-data" or b"name" not in options:
                    raise InvalidRequest(
                        "a form part lacks Content-Disposition: form-data; name=..."
                    )
                name = options[b"name"].decode("utf-8", "replace")
                if name == file_field:
                    if file_seen:
                        raise InvalidRequest(f"more than one {file_field!r} part")
                    if part.size > max_bytes:
                        raise PayloadTooLarge(
                            f"file: the upload is larger than {max_bytes // MB} MB"
                        )
                    file_seen = True
                    size = part.size
                    await anyio.to_thread.run_sync(_keep_part, part, target)
                else:
                    if part.size > MAX_FIELD_BYTES:
                        raise PayloadTooLarge(
                            f"{name}: form field larger than {MAX_FIELD_BYTES // MB} MB"
                        )
                    fields[name] = part.read().decode("utf-8", "replace")
            finally:
                part.discard()
    except PayloadTooLarge as exc:
        target.unlink(missing_ok=True)
        if "file:" in str(exc) or "form field" in str(exc):
            raise
        raise PayloadTooLarge(f"file: the upload is larger than {max_bytes // MB} MB") from exc
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return Upload(fields=fields, file_path=target if file_seen else None, file_size=size)


def _keep_part(part: Part, target: Path) -> None:
    """Move a finished part's bytes to ``target`` (a rename when it spilled to a file)."""
    if part.path is not None:
        os.replace(part.path, target)
        part.path = None
        return
    with target.open("xb") as out:
        out.write(part.data or b"")


# --------------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    parts: tuple[str, ...]
    is_dir: bool
    size: int
    ref: zipfile.ZipInfo | tarfile.TarInfo


def member_parts(name: str) -> tuple[str, ...]:
    """The path components of an archive member name, or :class:`UnsafeArchive` when the name is
    absolute (``/x``, ``C:x``), contains ``..``, or holds a NUL. Backslashes count as separators:
    zip files written on Windows use them."""
    if "\x00" in name:
        raise UnsafeArchive(f"file: archive member {name!r} has a NUL in its name")
    normal = name.replace("\\", "/")
    if normal.startswith("/") or _WINDOWS_DRIVE.match(normal):
        raise UnsafeArchive(f"file: archive member {name!r} is an absolute path")
    parts = tuple(p for p in normal.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchive(f"file: archive member {name!r} points outside the archive (..)")
    return parts


def _zip_members(zf: zipfile.ZipFile, max_members: int) -> Iterator[_Member]:
    for count, info in enumerate(zf.infolist(), start=1):
        if count > max_members:
            raise UnsafeArchive(f"file: the archive has more than {max_members} members")
        parts = member_parts(info.filename)
        if info.flag_bits & 0x1:
            raise UnsafeArchive(f"file: archive member {info.filename!r} is encrypted")
        # Unix zips keep st_mode in the high 16 bits; a file type other than file or folder
        # (symlink, device, FIFO, socket) is refused. No type bits at all means a plain file.
        mode = info.external_attr >> 16
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchive(
                f"file: archive member {info.filename!r} is a link or special file, not a file"
            )
        is_dir = info.is_dir() or stat.S_ISDIR(mode)
        yield _Member(parts, is_dir, 0 if is_dir else info.file_size, info)


def _tar_members(tf: tarfile.TarFile, max_members: int) -> Iterator[_Member]:
    for count, info in enumerate(tf, start=1):
        if count > max_members:
            raise UnsafeArchive(f"file: the archive has more than {max_members} members")
        parts = member_parts(info.name)
        if info.issym() or info.islnk():
            raise UnsafeArchive(f"file: archive member {info.name!r} is a link")
        if not (info.isreg() or info.isdir()):
            raise UnsafeArchive(
                f"file: archive member {info.name!r} is a device, FIFO or other special file"
            )
        yield _Member(parts, info.isdir(), 0 if info.isdir() else info.size, info)


_CORRUPT = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, lzma.LZMAError)


def _open_archive(path: Path) -> zipfile.ZipFile | tarfile.TarFile:
    """Open a zip or tar (plain, gzip, bzip2, xz) by its content, never by a file name."""
    try:
        if zipfile.is_zipfile(path):
            return zipfile.ZipFile(path)
        return tarfile.open(path, mode="r:*")
    except (*_CORRUPT, OSError) as exc:
        raise InvalidRequest(
            "file: not a readable zip or tar archive (.zip, .tar, .tar.gz, .tgz)"
        ) from exc


def _copy_limited(src: IO[bytes], dst: BinaryIO, declared: int, budget: int, name: str) -> int:
    written = 0
    while chunk := src.read(_COPY_CHUNK):
        written += len(chunk)
        if written > declared:
            raise UnsafeArchive(f"file: archive member {name!r} unpacks larger than it declares")
        if written > budget:
            raise UnsafeArchive("file: the archive unpacks past the size limit")
        dst.write(chunk)
    return written


def extract_archive(
    archive: Path, dest: Path, *, max_bytes: int, max_members: int = MAX_MEMBERS
) -> Path:
    """Extract the zip or tar ``archive`` into the new folder ``dest`` (which must not exist) and
    return ``dest``.

    Every member is checked before anything is written; any refusal (:class:`UnsafeArchive`) or
    corruption (:class:`InvalidRequest`) leaves no trace: the partial folder is removed.
    """
    if dest.exists():
        raise FileExistsError(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _open_archive(archive) as handle:
        # Pass 1: headers only, nothing written (a compressed tar is decompressed to find them).
        try:
            members = list(
                _zip_members(handle, max_members)
                if isinstance(handle, zipfile.ZipFile)
                else _tar_members(handle, max_members)
            )
        except (*_CORRUPT, OSError) as exc:
            raise InvalidRequest(f"file: the archive is corrupt ({exc})") from exc
        declared = sum(m.size for m in members)
        if declared > max_bytes:
            raise UnsafeArchive(
                f"file: the archive would unpack to {declared // MB} MB, "
                f"over the limit of {max_bytes // MB} MB"
            )
        # Pass 2: extract beside the destination, then rename into place.
        partial = dest.with_name(f".{dest.name}.partial-{secrets.token_hex(4)}")
        partial.mkdir()
        try:
            budget = max_bytes
            for member in members:
                if not member.parts:
                    continue
                target = partial.joinpath(*member.parts)
                if member.is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with _open_member(handle, member) as src, target.open("wb") as dst:
                    budget -= _copy_limited(src, dst, member.size, budget, "/".join(member.parts))
            partial.rename(dest)
        except _CORRUPT as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise InvalidRequest(f"file: the archive is corrupt ({exc})") from exc
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise StorageFull("no space left to extract the upload") from exc
            # gzip/bz2 report bad data as OSError; file-versus-folder clashes land here too.
            raise UnsafeArchive(f"file: the archive cannot be extracted ({exc})") from exc
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return dest


@contextlib.contextmanager
def _open_member(handle: zipfile.ZipFile | tarfile.TarFile, member: _Member) -> Iterator[IO[bytes]]:
    if isinstance(handle, zipfile.ZipFile):
        assert isinstance(member.ref, zipfile.ZipInfo)
        try:
            src: IO[bytes] = handle.open(member.ref)
        except NotImplementedError as exc:  # compression method zipfile cannot read
            raise UnsafeArchive(f"file: archive member {member.ref.filename!r}: {exc}") from exc
        with src:
            yield src
        return
    assert isinstance(member.ref, tarfile.TarInfo)
    extracted = handle.extractfile(member.ref)
    if extracted is None:  # not a regular file: excluded in pass 1
        raise UnsafeArchive(f"file: archive member {member.ref.name!r} is not a regular file")
    with extracted:
        yield extracted


def study_root(extracted: Path, first_series: str | None) -> Path:
    """The folder to use as ``study_path``: the extraction root, or its only sub-folder when the
    archive was made from one folder (``study01/...``) and the series is not found at the root."""
    if first_series and (extracted / first_series).exists():
        return extracted
    entries = [p for p in extracted.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return extracted
