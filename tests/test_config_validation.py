"""`load_config` checks the resolved config once: nothing reaches a shell, numbers are in range."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hvbatch.config import RetryConfig, available_presets, load_config
from hvbatch.config_checks import CHOICES, POSITIVE, bound_for, config_problems

ROOT = Path(__file__).resolve().parents[1]
TINY_BATCH = ROOT / "configs" / "examples" / "tiny-batch.yaml"


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "user.yaml"
    path.write_text("model:\n  name: tiny\n" + text)
    return path


def test_every_shipped_yaml_loads() -> None:
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    presets = [f for f in files if f.parent.name == "model"]
    assert {p.stem for p in presets} == set(available_presets()) and len(files) > len(presets)
    for preset in presets:
        assert load_config(overrides=[f"model={preset.stem}"]).model.name == preset.stem
    for path in set(files) - set(presets):
        load_config(path)
    load_config()


def test_newline_in_partition_is_refused_from_a_file_and_an_override(tmp_path: Path) -> None:
    path = _yaml(tmp_path, 'slurm:\n  partition: "gpu\\nrm -rf /"\n')
    with pytest.raises(ValueError, match=r"slurm\.partition='gpu\\nrm -rf /' contains a line break"):
        load_config(path)
    # On the command line the YAML parser would fold the line break into a space: refused before.
    with pytest.raises(ValueError, match=r"override slurm\.partition='gpu\\nrm -rf /' contains a line"):
        load_config(overrides=["model=tiny", "slurm.partition=gpu\nrm -rf /"])


def test_submit_refuses_newline_in_partition_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hvbatch.cli import main

    prompts = str(ROOT / "examples" / "prompts.parquet")
    argv = ["submit", prompts, "--config", str(TINY_BATCH), "--run-dir", str(tmp_path)]
    assert main([*argv, "slurm.partition=gpu\nrm -rf /"]) == 2
    assert "slurm.partition" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            'slurm:\n  setup: ["module load cuda", "echo a\\necho b"]\n',
            r"slurm\.setup\[1\]='echo a\\necho b'",
        ),
        ('slurm:\n  setup: ["echo \\e[31m"]\n', r"slurm\.setup\[0\]=.*control character \('\\x1b'"),
        ('slurm:\n  setup: ["echo \\x85"]\n', r"slurm\.setup\[0\]=.*control character \('\\x85'"),
        ('slurm:\n  setup: ["echo\\tx"]\n', r"slurm\.setup\[0\]=.*control character \('\\t'"),
        ('slurm:\n  additional_parameters: {"mail\\nuser": x}\n', r"slurm\.additional_parameters key="),
        ("slurm:\n  additional_parameters: {mail user: x}\n", r"key 'mail user' is not a valid sbatch"),
        ("slurm:\n  additional_parameters: {--begin: now}\n", r"key '--begin' is not a valid sbatch option"),
        ('slurm:\n  additional_parameters: {begin: "now\\r"}\n', r"slurm\.additional_parameters\.begin="),
        ('slurm:\n  account: "a\\x00b"\n', r"slurm\.account='a\\x00b' contains"),
        ('slurm:\n  constraint: "h100\\x7f"\n', r"slurm\.constraint=.*'\\x7f'"),
        ("parallel:\n  nccl_env: {NCCL DEBUG: INFO}\n", r"nccl_env key 'NCCL DEBUG' is not an environment"),
        ('parallel:\n  nccl_env: {NCCL_DEBUG: "INFO\\n"}\n', r"parallel\.nccl_env\.NCCL_DEBUG='INFO\\n'"),
    ],
)
def test_control_characters_and_bad_option_names_are_refused(
    tmp_path: Path, yaml_text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(_yaml(tmp_path, yaml_text))


def test_safe_slurm_settings_load(tmp_path: Path) -> None:
    text = (
        "slurm:\n  partition: gpu-h100\n  qos: high\n  constraint: 'h100&ib'\n"
        "  setup: ['source /opt/venv/bin/activate && export X=\"a b\"', 'module load cuda/12.4']\n"
        "  additional_parameters: {exclusive: '', mail_user: me@example.org, gres-flags: enforce-binding}\n"
    )
    config = load_config(_yaml(tmp_path, text))
    assert config.slurm.additional_parameters["gres-flags"] == "enforce-binding"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("retry.max_attempts=0", "retry.max_attempts=0 must be >= 1"),
        ("retry.max_prompt_attempts=0", "retry.max_prompt_attempts=0 must be >= 1"),
        ("retry.backoff_s=-1", "retry.backoff_s=-1.0 must be >= 0"),
        ("retry.max_backoff_s=5", "retry.max_backoff_s=5.0 must be >= retry.backoff_s=60.0"),
        ("retry.signal_delay_s=-5", "retry.signal_delay_s=-5 must be >= 0"),
        ("retry.max_walltime_requeues=-1", "retry.max_walltime_requeues=-1 must be >= 0"),
        ("retry.stall_timeout_s=-3", "retry.stall_timeout_s=-3.0 must be > 0"),
        ("parallel.timeout_s=0", "parallel.timeout_s=0.0 must be > 0"),
        ("parallel.gpu_memory_gib=0", "parallel.gpu_memory_gib=0.0 must be > 0"),
        ("parallel.gpus_per_node=0", "slurm.gpus_per_node=0 must be >= 1"),  # one owner
        ("parallel.num_nodes=0", "slurm.nodes=0 must be >= 1"),
        ("parallel.mode=fast", "parallel.mode='fast' is not one of throughput, latency (or auto)"),
        ("parallel.backend=mpi", "parallel.backend='mpi' is not one of auto, nccl, gloo"),
        ("parallel.ring=0", "parallel.ring='0' must be 'auto' or a positive integer"),
        ("slurm.time_min=0", "slurm.time_min=0.0 must be > 0"),
        ("slurm.time_min=inf", "slurm.time_min=inf must be > 0"),
        ("slurm.nodes=0", "slurm.nodes=0 must be >= 1"),
        ("slurm.gpus_per_node=0", "slurm.gpus_per_node=0 must be >= 1"),
        ("slurm.tasks_per_node=0", "slurm.tasks_per_node=0 must be >= 1"),
        ("slurm.array_parallelism=0", "slurm.array_parallelism=0 must be >= 1"),
        ("slurm.max_array_size=0", "slurm.max_array_size=0 must be >= 1 or null"),
        ("slurm.cpus_per_task=0", "slurm.cpus_per_task=0 must be >= 1 or null"),
        ("slurm.mem_gb=-1", "slurm.mem_gb=-1 must be >= 1 or null"),
        ("batch.seconds_per_cost_unit=0", "batch.seconds_per_cost_unit=0.0 must be > 0"),
        ("batch.reserve_s=-1", "batch.reserve_s=-1.0 must be >= 0"),
        ("batch.min_shards=0", "batch.min_shards=0 must be >= 1"),
        ("batch.executor=pbs", "batch.executor='pbs' is not one of auto, slurm, local"),
        ("video.fps=0", "video.fps=0 must be >= 1"),
        ("video.crf=52", "video.crf=52 must be in 0..51"),
        ("video.crf=-1", "video.crf=-1 must be in 0..51"),
        ("video.preset=fastest", "video.preset='fastest' is not one of ultrafast"),
        ("sampling.num_inference_steps=0", "sampling.num_inference_steps=0 must be >= 1"),
        ("sampling.height=0", "sampling.height=0 must be >= 1"),
        ("sampling.width=-16", "sampling.width=-16 must be >= 1"),
        ("sampling.num_frames=0", "sampling.num_frames=0 must be >= 1"),
        ("sampling.seed=-1", "sampling.seed=-1 must be in 0..9.22337e+18"),
        ("sampling.guidance_scale=nan", "sampling.guidance_scale=nan must be a finite number"),
        ("sampling.cfg_scale=inf", "sampling.cfg_scale=inf must be a finite number"),
        ("sampling.flow_shift=0", "sampling.flow_shift=0.0 must be > 0"),
        ("vae.tile_latent_overlap=20", "vae.tile_latent_overlap=20 must be in 0..vae.tile_latent_size / 2"),
        ("model.dtype=float8", "model.dtype='float8' is not one of bfloat16, float16, float32"),
        ("device=gpu", "device='gpu' is not one of auto, cpu, cuda, cuda:N"),
        ("model.attention=flash2", "model.attention='flash2' is not one of auto, default, cudnn"),
        ("model.quantize=int8", "model.quantize='int8' is not one of none, fp8"),
    ],
)
def test_out_of_range_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid config") as err:
        load_config(overrides=["model=tiny", override])
    assert message in str(err.value)


def test_attention_choices_match_the_backends() -> None:
    from hvbatch.models.attention_backends import BACKEND_CHOICES

    assert CHOICES["model.attention"] == BACKEND_CHOICES


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:3"])
def test_valid_devices(device: str) -> None:
    assert load_config(overrides=["model=tiny", f"device={device}"]).device == device


def test_every_problem_in_one_message() -> None:
    with pytest.raises(ValueError) as err:
        load_config(
            overrides=[
                "model=tiny",
                "retry.max_attempts=0",
                "retry.backoff_s=-1",
                "video.crf=99",
                "slurm.nodes=0",
                "model.transformer.head_dim=32",
            ]
        )
    text = str(err.value)
    assert text.startswith("invalid config (5 problems;")
    for key in ("retry.max_attempts=0", "retry.backoff_s=-1.0", "video.crf=99", "slurm.nodes=0"):
        assert key in text
    assert "retry.max_backoff_s" not in text  # 1800 >= -1: only the real problems
    assert (
        "model.transformer: invalid transformer config: sum(rope_axes_dim)=16 must equal head_dim=32" in text
    )


def test_fields_added_later_are_checked_by_their_name() -> None:
    """A new `*_timeout_s` / `*_interval_s` field in any section must be > 0 without a table entry."""
    assert bound_for("retry.peer_timeout_s") == POSITIVE
    assert bound_for("retry.heartbeat_interval_s") == POSITIVE
    assert bound_for("batch.some_new_timeout_s") == POSITIVE
    extended = dataclasses.make_dataclass(
        "ExtendedRetry",
        [("probe_timeout_s", float, 0.0), ("probe_interval_s", float, -1.0), ("probe_grace_s", float, -2.0)],
        bases=(RetryConfig,),
    )
    config = load_config(overrides=["model=tiny"])
    config.retry = extended()
    assert config_problems(config, available_presets()) == [
        "retry.probe_timeout_s=0.0 must be > 0",
        "retry.probe_interval_s=-1.0 must be > 0",
        "retry.probe_grace_s=-2.0 must be >= 0",
    ]


def test_peer_timeout_must_exceed_the_heartbeat_interval() -> None:
    heartbeats = dataclasses.make_dataclass(
        "HeartbeatRetry",
        [("heartbeat_interval_s", float, 10.0), ("peer_timeout_s", float, 5.0)],
        bases=(RetryConfig,),
    )
    config = load_config(overrides=["model=tiny"])
    config.retry = heartbeats()
    assert config_problems(config, available_presets()) == [
        "retry.peer_timeout_s=5.0 must be > retry.heartbeat_interval_s=10.0 (else a live peer looks dead)"
    ]


@pytest.mark.parametrize(
    "override",
    [
        "model.name=../../etc/x",
        "model=../../etc/x",
        "model=/etc/passwd",
        "model=..\\tiny",
        "model=configs/model/tiny",
    ],
)
def test_model_presets_are_names_not_paths(override: str) -> None:
    with pytest.raises(ValueError, match=r"a preset is a name, not a path; available presets: .*tiny"):
        load_config(overrides=[override])


def test_model_name_override_selects_the_preset(tmp_path: Path) -> None:
    config = load_config(overrides=["model.name=tiny"])
    assert config.model.name == "tiny" and config.model.transformer.num_heads == 12
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'; available presets: "):
        load_config(_yaml(tmp_path, "").with_name("user.yaml"), ["model.name=huge"])
    path = tmp_path / "escape.yaml"
    path.write_text("model:\n  name: ../../../etc/x\n")
    with pytest.raises(ValueError, match="a preset is a name, not a path"):
        load_config(path)
