"""architectures/utils/files.py: an atomic write leaves the old file or the new one, never half of
one, and the new file gets the mode of any other file the user writes."""

import json
import os

import pytest

from architectures.utils.files import atomic_write, atomic_write_json, read_jsonl


def test_written_files_get_the_users_umask_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"step": 1})

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_read_jsonl_reads_every_line_in_order(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n\n{"step": 2}\n')
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}]
