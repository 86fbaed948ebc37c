"""The one config tree: omegaconf structured configs, YAML presets in `configs/`, `key=value` overrides.

Resolution order (later wins): the dataclass defaults, the model family's sampling (and `vae.*`)
defaults for the preset, the model preset named by `model=<name>` (a YAML file of `configs/model/`),
a user YAML file, then command-line `key=value` overrides.

The model family owns its sections of the tree: `model.transformer` (the architecture) and
`model.text_encoder` (the encoder settings) are typed by the family's own dataclasses
(`ModelFamily.config_sections`), chosen by `model.family` (which every preset names). `load_config`
puts the family's structured types in place before merging, so omegaconf checks their keys and
types as it checks every other section; a second family with other dataclasses needs no change here.

omegaconf (and pyyaml) are imported where a config is loaded or saved, not at import: the
dataclasses and `transformer_preset` work without omegaconf (benchmarks/gpu_check.py on a bare GPU
machine imports the models, which import these dataclasses).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvbatch.config_checks import check_overrides, config_problems, preset_problem, raise_problems
from hvbatch.models.family import (
    ModelFamily,
    available_presets,
    default_preset,
    family_for_preset,
    get_family,
    preset_path,
)

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

FAMILY_SECTIONS = ("transformer", "text_encoder")
"""`model.<section>`s whose type the model family gives (`ModelFamily.config_sections`)."""


def _default_family_section(section: str) -> Any:
    def make() -> Any:
        return family_for_preset(default_preset()).section_defaults(section)

    return make


@dataclass
class ModelConfig:
    """Which model to build and where its weights are."""

    name: str = field(default_factory=lambda: default_preset())
    """Preset name; `model=<name>` on the command line loads configs/model/<name>.yaml."""
    family: str = field(default_factory=lambda: family_for_preset(default_preset()).name)
    """The model family (`hvbatch.models.family`); every preset names its own, so this follows
    `model=<name>` (a config that sets it must agree with the preset's)."""
    transformer: Any = field(default_factory=_default_family_section("transformer"))
    """The architecture: the family's dataclass (its fields are the family's, e.g. num_heads)."""
    text_encoder: Any = field(default_factory=_default_family_section("text_encoder"))
    """The text encoders' settings: the family's dataclass."""
    path: str | None = None
    """Weights root in the family's official or diffusers layout (the family detects which)."""
    transformer_path: str | None = None
    """Overrides the transformer checkpoint found under `path` (a folder or a file of either layout)."""
    vae_path: str | None = None
    """Overrides the `vae/` folder found under `path` (official or diffusers)."""
    text_encoder_path: str | None = None
    """Overrides the (first) text encoder's folder found under `path` (its tokenizer is read from it too)."""
    text_encoder_2_path: str | None = None
    """Overrides the second text encoder's folder found under `path` (its tokenizer is read from it too)."""
    random_weights: bool = False
    """Build every component with seeded random weights instead of loading files (tiny preset)."""
    random_seed: int = 0
    """Seed of the random weights."""
    transformer_load_key: str = "module"
    """Key of the state dict inside an official .pt (`module`, or `ema`)."""
    dtype: str = "bfloat16"
    """Compute dtype of the transformer: bfloat16, float16 or float32."""
    text_encoder_dtype: str = "float16"
    """Dtype of the text encoders (the references run them in float16)."""
    vae_dtype: str = "float16"
    """Dtype of the VAE decoder (the reference decodes in float16)."""
    text_encoder_offload: str = "cpu"
    """Where the text encoders wait while videos denoise: `cpu` (moved to host memory after each
    encoding window, back to the GPU for the next; the planner then counts them only while they
    encode) or `keep` (resident on the GPU). A no-op on CPU runs."""
    attention: str = "auto"
    """Attention kernel: auto (by GPU: FA3/FA4 when installed, else cuDNN on Hopper/Blackwell; flash on
    Ampere/Ada; the default on CPU), default, cudnn, flash, efficient, math, fa3, fa4 or sage (FP8
    attention, lossy). A kernel that cannot serve the device, dtype or shape falls back."""
    attention_mode: str = "auto"
    """HunyuanVideo-1.5: auto (SSTA sparse attention for the checkpoints whose config asks for it,
    the official `*_sparse` ones; dense for the others), dense (full attention for every checkpoint)
    or ssta (SSTA with the checkpoint's or the official parameters). HunyuanVideo 1.0 is always dense."""
    compile: bool = False
    """torch.compile each double and single block (regional). Off by default: turn it on on CUDA once
    benchmarks/gpu_check.py shows it pays there; the first step of a run pays the compile time."""
    quantize: str = "none"
    """none, or fp8: quantize a bf16 checkpoint's block linears to float8_e4m3fn at load (per-row
    scales) and run them as FP8 GEMMs; an official *_fp8.pt checkpoint runs as FP8 GEMMs either way."""


@dataclass
class VaeDecodeConfig:
    """Tiled VAE decoding; sizes in latent cells / latent frames (times the VAE's spatial and temporal
    ratios in pixels and video frames)."""

    tiling: bool = True
    """Decode in overlapping tiles (needed for 720p x 129 frames on one 80 GB GPU)."""
    tile_latent_size: int = 32
    tile_latent_overlap: int = 8
    tile_latent_frames: int = 16
    tile_latent_frame_overlap: int = 4


@dataclass
class SamplingConfig:
    """Per-video sampling settings; the names match the batch Parquet columns."""

    height: int = 720
    width: int = 1280
    num_frames: int = 129
    """Video frames; must be rk+1 for the VAE's temporal ratio r (4 for the released models: a causal
    first frame, then r frames per latent frame)."""
    num_inference_steps: int = 50
    seed: int = 0
    guidance_scale: float = 6.0
    """Embedded (distilled) guidance, for models that take it as an input (ignored by the others)."""
    cfg_scale: float = 1.0
    """True classifier-free guidance; > 1 runs a negative-prompt branch too."""
    negative_prompt: str = ""
    flow_shift: float = 7.0
    cache: str = "none"
    """Step caching: `none`, `teacache` or `fbcache` (README "Step caching"); skipped steps reuse
    the transformer blocks' residual of the last computed step."""
    cache_threshold: float = 0.1
    """Skip while the cache's relative change stays under this (0 never skips; larger is faster)."""
    cache_max_skips: int = 3
    """Most steps skipped in a row."""


@dataclass
class VideoConfig:
    fps: int = 24
    """Frames per second of the written mp4."""
    crf: int = 17
    """x264 constant rate factor: 0 lossless, 17 visually lossless, 23 x264's default, 51 worst."""
    preset: str = "medium"
    """x264 speed/size preset (ultrafast ... veryslow)."""
    save_first_frame: bool = False
    """Also write the first frame as <name>.png beside the video."""


@dataclass
class ParallelConfig:
    """Sequence and data parallelism. `auto` values are chosen by `hvbatch plan`'s planner."""

    mode: str = "auto"
    """`throughput` (smallest sequence-parallel group that fits, rest as dp: the batch default),
    `latency` (a whole node per video), or `auto` (throughput for batches, latency for generate)."""
    ulysses: str = "auto"
    """Ulysses degree (all-to-all over heads, inside a node), or `auto`."""
    ring: str = "auto"
    """Ring degree (rotating keys and values, may cross nodes), or `auto`."""
    cfg: str = "auto"
    """CFG-parallel degree: 2 runs the unconditional and conditional branches on two halves of a
    video's GPUs (only with sampling.cfg_scale > 1), 1 runs both as one batch, or `auto`."""
    comm_dtype: str = "auto"
    """`fp8` sends the sequence-parallel attention transfers (Ulysses all-to-all, ring K/V) as float8
    e4m3 with per-token, per-head scales (about half the bytes of bf16, slightly less accurate);
    `none` sends them exact; `auto` is fp8 only for a layout whose Ulysses or ring group crosses nodes
    (inside a node, packing costs more memory traffic than NVLink saves)."""
    gpus_per_node: int = 8
    """An older name of `slurm.gpus_per_node` (the one owner): a value given here moves there, and
    after loading this mirrors it."""
    num_nodes: int = 1
    """An older name of `slurm.nodes` (the one owner): a value given here moves there, and after
    loading this mirrors it."""
    gpu_memory_gib: float = 80.0
    """Usable memory per GPU for the planner's memory model."""
    backend: str = "auto"
    """torch.distributed backend: `auto` (nccl on CUDA, gloo on CPU), `nccl` or `gloo`."""
    timeout_s: float = 300.0
    """Timeout of every collective and of the job's rendezvous. Collectives only run while the
    ranks of a group are in lock step (denoising steps), so this bounds a real hang, not a busy
    peer: waits for busy peers go through heartbeats (`retry.peer_timeout_s`)."""
    nccl_env: dict[str, str] = field(
        default_factory=lambda: {
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "1200",
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        }
    )
    """Environment set before NCCL starts, unless the job's environment already sets the name:
    a timed-out collective aborts the communicator and ends the process (so the job fails fast
    and is retried) instead of hanging; the heartbeat monitor allows slow model loading."""


@dataclass
class SlurmConfig:
    """One array element per shard, each a node job (the same settings drive the local executor)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: float = 240
    """Walltime of one shard job in minutes; shards are sized to fit it. Slurm gets it rounded up to
    whole minutes; the local executor uses it as given."""
    nodes: int = 1
    """Nodes of each shard's job: what `plan`, `submit --dry-run`, `doctor` and the jobs all use
    (`parallel.num_nodes` is an older name of it)."""
    gpus_per_node: int = 8
    """GPUs per node of each job (requested from Slurm; the local executor uses as many if it has
    GPUs), planned for by `plan`, `--dry-run` and `doctor` (`parallel.gpus_per_node` is an older name)."""
    tasks_per_node: int = 8
    """Ranks per node: one per GPU, so setting either of this and `gpus_per_node` sets both."""
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    """Host memory per node in GB. None: from the memory model (`hvbatch.parallel.plan.slurm_mem_gb`:
    each rank's offloaded text encoders, 15.3 GB, plus 4 GiB per rank and 10%: 173 GB for 8 ranks);
    the cluster's default only for the random-weight presets."""
    array_parallelism: int = 256
    """Most array elements running at once."""
    max_array_size: int | None = None
    """Largest array to submit; None reads MaxArraySize from `scontrol show config` (default 1001)."""
    additional_parameters: dict[str, str] = field(default_factory=dict)
    """Extra sbatch options, e.g. {exclusive: ""} or {reservation: name}."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before srun in the job script (module load, conda activate, ...)."""


@dataclass
class BatchConfig:
    """How prompts become shards and jobs."""

    seconds_per_cost_unit: float | None = None
    """GPU-seconds per (image token x step) on one GPU, what shards and walltimes are sized from. None:
    the model family's figure on one H100 with FlashAttention-2 (`ModelFamily.seconds_per_token_step`;
    HunyuanVideo 1.0: 3.3e-4, the official 1904 s for 720p x 129 x 50 steps) times the table's factor
    for `batch.gpu_type` and the kernel `model.attention` runs there (1.85 / 3.3 with cuDNN or FA3 on
    an H100), and for jobs submitted after some videos are done (retry, resubmission) the run's own
    median."""
    gpu_type: str = "h100"
    """The GPU the jobs run on, for the default `seconds_per_cost_unit`: h100, h200, b200, a100, l40s."""
    reserve_s: float = 600.0
    """Seconds of each job kept for start-up, loading and the last video's write."""
    min_shards: int = 1
    """At least this many shards (more jobs in flight on a large cluster)."""
    executor: str = "auto"
    """`auto` (Slurm where a controller answers `scontrol ping`, else local), `slurm` or `local`."""
    encode_window: int = 64
    """Videos whose prompts a dp group encodes in one go before denoising them (each distinct
    prompt once, kept for the job); the text encoders then leave the GPU until the next window."""
    overlap_writes: bool = True
    """Encode and write each mp4 in a background thread while the next video denoises (at most one
    video waiting); false writes it between videos."""


@dataclass
class RetryConfig:
    """What happens when a prompt or a job attempt fails (see README "Failures and retries")."""

    max_attempts: int = 3
    """Job attempts per shard (the first included) before its unfinished videos are marked failed."""
    max_prompt_attempts: int = 2
    """Attempts per video before its failure is final (a crash during a video counts as one)."""
    backoff_s: float = 60.0
    """Delay before the second attempt of a shard; doubled for each further attempt."""
    max_backoff_s: float = 1800.0
    signal_delay_s: int = 120
    """Seconds before the walltime at which USR2 asks the job to checkpoint and requeue."""
    max_walltime_requeues: int = 10
    """Requeues after walltime warnings per job (preemption does not count), so that a video
    longer than the walltime cannot requeue forever."""
    heartbeat_interval_s: float = 10.0
    """How often each rank tells its peers it is alive (a counter in the job's rendezvous store)."""
    peer_timeout_s: float = 300.0
    """A peer whose heartbeat has not moved for this long is dead: whoever waits for it ends the
    attempt. Waiting for a live peer (a dp replica still on its last video, a leader decoding and
    writing) has no deadline."""
    stall_timeout_s: float = 1800.0
    """A rank that makes no progress (no denoising step, no video finished, no live peer waited
    for) for this long dumps its stacks and ends its attempt; it bounds a hang outside collectives,
    so it must exceed the longest decode and write of one video."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    vae: VaeDecodeConfig = field(default_factory=VaeDecodeConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`."""
    fault: str = ""
    """Fault injection for tests and rehearsals, e.g. `rank=1,video=0,step=2,action=kill;...` (see
    README); the HVBATCH_FAULT environment variable overrides it. Empty: off."""


def torch_dtype(name: str) -> torch.dtype:
    """A dtype config value (`bfloat16`, `float16`, `float32`) as a torch.dtype."""
    import torch  # here, not at the top: `hvbatch --help` and the control commands never need torch

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(dtypes)}")
    return dtypes[name]


def _preset_yaml(name: str) -> DictConfig:
    """The preset's YAML; only names listed by `available_presets` are read, never a path."""
    from omegaconf import DictConfig, OmegaConf

    problem = preset_problem(name, available_presets())
    if problem is not None:
        raise ValueError(problem)
    loaded = OmegaConf.load(preset_path(name))
    assert isinstance(loaded, DictConfig)
    return loaded


def transformer_preset(name: str) -> Any:
    """The architecture (`model.transformer`) of a named preset, as its family's dataclass (pyyaml
    only: no omegaconf)."""
    import yaml

    problem = preset_problem(name, available_presets())
    if problem is not None:
        raise ValueError(problem)
    kind = family_for_preset(name).config_sections["transformer"]
    data = yaml.safe_load(preset_path(name).read_text(encoding="utf-8")) or {}
    fields = {f.name for f in dataclasses.fields(kind)}
    given = data.get("transformer") or {}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"preset {name}: unknown transformer keys {unknown}; valid: {sorted(fields)}")
    config = kind(**given)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _split_model_override(overrides: list[str]) -> tuple[str | None, list[str]]:
    """`model=<preset>` (or `model.name=<preset>`) picks a preset; the rest are applied as a dotlist."""
    preset = None
    rest = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. sampling.seed=3)")
        key, value = item.split("=", 1)
        if key.strip() == "model":
            preset = value.strip()
        else:
            rest.append(item)
            if key.strip() == "model.name":
                preset = value.strip()
    return preset, rest


MAX_CONFIG_FILE_BYTES = 1 << 20


def bundled_configs() -> dict[str, Path]:
    """The example configs shipped in the package (`configs/examples/*.yaml`), by name."""
    import importlib.resources

    folder = Path(str(importlib.resources.files("hvbatch.configs"))) / "examples"
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def config_file_path(config_file: str | Path) -> Path:
    """`--config`: a YAML file's path, or, when no such file exists here, the name of an example
    config shipped in the package (`--config tiny-batch`)."""
    path = Path(config_file).expanduser()
    if path.exists():
        return path
    bundled = bundled_configs()
    name = path.name.removesuffix(".yaml") if path.parent == Path(".") else None
    if name in bundled:
        return bundled[name]
    raise ValueError(
        f"config file {config_file} does not exist; give a YAML file's path or the name of a bundled "
        f"example config: {', '.join(bundled)}"
    )


def _load_yaml_file(path: str | Path) -> DictConfig:
    """A user's YAML file as plain data: no `!!python/...` objects (omegaconf loads with a safe
    loader) and no aliases (`*name`: a few lines of them expand to billions of nodes)."""
    import yaml
    from omegaconf import DictConfig, OmegaConf

    where = f"config file {path}"
    try:
        if Path(path).stat().st_size > MAX_CONFIG_FILE_BYTES:
            raise ValueError(f"{where} is larger than {MAX_CONFIG_FILE_BYTES >> 20} MiB; is it a config?")
        with open(path, encoding="utf-8") as handle:
            for event in yaml.parse(handle, Loader=yaml.SafeLoader):
                if isinstance(event, yaml.AliasEvent):
                    line = event.start_mark.line + 1 if event.start_mark else "?"
                    raise ValueError(
                        f"{where}, line {line}: YAML aliases (*{event.anchor}) are not supported; "
                        "write the values out"
                    )
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(err).split())}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} cannot be read: {err}") from err
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"{where} must hold a mapping (e.g. `sampling: {{seed: 3}}`), not a list")
    return loaded


def _family_schema(family: ModelFamily) -> DictConfig:
    """`Config`'s structured schema with the family's dataclasses as the types of its sections."""
    extra = sorted(set(family.config_sections) - set(FAMILY_SECTIONS))
    if extra:
        raise ValueError(
            f"model family {family.name!r} declares config sections {extra} that the config tree does not "
            f"have; a family types model.{' and model.'.join(FAMILY_SECTIONS)}"
        )
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(Config)
    for section in FAMILY_SECTIONS:
        kind = family.config_sections.get(section)
        schema.model[section] = OmegaConf.structured(kind) if kind is not None else None
    return schema


def _family_of_request(preset: str, file_cfg: DictConfig, dot_cfg: DictConfig) -> ModelFamily:
    """The preset's family; a `model.family` set in the file or an override must be the same."""
    from omegaconf import OmegaConf

    family = family_for_preset(preset)
    asked = OmegaConf.select(dot_cfg, "model.family") or OmegaConf.select(file_cfg, "model.family")
    if asked is not None and str(asked) != family.name:
        get_family(str(asked))  # an unknown family is named as such
        raise ValueError(
            f"model.family={asked!r} but preset {preset!r} is a model of family {family.name!r}: choose a "
            f"preset of family {asked!r} (model=<preset>) or leave model.family out"
        )
    return family


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the resolved config: defaults, the family's sampling defaults and the preset, then
    `config_file`, then `overrides`.

    The result is checked once (`hvbatch.config_checks`): one ValueError lists every problem.
    """
    from omegaconf import OmegaConf

    from hvbatch.config_layers import fold_job_shape, job_shape_problems, layer_problems, mirror_job_shape

    check_overrides(list(overrides or []))
    preset, dotlist = _split_model_override(list(overrides or []))
    file_cfg = OmegaConf.create() if config_file is None else _load_yaml_file(config_file_path(config_file))
    if preset is None:
        preset = OmegaConf.select(file_cfg, "model.name") or default_preset()
    preset_cfg = _preset_yaml(preset)
    try:
        dot_cfg = OmegaConf.from_dotlist(dotlist)
    except Exception as err:  # omegaconf raises several types; all mean "bad key or value"
        raise ValueError(f"invalid config override or file: {err}") from err
    family = _family_of_request(preset, file_cfg, dot_cfg)
    schema = _family_schema(family)
    user_layers = {f"config file {config_file}": file_cfg, "override": dot_cfg}
    problems = [  # strict for the overrides only: a file may be an older run's saved config
        p for where, layer in user_layers.items() for p in fold_job_shape(layer, where, where == "override")
    ]
    problems += [p for where, layer in user_layers.items() for p in layer_problems(schema, layer, where)]
    raise_problems(problems)
    layers: list[Any] = [
        schema,
        OmegaConf.create(
            {"sampling": dict(family.sampling_defaults(preset)), "vae": dict(family.vae_defaults)}
        ),
        OmegaConf.create({"model": preset_cfg}),
        file_cfg,
        dot_cfg,
        OmegaConf.create({"model": {"name": preset}}),  # `model=<preset>` wins over a file's model.name
    ]
    try:
        merged = OmegaConf.merge(*layers)
    except Exception as err:  # omegaconf raises several types; all mean "bad key or value"
        raise ValueError(f"invalid config override or file: {' '.join(str(err).split())}") from err
    merged.model.family = family.name  # runs saved before families existed do not name theirs
    config = OmegaConf.to_object(merged)
    assert isinstance(config, Config)
    mirror_job_shape(config)
    raise_problems(config_problems(config, available_presets()) + job_shape_problems(config))
    return config


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML with the run's atomic writer (unique temporary name,
    never through a symbolic link)."""
    from omegaconf import OmegaConf

    from hvbatch.batch.files import named_by_user, write_text_atomic

    write_text_atomic(named_by_user(Path(path)), OmegaConf.to_yaml(OmegaConf.structured(config)))
