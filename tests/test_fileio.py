"""Atomic writes leave files with the permissions open() would give them, never mkstemp's 0600."""

import os
import stat
import subprocess
import sys

from blueberry.fileio import write_json_atomic


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
