"""Atomic writes leave files with the permissions open() would give them, never mkstemp's 0600."""

import json
import os
import stat
import subprocess
import sys

import pytest

from blueberry.fileio import atomic_writer, write_json_atomic


def test_an_atomic_write_gets_the_permissions_of_any_new_file(tmp_path):
    # A run record on a shared runs root must be as readable as metrics.jsonl, which open() creates.
    probe = (
        "import os, sys; os.umask(0o022); from blueberry.fileio import write_json_atomic; "
        "write_json_atomic(sys.argv[1], {'a': 1}); open(sys.argv[2], 'w').close()"
    )
    written, opened = tmp_path / "status.json", tmp_path / "metrics.jsonl"
    subprocess.run([sys.executable, "-c", probe, str(written), str(opened)], check=True)
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(opened.stat().st_mode) == 0o644
    write_json_atomic(tmp_path / "again.json", {"b": 2})  # this process's umask, whatever it is
    os.close(os.open(tmp_path / "plain", os.O_CREAT | os.O_WRONLY, 0o666))
    assert stat.S_IMODE((tmp_path / "again.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_a_measurements_outputs_are_standard_json_and_its_table(tmp_path):
    """bench, its comparison and gpu-check write their JSON and markdown through one function: a NaN figure stays
    standard JSON (json.dumps would write the bare NaN that strict readers refuse)."""
    from blueberry.fileio import write_results

    path = write_results(tmp_path / "out", "quick", {"mfu": float("nan"), "x": 1}, "| a |\n", mode=0o640)
    assert path == tmp_path / "out" / "quick.json"
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {"mfu": "nan", "x": 1}
    assert (tmp_path / "out" / "quick.md").read_text() == "| a |\n"
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["quick.json", "quick.md"]  # no temp files left


def test_a_write_the_disk_refuses_names_the_file_and_leaves_nothing(tmp_path):
    """ENOSPC from write()/flush() carries no file name: the CLI's one line would say 'a file'."""
    import errno

    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "REPORT.md"
    with pytest.raises(OSError) as error, atomic_writer(target) as handle:
        handle.write("x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a full disk's write raises it
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(target)
    assert list(target.parent.iterdir()) == []
