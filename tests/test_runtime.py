"""Bad input against bugs: ``runtime.run_job`` ends a job on a ``UsageError`` with one line and exit
status 2, and lets every other exception through with its traceback; the library raises
``UsageError`` where it checks what the user gave, and plain errors where its own code failed."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from lapo_ray import MissingPathError, UsageError, storage
from lapo_ray.config import PRETRAIN_PRESETS
from lapo_ray.data.corpus import CorpusError
from lapo_ray.data.sources import open_source
from lapo_ray.runtime import run_job


def _raising(error: BaseException):
    def body():
        raise error
    return body


def _reshape_bug():
    np.zeros(3).reshape(2, 2)


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("LAPO_DEBUG", raising=False)


@pytest.mark.parametrize("error", [UsageError("--seeds must be at least 1, got 0"),
                                   MissingPathError("/data/coinrun: no such directory"),
                                   CorpusError("/data/v/a.mp4: video has 1 frame(s); a triplet needs at least 3")])
def test_a_usage_error_is_one_line_on_stderr_and_exit_2(error, capsys):
    assert run_job(_raising(error)) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {error}\n" and captured.out == ""


@pytest.mark.parametrize("body, kind, message", [
    (_reshape_bug, ValueError, "cannot reshape array of size 3 into shape (2,2)"),
    (lambda: np.arange(3)[5], IndexError, "index 5 is out of bounds"),
    (lambda: storage.read_bytes("/nonexistent/state.json"), FileNotFoundError, "/nonexistent/state.json: no such file"),
    (_raising(RuntimeError("CUDA error: an illegal memory access")), RuntimeError, "illegal memory access"),
])
def test_any_other_error_is_a_bug_that_keeps_its_traceback(body, kind, message, capsys):
    with pytest.raises(kind, match=re.escape(message)) as got:
        run_job(body)
    assert not isinstance(got.value, UsageError)
    assert got.value.__traceback__ is not None
    assert capsys.readouterr().err == ""


def test_lapo_debug_shows_the_traceback_of_a_usage_error_too(monkeypatch, capsys):
    monkeypatch.setenv("LAPO_DEBUG", "1")
    with pytest.raises(UsageError, match="--seeds must be at least 1"):
        run_job(_raising(UsageError("--seeds must be at least 1, got 0")))
    assert capsys.readouterr().err == ""
    assert run_job(lambda: None) == 0


def test_usage_errors_stay_what_callers_already_catch():
    # Code and tests that catch ValueError (or FileNotFoundError for a missing path) still do.
    with pytest.raises(ValueError, match="no such directory"):
        raise MissingPathError("x: no such directory")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        raise MissingPathError("x: no such directory")
    assert not issubclass(UsageError, OSError)


def test_a_folder_the_user_names_is_checked_as_input(tmp_path):
    with pytest.raises(MissingPathError, match=f"{tmp_path / 'nowhere'}: no such directory"):
        open_source(str(tmp_path / "nowhere"))
    (tmp_path / "one.mp4").write_bytes(b"")
    with pytest.raises(UsageError, match=f"{tmp_path / 'one.mp4'}: not a directory; give the folder"):
        open_source(str(tmp_path / "one.mp4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="the folder is empty") as got:
        open_source(str(tmp_path / "empty"))
    assert isinstance(got.value, UsageError)


def test_a_stored_file_that_is_not_json_is_bad_input(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"config.json: not valid JSON \(Expecting property name"):
        storage.read_json(str(tmp_path / "config.json"))
    (tmp_path / "ok.json").write_text(json.dumps({"step": 3}))
    assert storage.read_json(str(tmp_path / "ok.json")) == {"step": 3}


@pytest.mark.parametrize("size, ok", [(64, True), (4, True), (48, False), (2, False), (0, False)])
def test_a_frame_size_the_world_model_cannot_halve_to_2x2_is_a_flag_error(size, ok):
    cfg = PRETRAIN_PRESETS["cpu"]()
    cfg.model.frame_size = size
    if ok:
        cfg.validate()
        return
    with pytest.raises(UsageError, match=f"--model.frame-size must be a power of two >= 4 .*got {size}$"):
        cfg.validate()
