"""Records survive kills: a torn last line is dropped and repaired, canonical files are ordered and deduplicated."""

from __future__ import annotations

import json

import pytest

from speechlm_eval.records import RecordWriter, RecordsError, read_records, write_canonical


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "arm.jsonl"
    with RecordWriter(path) as writer:
        writer.write_many([{"id": "a", "response": "x"}, {"id": "b", "response": "y"}])
    with open(path, "a") as handle:
        handle.write('{"id": "c", "resp')  # what a kill in the middle of a write leaves
    assert [r["id"] for r in read_records(path)] == ["a", "b"]
    assert path.read_text().endswith('"resp')  # reading alone does not modify
    assert [r["id"] for r in read_records(path, repair=True)] == ["a", "b"]
    assert path.read_text().endswith("\n")
    with RecordWriter(path) as writer:
        writer.write_many([{"id": "c", "response": "z"}])
    assert [r["id"] for r in read_records(path)] == ["a", "b", "c"]


def test_malformed_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "arm.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(RecordsError, match=r"arm.jsonl:2"):
        read_records(path)
    path.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(RecordsError, match=r"arm.jsonl:2: a record must be a JSON object"):
        read_records(path)


def test_canonical_file_is_in_item_order_with_one_record_per_id(tmp_path):
    path = tmp_path / "arm.jsonl"
    records = [{"id": "c", "v": 1}, {"id": "a", "v": 2}, {"id": "c", "v": 3}, {"id": "b", "v": 4}]
    write_canonical(path, records, order=["a", "b", "c"])
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"id": "a", "v": 2}, {"id": "b", "v": 4}, {"id": "c", "v": 3}]
    # Same records in another arrival order give the same bytes.
    other = tmp_path / "other.jsonl"
    write_canonical(other, [records[3], records[1], records[0], records[2]], order=["a", "b", "c"])
    assert other.read_bytes() == path.read_bytes()
