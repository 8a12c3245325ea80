"""Outputs: written whole or not at all, one line when they cannot be written, no partial files left by the dead."""

import errno
import subprocess

import pytest

from zhllama.artifacts import atomic_file, atomic_output_dir, remove_stale_partials, write_text_atomic
from zhllama.errors import ZhllamaError


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid names no process
    return proc.pid


def test_a_write_that_fails_inside_the_output_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    no_such = pytest.raises(ZhllamaError, match=rf"^cannot write {out}: No such file or directory$")
    with no_such, atomic_output_dir(out) as tmp:
        (tmp / "missing-subfolder" / "x").write_text("y")
    no_space = pytest.raises(ZhllamaError, match=rf"^cannot write {out}.gguf: No space left on device$")
    with no_space, atomic_file(tmp_path / "out.gguf") as tmp:
        tmp.write_bytes(b"GGUF")
        raise OSError(errno.ENOSPC, "No space left on device")  # a full disk names no file
    assert list(tmp_path.iterdir()) == []


def test_an_error_about_another_file_passes_through_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_output_dir(tmp_path / "out"):
        (tmp_path / "an-input").read_text()  # reading an input is not a write error of the output
    assert list(tmp_path.iterdir()) == []


def test_stale_partials_of_dead_runs_go_and_live_ones_stay(tmp_path):
    alive = subprocess.Popen(["sleep", "60"])
    try:
        dead_file = tmp_path / f".model.gguf.partial-{dead_pid()}"
        dead_file.write_bytes(b"\0" * 1000)
        dead_dir = tmp_path / f".model.partial-{dead_pid()}"
        dead_dir.mkdir()
        (dead_dir / "weights").write_bytes(b"\0" * 1000)
        live = tmp_path / f".model.gguf.partial-{alive.pid}"
        live.write_bytes(b"busy")
        other = tmp_path / f".other.gguf.partial-{dead_pid()}"  # another output's: not this run's business
        other.write_bytes(b"")
        write_text_atomic(tmp_path / "model.gguf", "new")
        remove_stale_partials(tmp_path / "model")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.gguf", live.name, other.name])
    finally:
        alive.kill()
        alive.wait()
