"""Posted log records: what no database document could hold is mended, not a failed write."""

from __future__ import annotations

import bson

from services.logging.ingest import parse_body


def test_a_lone_surrogate_escape_is_mended_and_a_pair_kept() -> None:
    body = b'[{"service": "x", "message": "a \\ud800 b \\ud83d\\ude00", "extra": ["\\udfff"]}]'
    records, refused = parse_body(body)
    assert refused == []
    assert records[0]["message"] == "a ? b \U0001f600"
    assert records[0]["extra"] == ["?"]
    bson.encode(records[0])  # storable


def test_json_lines_are_mended_too() -> None:
    records, refused = parse_body(b'{"service": "x", "message": "\\ud800"}\n')
    assert refused == []
    assert records[0]["message"] == "?"
