"""Run directories no one else controls, and writes that never follow a link hvbatch did not make."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pyarrow as pa
import pytest

from hvbatch.batch.control.commands import create_run
from hvbatch.batch.files import UnsafePath, write_atomic, write_json_atomic, write_parquet_atomic
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from hvbatch.config import load_config, save_config
from tests.batch_helpers import EXAMPLE_CONFIG
from tests.fault_helpers import FAULT_PROMPTS, submit_argv, write_prompts

NOBODY = pwd.getpwnam("nobody").pw_uid


def _submit_refused(tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    prompts = write_prompts(tmp_path / "prompts.parquet", FAULT_PROMPTS[:1])
    capsys.readouterr()
    assert main([*submit_argv(prompts, run_dir, "local")]) == 2
    return capsys.readouterr().err


def test_submit_refuses_a_directory_that_another_user_owns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "theirs"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, NOBODY, -1)
    err = _submit_refused(tmp_path, run_dir, capsys)
    assert f"--run-dir {run_dir} belongs to nobody (uid {NOBODY}), not to you (root (uid 0))" in err
    assert "could change the run's config and the code its jobs run" in err and "Choose a directory" in err
    assert list(run_dir.iterdir()) == [] and run_dir.stat().st_uid == NOBODY  # nothing written, still theirs


@pytest.mark.parametrize(("mode", "who"), [(0o777, "group and others"), (0o720, "group"), (0o1703, "others")])
def test_submit_refuses_a_directory_that_others_can_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int, who: str
) -> None:
    run_dir = tmp_path / "open"
    run_dir.mkdir()
    run_dir.chmod(mode)
    err = _submit_refused(tmp_path, run_dir, capsys)
    assert f"--run-dir {run_dir} is writable by {who} (mode {mode:04o})" in err
    assert f"`chmod go-w {run_dir}` first" in err
    assert list(run_dir.iterdir()) == [] and (run_dir.stat().st_mode & 0o7777) == mode


def _small_run(tmp_path: Path) -> RunDir:
    prompts = write_prompts(tmp_path / "prompts.parquet", FAULT_PROMPTS[:1])
    run = RunDir(tmp_path / "run")
    config = load_config(EXAMPLE_CONFIG)
    video = {"video_id": "v", "prompt": "p", "seed": 0, "height": 48, "width": 64, "num_frames": 5}
    create_run(run, config, prompts, [pa.Table.from_pylist([video])], "local")
    return run


def test_report_replaces_a_planted_link_instead_of_writing_through_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _small_run(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run.root / "report.html").symlink_to(victim)
    assert main(["report", str(run.root), "--no-thumbnails"]) == 0
    assert victim.read_text() == "precious"
    report = run.root / "report.html"
    assert not report.is_symlink() and "<html" in report.read_text()
    # `--out` naming a link elsewhere: the link itself is replaced, its target left alone.
    elsewhere = tmp_path / "out" / "mine.html"
    elsewhere.parent.mkdir()
    elsewhere.symlink_to(victim)
    assert main(["report", str(run.root), "--no-thumbnails", "--out", str(elsewhere)]) == 0
    assert victim.read_text() == "precious" and not elsewhere.is_symlink()


def test_save_config_uses_a_unique_temporary_and_never_follows_a_link(tmp_path: Path) -> None:
    config = load_config(EXAMPLE_CONFIG)
    folder = tmp_path / "run"
    folder.mkdir()
    victim = tmp_path / "victim.yaml"
    victim.write_text("precious")
    (folder / "config.yaml").symlink_to(victim)
    (folder / ".config.yaml.tmp").symlink_to(victim)  # the fixed temporary name of old versions
    save_config(config, folder / "config.yaml")
    assert victim.read_text() == "precious"
    assert not (folder / "config.yaml").is_symlink()
    assert load_config(folder / "config.yaml").model.name == config.model.name
    assert sorted(p.name for p in folder.iterdir()) == [".config.yaml.tmp", "config.yaml"]


def test_run_writes_refuse_a_folder_that_is_a_link(tmp_path: Path) -> None:
    run = _small_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run.root / "done").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafePath, match=r"done: it is a symbolic link .* which hvbatch did not make"):
        write_json_atomic(run.done_marker(0), {"shard": 0})
    (run.root / "manifest").symlink_to(elsewhere, target_is_directory=True)
    table = pa.table({"a": [1]})
    with pytest.raises(UnsafePath):
        write_parquet_atomic(run.manifest_part(0, "job1.a0", 0), table)
    assert list(elsewhere.iterdir()) == []


def test_the_atomic_writer_never_opens_an_existing_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hvbatch.batch import files

    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "f.json"
    # Someone guessed the temporary name and planted a link there: the write fails, nothing is followed.
    monkeypatch.setattr(files, "tmp_name", lambda name, tag="": ".guessed.tmp")
    (tmp_path / ".guessed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_atomic(target, lambda handle: handle.write(b"new"))
    assert victim.read_text() == "precious" and not target.exists()
