"""`hvbatch doctor`: weights in both layouts (and broken ones), ffmpeg, the run directory, Slurm."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file, save_file

from hvbatch.cli import main
from hvbatch.config import Config, load_config
from hvbatch.doctor import Check, exit_status, run_doctor
from hvbatch.doctor.cluster import check_slurm
from hvbatch.doctor.system import check_ffmpeg, check_run_dir, estimated_video_bytes
from hvbatch.pipeline import Pipeline
from tests.slurm_cluster import SlurmCluster, without_accounting
from tests.test_generate import EXAMPLE, _write_tiny_weights

pytest_plugins = ["tests.slurm_cluster"]

LOCAL = ["batch.executor=local"]  # no Slurm checks outside the cluster tests


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny pipeline's random weights written in the official and the diffusers layout."""
    pipeline = Pipeline.load(load_config(EXAMPLE))
    roots = {}
    for layout in ("official", "diffusers"):
        roots[layout] = tmp_path_factory.mktemp(layout)
        _write_tiny_weights(pipeline, roots[layout], layout)
    return roots


def _config(*overrides: str) -> Config:
    return load_config(EXAMPLE, [*LOCAL, *overrides])


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.check: c for c in checks}


def test_tiny_preset_passes_and_json_parses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = str(tmp_path / "runs" / "r1")
    assert main(["doctor", "--json", "--run-dir", run_dir, "model=tiny", *LOCAL]) == 0
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)}
    assert set(checks["ffmpeg"]) == {"check", "status", "detail", "fix"}
    assert checks["weights"]["status"] == "ok" and "random weights" in checks["weights"]["detail"]
    for name in ("plan", "ffmpeg", "run dir", "run dir hard links", "run dir space", "slurm"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "libx264" in checks["ffmpeg"]["detail"]
    # No GPU on the test machine: a warning with device=auto, a failure when cuda is asked for.
    if not torch.cuda.is_available():
        assert checks["gpus"]["status"] == "warn" and "no GPU visible" in checks["gpus"]["detail"]
        assert main(["doctor", "--run-dir", run_dir, "model=tiny", "device=cuda", *LOCAL]) == 1
        lines = capsys.readouterr().out.splitlines()
        assert any(line.startswith("FAIL  gpus: no GPU visible") and "fix: " in line for line in lines)
        assert lines[-1].endswith("1 failed, 0 warnings")
    assert not (tmp_path / "runs").exists()  # doctor leaves nothing behind


@pytest.mark.parametrize(("layout", "detected"), [("official", "official .pt"), ("diffusers", "diffusers")])
def test_both_layouts_pass(weights: dict[str, Path], tmp_path: Path, layout: str, detected: str) -> None:
    config = _config(f"model.path={weights[layout]}", "model.random_weights=false")
    checks = _by_name(run_doctor(config, run_dir=tmp_path))
    kind = "official ckpts/ folder" if layout == "official" else "diffusers folder"
    assert checks["weights"].status == "ok" and kind in checks["weights"].detail
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert checks[name].status == "ok", checks[name]
    assert checks["transformer"].detail.startswith(detected)
    assert "hidden size 64" in checks["text_encoder"].detail  # tiny text_dim
    assert exit_status(list(checks.values())) == 0


def test_missing_tensor_is_named(weights: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "transformer"
    shutil.copytree(weights["diffusers"] / "transformer", folder)
    file = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["proj_out.weight"]
    save_file(state, file)
    config = _config(f"model.path={weights['diffusers']}", "model.random_weights=false")
    config.model.transformer_path = str(folder)
    checks = run_doctor(config, run_dir=tmp_path)
    transformer = _by_name(checks)["transformer"]
    assert transformer.status == "fail" and "1 missing keys: proj_out.weight" in transformer.detail
    assert transformer.fix and "\n" not in transformer.line()
    assert _by_name(checks)["vae"].status == "ok"
    assert exit_status(checks) == 1


def test_wrong_shape_names_tensor_and_both_shapes(weights: dict[str, Path], tmp_path: Path) -> None:
    good = weights["official"] / "hunyuan-video-t2v-720p" / "transformers" / "mp_rank_00_model_states.pt"
    state = torch.load(good, weights_only=True)["module"]
    key = "double_blocks.1.img_attn_qkv.weight"
    rows, cols = state[key].shape
    state[key] = torch.zeros(rows, cols + 2)
    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": state}, bad)
    config = _config(f"model.path={weights['official']}", "model.random_weights=false")
    config.model.transformer_path = str(bad)
    transformer = _by_name(run_doctor(config, run_dir=tmp_path))["transformer"]
    assert transformer.status == "fail"
    assert f"{key} (checkpoint ({rows}, {cols + 2}), model ({rows}, {cols}))" in transformer.detail


def test_text_encoder_of_another_width_or_without_tokenizer_fails(
    weights: dict[str, Path], tmp_path: Path
) -> None:
    llm, clip = tmp_path / "llm", tmp_path / "clip"
    shutil.copytree(weights["official"] / "text_encoder", llm)
    shutil.copytree(weights["official"] / "text_encoder_2", clip)
    config = json.loads((llm / "config.json").read_text())
    (llm / "config.json").write_text(json.dumps({**config, "hidden_size": 4096}))
    (clip / "tokenizer.json").unlink()
    overrides = [f"model.text_encoder_path={llm}", f"model.text_encoder_2_path={clip}"]
    checks = _by_name(
        run_doctor(
            _config(f"model.path={weights['official']}", "model.random_weights=false", *overrides),
            run_dir=tmp_path,
        )
    )
    assert checks["text_encoder"].status == "fail"
    assert (
        "hidden_size 4096 but the transformer takes model.transformer.text_dim=64"
        in checks["text_encoder"].detail
    )
    assert checks["text_encoder_2"].status == "fail" and "no tokenizer" in checks["text_encoder_2"].detail


def test_ffmpeg_without_libx264_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_ffmpeg().status == "ok"
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho ' V....D libx265              libx265 H.265'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    check = check_ffmpeg()
    assert check.status == "fail" and "no libx264" in check.detail


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can write into: a read-only tmpfs as root (root ignores permissions)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], check=True)
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_run_dir_checks(read_only_dir: Path, tmp_path: Path) -> None:
    config = _config()
    [writable] = check_run_dir(read_only_dir / "run", config)
    assert writable.status == "fail" and "cannot create a file" in writable.detail
    assert exit_status([writable]) == 1
    checks = _by_name(check_run_dir(tmp_path / "new" / "run", config))
    assert checks["run dir"].status == checks["run dir hard links"].status == "ok"
    assert list(tmp_path.iterdir()) == [read_only_dir]  # nothing created, the probe file removed
    # More video than the disk holds: the space check fails with the estimate.
    per_frame = estimated_video_bytes(720, 1280, 1, config)
    frames = 2 * shutil.disk_usage(tmp_path).free // per_frame  # 2x: others may free space meanwhile
    sizes = {"height": [720] * 3, "width": [1280] * 3, "num_frames": [frames] * 3}
    videos = pa.table({name: pa.array(values, pa.int32()) for name, values in sizes.items()})
    space = _by_name(check_run_dir(tmp_path, config, videos))["run dir space"]
    assert space.status == "fail" and "3 videos need" in space.detail


def test_estimated_video_size_follows_crf() -> None:
    config = _config()
    config.video.crf = 23
    at_23 = estimated_video_bytes(720, 1280, 129, config)
    assert at_23 == int(720 * 1280 * 129 * 0.15 / 8)
    config.video.crf = 17
    assert estimated_video_bytes(720, 1280, 129, config) == pytest.approx(2 * at_23, rel=1e-6)


def test_slurm_checks_on_the_cluster(slurm_env: SlurmCluster) -> None:
    good = ["batch.executor=slurm", "slurm.partition=debug", "slurm.account=root", "slurm.qos=normal"]
    checks = _by_name(check_slurm(_config(*good)))
    assert [c.check for c in checks.values()] == [
        "slurm controller",
        "slurm accounting",
        "slurm partition",
        "slurm node memory",
        "slurm account",
        "slurm qos",
        "slurm array size",
    ]
    assert all(c.status == "ok" for c in checks.values()), checks
    assert "up to 8 GPUs per node" in checks["slurm partition"].detail
    assert "MaxArraySize=1001" in checks["slurm array size"].detail
    bad = [
        "batch.executor=slurm",
        "slurm.partition=nope",
        "slurm.account=nobody",
        "slurm.qos=gold",
        "slurm.max_array_size=5000",
    ]
    checks = _by_name(check_slurm(_config(*bad)))
    assert (
        checks["slurm partition"].status == "fail"
        and "'nope' does not exist" in checks["slurm partition"].detail
    )
    assert "debug" in checks["slurm partition"].fix
    assert (
        checks["slurm account"].status == "fail" and "slurm.account=nobody" in checks["slurm account"].detail
    )
    assert checks["slurm qos"].status == "fail" and "slurm.qos=gold" in checks["slurm qos"].detail
    assert checks["slurm array size"].status == "fail"
    too_many_gpus = _by_name(check_slurm(_config("batch.executor=slurm", "slurm.gpus_per_node=16")))
    assert too_many_gpus["slurm partition"].status == "fail"


def test_slurm_without_accounting_fails(
    slurm_env: SlurmCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster = without_accounting(slurm_env, tmp_path / "no-accounting")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    argv = ["doctor", "--json", "--run-dir", str(tmp_path), "model=tiny", "batch.executor=slurm"]
    assert main([*argv, "slurm.account=root"]) == 1
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["slurm controller"]["status"] == "ok"
    accounting = checks["slurm accounting"]
    assert accounting["status"] == "fail" and "accounting storage is disabled" in accounting["detail"]
    assert "batch.executor=local" in accounting["fix"]
    assert checks["slurm account"]["status"] == "warn"  # cannot be checked without accounting
    assert [c for c in checks.values() if c["status"] == "fail"] == [accounting]


def test_a_folder_of_another_family_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weights folder another family detects is refused by doctor and by the loader, naming both."""
    import dataclasses

    from hvbatch.models import family as registry

    released = registry.get_family("hunyuan-video-1.0")
    other = dataclasses.replace(
        released,
        name="other-family",
        description="Other Video",
        presets=("other-preset",),
        default_preset=None,
        detect=lambda root: "other diffusers folder" if (root / "other.json").is_file() else None,
    )
    monkeypatch.setitem(registry._REGISTRY, other.name, other)
    (tmp_path / "other.json").write_text("{}")
    config = _config(f"model.path={tmp_path}", "model.random_weights=false")
    check = _by_name(run_doctor(config, run_dir=tmp_path))["weights"]
    assert (
        check.status == "fail" and "holds a Other Video checkpoint (other diffusers folder)" in check.detail
    )
    assert "model=tiny is a HunyuanVideo 1.0" in check.detail and "other-preset" in check.detail
    with pytest.raises(ValueError, match="holds a Other Video checkpoint"):
        Pipeline.load(config)


def _doctor_lines(capsys: pytest.CaptureFixture[str], *overrides: str) -> dict[str, str]:
    assert main(["doctor", "--config", str(EXAMPLE), *LOCAL, *overrides]) == 1
    lines = capsys.readouterr().out.splitlines()[:-1]
    return {line.split(":")[0].split()[-1]: line for line in lines}


def test_every_component_is_checked_whatever_the_transformer_holds(
    weights: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    components = ("vae", "text_encoder", "text_encoder_2")
    missing = tmp_path / "missing"
    shutil.copytree(weights["official"], missing)
    (pt,) = missing.glob("*/transformers/*.pt")
    pt.unlink()
    lines = _doctor_lines(capsys, f"model.path={missing}", "model.random_weights=false")
    assert lines["weights"].startswith("FAIL") and "not found: transformer" in lines["weights"]
    assert all(lines[name].startswith("ok") for name in components)
    pt.write_bytes(os.urandom(4096))  # garbage, not a checkpoint
    lines = _doctor_lines(capsys, f"model.path={missing}", "model.random_weights=false")
    assert "is not a readable checkpoint" in lines["transformer"] and "pickled" not in lines["transformer"]
    assert all(lines[name].startswith("ok") for name in components)
    sparse = tmp_path / "sparse"
    shutil.copytree(weights["diffusers"], sparse)
    with open(sparse / "transformer" / "config.json", "r+b") as handle:
        handle.truncate(1500 << 20)  # 1.5 GB, sparse: refused by its size, never read
    lines = _doctor_lines(capsys, f"model.path={sparse}", "model.random_weights=false")
    assert "config.json is 1,500 MiB, more than the 16 MiB" in lines["transformer"]
    assert all(lines[name].startswith("ok") for name in components)
