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
