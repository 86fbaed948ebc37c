"""One owner of a job's nodes and GPUs (`slurm.nodes` x `slurm.gpus_per_node`): plan, --dry-run,
doctor and the jobs all use it, as a user types it on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hvbatch.cli import main
from hvbatch.config import load_config
from tests.test_generate import EXAMPLE


def _out(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_plan_dry_run_and_doctor_follow_slurm_nodes_and_gpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "one.parquet"
    pq.write_table(pa.table({"prompt": ["a cat"]}), prompts)
    config = ["--config", str(EXAMPLE)]
    two_nodes = "(throughput; 16 GPUs = 2 nodes x 8, 1 per video)"
    assert two_nodes in _out(capsys, "plan", *config, "slurm.nodes=2")  # no prompts file
    dry = _out(capsys, "plan", str(prompts), *config, "slurm.nodes=2")
    assert two_nodes in dry and "idle GPUs: 15 of 16 GPUs idle in the job" in dry
    assert json.loads(_out(capsys, "plan", "--json", *config, "slurm.nodes=2"))["world_size"] == 16
    four = "(throughput; 4 GPUs = 1 node x 4, 1 per video)"
    assert four in _out(capsys, "plan", *config, "slurm.gpus_per_node=4")
    assert four in _out(capsys, "submit", str(prompts), *config, "--dry-run", "slurm.gpus_per_node=4")
    doctor = _out(capsys, "doctor", *config, "batch.executor=local", "slurm.gpus_per_node=4")
    assert "plan: dp 4 x ulysses 1 x ring 1 on 1 x 4 GPUs" in doctor
    # The older names still work, and are the same setting.
    assert two_nodes in _out(capsys, "plan", *config, "parallel.num_nodes=2")
    loaded = load_config(EXAMPLE, ["slurm.gpus_per_node=4"])
    assert (loaded.slurm.tasks_per_node, loaded.parallel.gpus_per_node) == (4, 4)
    assert main(["plan", *config, "parallel.num_nodes=2", "slurm.nodes=3"]) == 2
    assert "parallel.num_nodes=2 and slurm.nodes=3 are one setting" in capsys.readouterr().err
    assert main(["plan", *config, "slurm.gpus_per_node=4", "slurm.tasks_per_node=2"]) == 2
    assert "a job runs one rank per GPU" in capsys.readouterr().err
    # A run saved before one owner held these numbers (both names, ranks apart from GPUs) still
    # loads: slurm.* and the ranks win, and a later override sets both again.
    saved = tmp_path / "old-run-config.yaml"
    saved.write_text("model:\n  name: tiny\nparallel:\n  gpus_per_node: 1\nslurm:\n  gpus_per_node: 8\n"
                     "  tasks_per_node: 2\n")  # fmt: skip
    old = load_config(saved)
    assert (old.slurm.gpus_per_node, old.slurm.tasks_per_node, old.parallel.gpus_per_node) == (2, 2, 2)
    assert load_config(saved, ["slurm.gpus_per_node=4"]).slurm.tasks_per_node == 4


def test_a_local_job_runs_slurm_gpus_per_node_ranks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"]}), prompts)
    run_dir = tmp_path / "run"
    argv = ["submit", str(prompts), "--config", str(EXAMPLE), "--executor", "local",
            "--run-dir", str(run_dir), "--wait", "slurm.gpus_per_node=2", "sampling.num_inference_steps=1",
            "batch.min_shards=1"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    merged = tmp_path / "all.parquet"
    assert main(["manifest", str(run_dir), "--out", str(merged)]) == 0
    rows = pq.read_table(merged).to_pylist()
    metrics = [pq.read_table(p).to_pylist()[0] for p in (run_dir / "metrics").glob("*.parquet")]
    assert [row["world_size"] for row in metrics] == [2] and len(rows) == 2
    # No seed column: each video's seed is derived from its id and recorded (not 0 for both).
    seeds = [row["seed"] for row in rows]
    assert len(set(seeds)) == 2 and 0 not in seeds
