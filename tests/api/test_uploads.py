"""Safe extraction of uploads (api.uploads): nothing escapes, nothing half-written stays."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from nnunet_node.api.uploads import extract_archive, member_parts, receive_multipart, study_root
from nnunet_node.core.errors import InvalidRequest, PayloadTooLarge, UnsafeArchive

MB = 1024 * 1024


def _zip(path: Path, members: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "jobs"
    folder.mkdir()
    return folder


def test_zip_extracts_files_and_folders(tmp_path: Path, out: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"study/ct/1.dcm": b"one", "study/ct/2.dcm": b"two"})
    dest = extract_archive(archive, out / "input", max_bytes=MB)
    assert (dest / "study" / "ct" / "1.dcm").read_bytes() == b"one"
    assert (dest / "study" / "ct" / "2.dcm").read_bytes() == b"two"
    assert _leftovers(out) == [
        "input",
        "input/study",
        "input/study/ct",
        *["input/study/ct/1.dcm", "input/study/ct/2.dcm"],
    ]


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz"), ("w:bz2", ".tbz")])
def test_tar_in_every_compression_extracts(
    tmp_path: Path, out: Path, mode: str, suffix: str
) -> None:
    folder = tarfile.TarInfo("ct")
    folder.type = tarfile.DIRTYPE
    archive = _tar(tmp_path / f"a{suffix}", [folder, ("ct/image.nii.gz", b"nifti")], mode)
    dest = extract_archive(archive, out / "input", max_bytes=MB)
    assert (dest / "ct" / "image.nii.gz").read_bytes() == b"nifti"


def test_type_comes_from_content_not_name(tmp_path: Path, out: Path) -> None:
    # A zip named .tgz is still a zip; the upload's name never matters.
    archive = _zip(tmp_path / "misnamed.tgz", {"x.txt": b"x"})
    assert (extract_archive(archive, out / "in", max_bytes=MB) / "x.txt").read_bytes() == b"x"


@pytest.mark.parametrize(
    "name",
    ["../evil.txt", "a/../../evil.txt", "/etc/evil", "C:/evil.txt", "..\\evil.txt"],
)
def test_zip_slip_names_are_refused_and_nothing_is_written(
    tmp_path: Path, out: Path, name: str
) -> None:
    archive = _zip(tmp_path / "slip.zip", {"good.txt": b"ok", name: b"pwned"})
    with pytest.raises(UnsafeArchive):
        extract_archive(archive, out / "input", max_bytes=MB)
    assert _leftovers(out) == []
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt", "ct/../../evil.txt"])
def test_tar_slip_names_are_refused(tmp_path: Path, out: Path, name: str) -> None:
    archive = _tar(tmp_path / "slip.tar", [("good.txt", b"ok"), (name, b"pwned")])
    with pytest.raises(UnsafeArchive, match=r"absolute|outside"):
        extract_archive(archive, out / "input", max_bytes=MB)
    assert _leftovers(out) == []
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE]
)
def test_tar_links_devices_and_fifos_are_refused(tmp_path: Path, out: Path, kind: bytes) -> None:
    special = tarfile.TarInfo("ct/special")
    special.type = kind
    special.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    archive = _tar(tmp_path / "special.tar", [("ct/1.dcm", b"x"), special])
    with pytest.raises(UnsafeArchive, match=r"link|device"):
        extract_archive(archive, out / "input", max_bytes=MB)
    assert _leftovers(out) == []


def test_zip_symlink_member_is_refused(tmp_path: Path, out: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ct/1.dcm", b"x")
        link = zipfile.ZipInfo("ct/passwd")
        link.create_system = 3  # Unix: external_attr carries st_mode
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeArchive, match="link"):
        extract_archive(archive, out / "input", max_bytes=MB)
    assert _leftovers(out) == []


def test_archive_over_the_size_limit_is_refused_before_extraction(
    tmp_path: Path, out: Path
) -> None:
    archive = _zip(tmp_path / "big.zip", {"a.bin": b"\0" * (2 * MB)})
    with pytest.raises(UnsafeArchive, match=r"size limit|over the limit"):
        extract_archive(archive, out / "input", max_bytes=MB)
    assert _leftovers(out) == []


def test_zip_bomb_with_huge_ratio_is_refused(tmp_path: Path, out: Path) -> None:
    # 64 MB of zeros deflate to ~64 KB (ratio ~1000:1); the declared size trips the limit.
    archive = tmp_path / "bomb.zip"
    with (
        zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf,
        zf.open("bomb.bin", "w", force_zip64=True) as member,
    ):
        for _ in range(64):
            member.write(b"\0" * MB)
    assert archive.stat().st_size < MB
    with pytest.raises(UnsafeArchive):
        extract_archive(archive, out / "input", max_bytes=8 * MB)
    assert _leftovers(out) == []


def test_zip_that_lies_about_its_size_is_caught_while_extracting(tmp_path: Path, out: Path) -> None:
    # Central directory and local header claim 10 bytes; the data inflates to 4 MB.
    real = b"\0" * (4 * MB)
    archive = _zip(tmp_path / "liar.zip", {"a.bin": real})
    raw = bytearray(archive.read_bytes())
    size_field = len(real).to_bytes(4, "little")
    lie = (10).to_bytes(4, "little")
    count = raw.count(size_field)
    assert count >= 2  # local header and central directory
    raw = bytearray(bytes(raw).replace(size_field, lie))
    archive.write_bytes(bytes(raw))
    with pytest.raises((UnsafeArchive, InvalidRequest)):
        extract_archive(archive, out / "input", max_bytes=2 * MB)
    assert _leftovers(out) == []


def test_too_many_members_is_refused(tmp_path: Path, out: Path) -> None:
    archive = _zip(tmp_path / "many.zip", {f"f{i}.txt": b"" for i in range(20)})
    with pytest.raises(UnsafeArchive, match="more than 10 members"):
        extract_archive(archive, out / "input", max_bytes=MB, max_members=10)
    assert _leftovers(out) == []


def test_encrypted_zip_member_is_refused(tmp_path: Path, out: Path) -> None:
    archive = _zip(tmp_path / "enc.zip", {"a.txt": b"secret"})
    raw = bytearray(archive.read_bytes())
    # Set the "encrypted" general-purpose flag in the local header and the central directory.
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.index(sig)
        raw[at + offset] |= 0x1
    archive.write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchive, match="encrypted"):
        extract_archive(archive, out / "input", max_bytes=MB)
    assert _leftovers(out) == []


@pytest.mark.parametrize("content", [b"", b"not an archive at all", b"PK\x03\x04garbage"])
def test_not_an_archive_is_a_client_error(tmp_path: Path, out: Path, content: bytes) -> None:
    path = tmp_path / "upload"
    path.write_bytes(content)
    with pytest.raises(InvalidRequest):
        extract_archive(path, out / "input", max_bytes=MB)
    assert _leftovers(out) == []


def test_truncated_tar_gz_leaves_nothing(tmp_path: Path, out: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", [("a.bin", bytes(range(256)) * 4096)], "w:gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises((InvalidRequest, UnsafeArchive)):
        extract_archive(archive, out / "input", max_bytes=8 * MB)
    assert _leftovers(out) == []


def test_file_and_folder_with_one_name_is_refused_cleanly(tmp_path: Path, out: Path) -> None:
    archive = _tar(tmp_path / "clash.tar", [("ct", b"file"), ("ct/1.dcm", b"x")])
    with pytest.raises(UnsafeArchive):
        extract_archive(archive, out / "input", max_bytes=MB)
    assert _leftovers(out) == []


def test_member_parts_normalises_harmless_names() -> None:
    assert member_parts("./study//ct/1.dcm") == ("study", "ct", "1.dcm")
    assert member_parts("study\\ct\\1.dcm") == ("study", "ct", "1.dcm")
    assert member_parts("a..b/c..") == ("a..b", "c..")
    with pytest.raises(UnsafeArchive, match="NUL"):
        member_parts("a/\x00b")


def test_study_root_descends_into_a_single_top_folder(tmp_path: Path) -> None:
    (tmp_path / "x" / "study01" / "ct").mkdir(parents=True)
    assert study_root(tmp_path / "x", "ct") == tmp_path / "x" / "study01"
    assert study_root(tmp_path / "x", "study01/ct") == tmp_path / "x"


# --- multipart streaming ------------------------------------------------------------------------
def _multipart(boundary: str, request: str, payload: bytes) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="request"\r\n\r\n{request}\r\n'
            f"--{boundary}\r\nContent-Disposition: form-data; "
            'name="file"; filename="../../x.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096, 10**7])
def test_multipart_parts_survive_any_chunking(tmp_path: Path, chunk: int) -> None:
    payload = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"
    body = _multipart("xyz", '{"nnunet_id": "phantom"}', payload)
    upload = anyio.run(
        lambda: receive_multipart(
            "multipart/form-data; boundary=xyz", _chunks(body, chunk), tmp_path, max_bytes=MB
        )
    )
    assert upload.fields == {"request": '{"nnunet_id": "phantom"}'}
    assert upload.file_path is not None and upload.file_path.parent == tmp_path
    assert upload.file_path.read_bytes() == payload
    assert upload.file_size == len(payload)
    assert "x.zip" not in upload.file_path.name
    upload.discard()
    assert list(tmp_path.iterdir()) == []


def test_multipart_over_the_limit_removes_the_partial_file(tmp_path: Path) -> None:
    body = _multipart("xyz", "{}", b"\1" * (3 * MB))
    with pytest.raises(PayloadTooLarge):
        anyio.run(
            lambda: receive_multipart(
                "multipart/form-data; boundary=xyz",
                _chunks(body, 65536),
                tmp_path,
                max_bytes=2 * MB,
            )
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content_type", ["application/json", "multipart/form-data", "text/plain; boundary=x"]
)
def test_multipart_needs_form_data_with_a_boundary(tmp_path: Path, content_type: str) -> None:
    with pytest.raises(InvalidRequest, match="multipart"):
        anyio.run(lambda: receive_multipart(content_type, _chunks(b"", 1), tmp_path, max_bytes=MB))


def test_multipart_form_data_with_a_preamble_and_an_epilogue(tmp_path: Path) -> None:
    """RFC 2046 5.1.1: what comes before the first delimiter and after the last is ignored."""
    body = b"a preamble\r\n" + _multipart("xyz", "{}", b"PK-bytes") + b"an epilogue\r\n"
    upload = anyio.run(
        lambda: receive_multipart(
            'multipart/form-data; boundary="xyz"', _chunks(body, 5), tmp_path, max_bytes=MB
        )
    )
    assert upload.fields == {"request": "{}"}
    assert upload.file_path is not None and upload.file_path.read_bytes() == b"PK-bytes"
    upload.discard()
