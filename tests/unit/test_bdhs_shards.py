"""Resumable shards: torn tails are ignored and cut, settings are pinned, records are split by id."""

from __future__ import annotations

import json

import pytest

from mmalign.sampling.shards import ResumeError, ShardWriter, init_work_dir, owner, read_entries, work_dir_for


def test_owner_is_a_stable_partition_by_id():
    ids = [f"r{i}" for i in range(1000)]
    split = [owner(i, 3) for i in ids]
    assert split == [owner(i, 3) for i in ids]
    assert set(split) == {0, 1, 2}
    assert all(abs(split.count(p) - 333) < 60 for p in range(3))
    assert {owner(i, 1) for i in ids} == {0}


def test_work_dir_sits_beside_the_output(tmp_path):
    assert work_dir_for(tmp_path / "out.jsonl") == tmp_path / ".out.jsonl.parts"


def test_settings_are_pinned(tmp_path):
    init_work_dir(tmp_path / "w", {"bdhs": {"rho": 0.99}, "model": "m"})
    init_work_dir(tmp_path / "w", {"bdhs": {"rho": 0.99}, "model": "m"})
    with pytest.raises(ResumeError, match=r"other settings \(bdhs differ\)"):
        init_work_dir(tmp_path / "w", {"bdhs": {"rho": 0.5}, "model": "m"})


def test_torn_tail_is_ignored_then_cut_by_its_owner(tmp_path):
    writer = ShardWriter(tmp_path, 0)
    writer.append([{"id": "a", "x": 1}, {"id": "b", "x": 2}])
    with open(writer.path, "a") as handle:
        handle.write('{"id": "c", "x"')  # a kill in the middle of a write
    assert sorted(read_entries(tmp_path)) == ["a", "b"]
    ShardWriter(tmp_path, 1).append([{"id": "d", "x": 4}])
    again = ShardWriter(tmp_path, 0)  # restart: the owner cuts the torn line before appending
    again.append([{"id": "c", "x": 3}])
    lines = writer.path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "c"]
    assert read_entries(tmp_path) == {k: {"id": k, "x": v} for k, v in zip("abcd", (1, 2, 3, 4))}


def test_duplicate_or_corrupt_entries_are_refused(tmp_path):
    ShardWriter(tmp_path, 0).append([{"id": "a"}])
    ShardWriter(tmp_path, 1).append([{"id": "a"}])
    with pytest.raises(ResumeError, match="record 'a' is already in another shard entry"):
        read_entries(tmp_path)
    (tmp_path / "shard-00001.jsonl").write_text("not json\n")
    with pytest.raises(ResumeError, match="shard-00001.jsonl, line 1: corrupt shard entry"):
        read_entries(tmp_path)
