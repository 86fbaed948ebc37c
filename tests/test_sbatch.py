"""`hvbatch sbatch`: the plain sbatch scripts, rendered for hostile paths and config values, and run
on the real single-node Slurm cluster (8 fake GPUs, accounting) with nothing but `sbatch <file>`."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hvbatch.batch.control.commands import create_run, job_plan, plan_shards
from hvbatch.batch.control.prompts import read_prompts
from hvbatch.batch.executors.sbatch import render
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from hvbatch.config import load_config
from tests.batch_helpers import EXAMPLE_CONFIG, EXAMPLE_PROMPTS, assert_every_video_done_once
from tests.slurm_cluster import SlurmCluster, wait_for_sacct_state

pytest_plugins = ["tests.slurm_cluster"]

# Spaces, a quote, unicode, a command substitution (run relative to the job's working directory)
# and an sbatch filename pattern (%j must stay literal in --output).
HOSTILE_NAME = "run dir 'é' $(touch pwned) %j"
PARTITION = "debug; touch pwned"
COMMENT = '$(reboot) and `reboot` "spaces" it\'s a \\back\\slash # not a comment'
SHELL_SPECIALS = set("$`;&|()<>\\")
TEMPLATES = ("node", "multinode", "array")


def make_run(root: Path, overrides: list[str] | None = None, **slurm: object) -> RunDir:
    """A run of the bundled example, made as `hvbatch submit` makes it; `slurm` values set as given."""
    config = load_config(EXAMPLE_CONFIG, overrides or [])
    for key, value in slurm.items():
        setattr(config.slurm, key, value)
    videos = read_prompts(EXAMPLE_PROMPTS, config.sampling)
    shards = plan_shards(config, videos, job_plan(config, videos))
    run = RunDir(root)
    create_run(run, config, EXAMPLE_PROMPTS, shards, "slurm")
    return run


def render_cli(run: RunDir, template: str, out: Path, *extra: str) -> str:
    assert main(["sbatch", str(run.root), "--template", template, "--out", str(out), *extra]) == 0
    return out.read_text()


def sbatch_lines(script: str) -> dict[str, str]:
    """`#SBATCH --name=value` lines as {name: value}, each read as one POSIX shell word."""
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            words = shlex.split(line[len("#SBATCH ") :])
            assert len(words) == 1, line
            name, _, value = words[0].partition("=")
            options[name] = value
    return options


def outside_single_quotes(line: str) -> str:
    """The characters of a shell line that bash reads outside single quotes."""
    out, state, i = [], "", 0
    while i < len(line):
        ch = line[i]
        if state == "'":
            state = "" if ch == "'" else state
        elif ch == "'" and state == "":
            state = "'"
        else:
            if ch == '"':
                state = "" if state == '"' else '"'
            out.append(ch)
        i += 1
    assert state == "", f"unterminated quote in {line!r}"
    return "".join(out)


def run_with_fake_srun(script: Path, workdir: Path, task_id: int | None = None) -> list[str]:
    """Execute the script with bash and an `srun` that records its argv; return that argv."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "srun"
    fake.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGV"\n')
    fake.chmod(0o755)
    argv_file = workdir / "srun.argv"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SRUN_ARGV": str(argv_file)}
    env.pop("SLURM_ARRAY_TASK_ID", None)
    if task_id is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(task_id)
    proc = subprocess.run(["bash", str(script)], cwd=workdir, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return argv_file.read_bytes().decode().split("\0")[:-1]


# ------------------------------------------------------------------------------ rendering


def test_every_template_quotes_paths_and_config_values(tmp_path: Path) -> None:
    run = make_run(
        tmp_path / HOSTILE_NAME,
        partition=PARTITION,
        additional_parameters={"comment": COMMENT, "mail_user": "a b@c", "exclusive": ""},
    )
    assert run.num_shards() == 2
    workdir = tmp_path / "work"
    workdir.mkdir()
    for template in TEMPLATES:
        script = workdir / f"{template}.sbatch"
        text = render_cli(run, template, script)
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, template
        options = sbatch_lines(text)
        log_name = "%A_%a.out" if template == "array" else "%j.out"
        assert options["--job-name"] == f"hvbatch-{HOSTILE_NAME}"
        assert options["--output"] == f"{run.root}/logs/{log_name}".replace("%j/", "%%j/")
        assert options["--partition"] == PARTITION
        assert options["--mail-user"] == "a b@c"  # underscores become dashes, as submitit writes them
        assert options["--exclusive"] == ""
        assert options["--nodes"] == "1" and options["--ntasks-per-node"] == "8"
        assert options["--gpus-per-node"] == "8" and options["--time"] == "30"
        assert options.get("--array") == ("0,1%256" if template == "array" else None)
        # The dangerous text sits inside single quotes only, on every line bash or sbatch reads.
        assert "#SBATCH --partition='debug; touch pwned'" in text.splitlines()
        for line in text.splitlines():
            if line.startswith("#SBATCH") or line.startswith("srun"):
                specials = SHELL_SPECIALS & set(outside_single_quotes(line))
                expected = set("${}") if "SLURM_ARRAY_TASK_ID" in line else set()
                assert specials <= expected, (line, specials)
        # What bash really passes to srun: the exact path and shards, and nothing is executed.
        argv = run_with_fake_srun(script, workdir, task_id=1 if template == "array" else None)
        shards = ["1"] if template == "array" else ["0", "1"]
        assert argv == [
            "--kill-on-bad-exit=1",
            sys.executable,
            "-m",
            "hvbatch",
            "run-shard",
            str(run.root),
            *shards,
        ]
    assert not (workdir / "pwned").exists() and not (run.root / "pwned").exists()
    # sbatch's own parser reads a backslash as an escape even inside single quotes: it is doubled.
    assert "#SBATCH --comment='$(reboot) and `reboot` \"spaces\" it'\"'\"'s a \\\\back\\\\slash # not" in text


def test_unsafe_values_and_option_names_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A line break would end the #SBATCH comment and make the rest a command of the job script.
    for n, slurm in enumerate(
        [
            {"partition": "debug\ntouch pwned"},
            {"account": "me\r\nreboot"},
            {"additional_parameters": {"comment": "x\ntouch pwned"}},
        ]
    ):
        run = make_run(tmp_path / f"newline{n}", **slurm)
        with pytest.raises(ValueError, match="line break or control character"):
            render(run, "node", [0])
        out = tmp_path / f"newline{n}.sbatch"
        assert main(["sbatch", str(run.root), "--template", "array", "--out", str(out)]) == 2
        assert "line break or control character" in capsys.readouterr().err and not out.exists()
    for n, name in enumerate(["x; reboot", "a$(b)", "gres=gpu:1 --wrap", "", "comment\nreboot"]):
        run = make_run(tmp_path / f"name{n}", additional_parameters={name: "1"})
        for template in TEMPLATES:
            with pytest.raises(ValueError, match="is not a valid sbatch option"):
                render(run, template, [0])
    # sbatch drops backslashes from --output paths; a run directory with one cannot get its logs.
    run = make_run(tmp_path / "back\\slash")
    with pytest.raises(ValueError, match="backslash"):
        render(run, "array", [0, 1])
    # And a line break in the run directory's name (job name, log path) is refused too: already
    # when the run is created, before anything is written.
    with pytest.raises(ValueError, match="line break"):
        make_run(tmp_path / "line\nbreak")
    assert not (tmp_path / "line\nbreak").exists()


def test_shards_selection_and_completed_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run")
    out = tmp_path / "job.sbatch"
    assert sbatch_lines(render_cli(run, "array", out, "--shards", "1"))["--array"] == "1%256"
    node = render_cli(run, "node", out, "--shards", "1")
    srun = next(line for line in node.splitlines() if line.startswith("srun "))
    assert srun.endswith("run-shard " + str(run.root) + " 1")
    finish = next(line for line in node.splitlines() if " finish " in line)  # after srun: retry or give up
    assert finish.endswith(' "$status" "$log_offset" 1')
    multinode = render_cli(run, "multinode", out, "--shards", "1,0")
    assert next(line for line in multinode.splitlines() if line.startswith("srun ")).endswith(" 1 0")
    for bad in ("2", "-1", "0,0"):
        assert main(["sbatch", str(run.root), "--template", "node", "--shards", bad]) == 2
        assert "give distinct shard indices in 0..1" in capsys.readouterr().err
    # The default is every unfinished shard: shard 0 done leaves shard 1.
    marker = run.done_marker(0)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"shard": 0, "videos": 2, "done": 2, "failed": 0}))
    assert sbatch_lines(render_cli(run, "array", out))["--array"] == "1%256"
    node = render_cli(run, "node", out).splitlines()
    assert next(line for line in node if line.startswith("srun ")).endswith(" 1")
    # A shard whose marker counts failed videos is rendered again; rendering changes nothing (the
    # job reopens it when it starts, as retry does: see test_control_plane).
    run.done_marker(1).write_text(json.dumps({"shard": 1, "videos": 4, "done": 3, "failed": 1}))
    assert sbatch_lines(render_cli(run, "array", out))["--array"] == "1%256"
    assert run.done_marker(1).exists() and marker.exists()
    register = next(line for line in node if " register " in line)  # before srun: record the job
    assert register.endswith(f"register {run.root} 1")
    # Every shard complete: a clear error for every template (an empty --array=%256 means index 0).
    run.done_marker(1).write_text(json.dumps({"shard": 1, "videos": 4, "done": 4, "failed": 0}))
    capsys.readouterr()
    for template in TEMPLATES:
        assert main(["sbatch", str(run.root), "--template", template]) == 2
        assert "every shard is complete; nothing to render" in capsys.readouterr().err
        with pytest.raises(ValueError, match="every shard is complete"):
            render(run, template, [])


# --------------------------------------------------------------------------- on the cluster


def _logs(run_dir: Path) -> str:
    parts = [f"---- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*.out"))]
    return "\n".join(parts) or "(no job logs)"


def test_array_script_runs_every_video_once(
    tmp_path: Path, slurm_env: SlurmCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / HOSTILE_NAME)
    workdir = tmp_path / "work"
    workdir.mkdir()
    script = workdir / "array.sbatch"
    render_cli(run, "array", script)
    env = dict(os.environ)  # SLURM_CONF, PATH and PYTHONPATH from the slurm_env fixture
    submitted = subprocess.run(["sbatch", str(script)], cwd=workdir, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    array_id = submitted.stdout.split()[-1]  # "Submitted batch job N"
    assert array_id.isdigit(), submitted.stdout
    deadline = time.monotonic() + 240
    while slurm_env.run(["squeue", "-h", "-j", array_id]).strip():
        assert time.monotonic() < deadline, f"array {array_id} still queued after 240 s\n{_logs(run.root)}"
        time.sleep(1)
    assert run.completed_shards() == {0, 1}, _logs(run.root)
    assert_every_video_done_once(run.root, capsys)
    elements = [f"{array_id}_{i}" for i in range(run.num_shards())]
    for element in elements:
        assert wait_for_sacct_state(element, slurm_env.env, timeout=60) == "COMPLETED"
        name = slurm_env.run(["sacct", "-X", "-n", "-P", "-o", "JobName", "-j", element]).strip()
        assert name == f"hvbatch-{HOSTILE_NAME}"  # sbatch read the quoted job name back exactly
    # The logs are where --output says (the run directory's '%j' stayed literal), one per element.
    assert sorted(p.name for p in (run.root / "logs").iterdir()) == [f"{e}.out" for e in elements]
    metrics = [pq.read_table(p).to_pylist()[0] for p in sorted((run.root / "metrics").glob("*.parquet"))]
    assert sorted((m["job_id"], m["array_index"]) for m in metrics) == [
        (e, i) for i, e in enumerate(elements)
    ]
    for row in metrics:
        assert row["world_size"] == 8 and row["dp"] * row["ulysses"] * row["ring"] == 8
        assert row["exit_reason"] == "completed" and len(row["peak_memory_bytes"]) == 8
    assert not (workdir / "pwned").exists() and not (run.root / "pwned").exists()
    # Each element recorded itself like a submitted job: status knows the run's jobs.
    recorded = [(r["job_id"], r["executor"]) for s in run.submissions() for r in s["jobs"]]
    assert sorted(recorded) == [(e, "sbatch") for e in elements]


def test_sbatch_accepts_node_and_multinode_scripts(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    run = make_run(tmp_path / HOSTILE_NAME, ["slurm.nodes=1"], additional_parameters={"comment": COMMENT})
    for template in ("node", "multinode"):
        script = tmp_path / f"{template}.sbatch"
        render_cli(run, template, script)
        proc = subprocess.run(
            ["sbatch", "--test-only", str(script)], env=slurm_cluster.env, capture_output=True, text=True
        )
        assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr
        assert "using 8 processors on nodes" in proc.stderr
    # sbatch reads the quoted values back exactly: a held job shows its name and comment.
    job_id = slurm_cluster.run(["sbatch", "--parsable", "--hold", str(tmp_path / "node.sbatch")]).strip()
    try:
        shown = slurm_cluster.run(["squeue", "-h", "-j", job_id, "-o", "%j\t%k"]).rstrip("\n")
        assert shown == f"hvbatch-{HOSTILE_NAME}\t{COMMENT}"
    finally:
        slurm_cluster.run(["scancel", job_id])
    # A hostile partition reaches Slurm as one partition name (and so is refused by name).
    hostile = make_run(tmp_path / "partition", partition=PARTITION)
    script = tmp_path / "partition.sbatch"
    render_cli(hostile, "node", script)
    proc = subprocess.run(
        ["sbatch", "--test-only", str(script)], env=slurm_cluster.env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and f"invalid partition specified: {PARTITION}" in proc.stderr, proc.stderr
    assert not (tmp_path / "pwned").exists()
