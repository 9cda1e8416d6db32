"""What comes back from a worker VM is hostile: whoever controls the VM (an agent that broke out
of its sandbox there, say) writes the tar stream the `vm` driver receives. Only regular files
and folders a runner leaves, bounded, land in the assignment's folder, never through a link."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from workers.vm_driver import FILE_LIMIT, ReturnRefused, receive


def _stream(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _file(name: str, data: bytes = b"{}") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def test_a_runners_outputs_come_back(tmp_path: Path) -> None:
    folder = tarfile.TarInfo("output")
    folder.type = tarfile.DIRTYPE
    stream = _stream(
        _file("result.json"), _file("patch.diff", b"diff"), (folder, b""),
        _file("output/transcript.jsonl", b"{}\n"),
    )  # fmt: skip
    written = receive(stream, tmp_path)
    assert written == ["result.json", "patch.diff", "output/transcript.jsonl"]
    assert (tmp_path / "output" / "transcript.jsonl").read_bytes() == b"{}\n"


@pytest.mark.parametrize(
    "member",
    [
        _special("result.json", tarfile.SYMTYPE, "/etc/shadow"),
        _special("result.json", tarfile.LNKTYPE, "spec.json"),
        _special("output/x", tarfile.SYMTYPE, "../../../../root/.ssh/authorized_keys"),
        _special("output/dev", tarfile.CHRTYPE),
        _special("output/fifo", tarfile.FIFOTYPE),
        _file("spec.json"),  # the host's spec, with its credential: never overwritten
        _file("runner.pgid"),
        _file("workspace/evil.py"),
        _file("../escape.json"),
        _file("/etc/cron.d/x"),
        _file("output/../../result.json"),
        _file("result.json/inner"),
    ],
    ids=lambda m: f"{m[0].name}:{m[0].type!r}",
)
def test_anything_else_is_refused_and_nothing_is_written(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes]
) -> None:
    artifacts = tmp_path / "a"
    artifacts.mkdir()
    with pytest.raises(ReturnRefused):
        receive(_stream(_file("patch.diff", b"first"), member), artifacts)
    assert list(artifacts.iterdir()) == []  # checked whole before anything is written


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("agent.log")
    info.size = FILE_LIMIT + 1
    header = info.tobuf(tarfile.GNU_FORMAT)  # the header alone claims the size
    with pytest.raises(ReturnRefused, match="over"):
        receive(header + b"\0" * 1024, tmp_path)


def test_a_link_planted_in_the_folder_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    artifacts = tmp_path / "a"
    artifacts.mkdir()
    (artifacts / "result.json").symlink_to(outside)
    (artifacts / "output").symlink_to(tmp_path)
    with pytest.raises(OSError):
        receive(_stream(_file("result.json", b"{}")), artifacts)
    with pytest.raises(OSError):
        receive(_stream(_file("output/transcript.jsonl")), artifacts)
    assert outside.read_text() == "untouched"
    assert not (tmp_path / "transcript.jsonl").exists()
