"""One owner of a job's nodes and GPUs (`slurm.nodes` x `slurm.gpus_per_node`): plan, --dry-run,
doctor and the jobs all use it, as a user types it on the command line (a local job's ranks:
`tests/test_report.py`, whose run sets `slurm.gpus_per_node=1` alone)."""

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
