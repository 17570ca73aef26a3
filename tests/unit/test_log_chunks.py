"""Chunks of a followed file, read from a real file."""

from __future__ import annotations

from pathlib import Path

import bson

from services.logging.chunks import MAX_LINES, MAX_READ, Followed, read_chunk
from services.logging.store import chunk_bucket

DOCUMENT_LIMIT = 16 * 1024 * 1024


def test_a_partial_last_line_waits_for_its_end_except_in_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "apps" / "a.log"
    path.parent.mkdir()
    path.write_bytes(b"one\ntw")
    state = Followed(inode=path.stat().st_ino, offset=0)
    chunk = read_chunk(path=path, key=str(path), state=state, final=False)
    assert chunk is not None
    assert ([r["message"] for r in chunk.records], chunk.end, chunk.full) == (["one"], 4, False)
    assert chunk.chunk_id == f"tail:{path}:{state.inode}:0"
    state.offset = chunk.end
    assert read_chunk(path=path, key=str(path), state=state, final=False) is None
    rotated = read_chunk(path=path, key=str(path), state=state, final=True)
    assert rotated is not None
    assert ([r["message"] for r in rotated.records], rotated.end) == (["tw"], 6)


def test_a_file_of_short_lines_is_read_in_chunks_the_database_can_store(tmp_path: Path) -> None:
    path = tmp_path / "apps" / "dots.log"
    path.parent.mkdir()
    path.write_bytes(b".\n" * (MAX_READ // 2))
    state = Followed(inode=path.stat().st_ino, offset=0)
    chunk = read_chunk(path=path, key=str(path), state=state, final=False)
    assert chunk is not None
    assert (len(chunk.records), chunk.end, chunk.full) == (MAX_LINES, 2 * MAX_LINES, True)
    assert len(bson.encode(chunk_bucket(chunk))) < DOCUMENT_LIMIT
    state.offset = chunk.end
    following = read_chunk(path=path, key=str(path), state=state, final=False)
    assert following is not None
    assert following.records[0]["_id"] == f"{state.inode}:{2 * MAX_LINES}"


APP_ID = "0123456789abcdef0123456789abcdef"


def _records(path: Path, text: bytes) -> list[dict[str, object]]:
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(text)
    state = Followed(inode=path.stat().st_ino, offset=0)
    chunk = read_chunk(path=path, key=str(path), state=state, final=False)
    assert chunk is not None
    return chunk.records


def test_an_app_cannot_forge_the_level_template_or_id_of_its_records(tmp_path: Path) -> None:
    forged = (
        b'{"message": "all is lost", "level": "critical", "template": "jupyter", '
        b'"id": "ffffffffffffffffffffffffffffffff", "service": "deploy-kubernetes"}\n'
    )
    (record,) = _records(tmp_path / "apps" / f"{APP_ID}.log", forged)
    assert record["level"] == "info"
    assert "template" not in record
    assert (record["service"], record["id"]) == ("app", APP_ID)
    assert record["message"] == forged.decode().rstrip("\n")  # the whole line, as text


def test_the_suites_own_json_lines_keep_their_level_and_fields(tmp_path: Path) -> None:
    line = b'{"message": "m", "level": "warning", "template": "example"}\n'
    (record,) = _records(tmp_path / "deploy-kubernetes.out.log", line)
    assert (record["level"], record["template"], record["message"]) == ("warning", "example", "m")


def test_a_line_with_a_40000_digit_number_is_stored_as_text(tmp_path: Path) -> None:
    line = b'{"message": "m", "level": "error", "n": ' + b"1" * 40_000 + b"}\n"
    (record,) = _records(tmp_path / "logging.err.log", line)
    assert record["message"] == line.decode().rstrip("\n")
