"""coopipe.atomic: a write that fails midway leaves the old file intact and no temporary file behind."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from coopipe.atomic import atomic_write, write_bytes, write_json, write_text


class Boom(RuntimeError):
    pass


def _fail_midway(tmp: Path) -> None:
    tmp.write_text("half of the new cont", encoding="utf-8")  # some bytes reach the temporary file...
    raise Boom("killed while writing")  # ...then the writer dies


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path):
    target = tmp_path / "history.tsv"
    write_text(target, "old content\n")
    with pytest.raises(Boom):
        atomic_write(target, _fail_midway)
    assert target.read_text(encoding="utf-8") == "old content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.tsv"]


def test_failed_first_write_creates_nothing(tmp_path: Path):
    target = tmp_path / "new" / "summary.json"
    with pytest.raises(Boom):
        atomic_write(target, _fail_midway)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_failed_json_encoding_keeps_old_file(tmp_path: Path):
    target = tmp_path / "metrics.json"
    write_json(target, {"accuracy": 0.5})
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()}, default=None)  # not JSON-serialisable: fails before any rename
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_writes_replace_content_with_readable_mode(tmp_path: Path):
    target = tmp_path / "a" / "b.bin"
    write_bytes(target, b"\x00\x01")
    write_bytes(target, b"\x02")
    assert target.read_bytes() == b"\x02"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    write_json(tmp_path / "x.json", {"n": 1, "f": 0.25}, indent=None, separators=(",", ":"))
    assert (tmp_path / "x.json").read_text() == '{"n":1,"f":0.25}\n'


def test_temporary_name_keeps_the_suffix(tmp_path: Path):
    """Writers that choose a format from the extension (savefig, faiss) see the target's suffix."""
    seen: list[str] = []
    atomic_write(tmp_path / "fig.png", lambda tmp: (seen.append(tmp.suffix), tmp.write_bytes(b"png"))[-1])
    assert seen == [".png"]
    assert (tmp_path / "fig.png").read_bytes() == b"png"
