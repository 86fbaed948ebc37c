"""The run directory: frozen inputs, outputs and the manifest, every file written atomically.

    RUN_DIR/
      run.json                     what was submitted (prompts file, counts, executor, version)
      config.yaml                  the resolved config
      videos.parquet               every video of the run with its shard (for status)
      shards/shard-00003.parquet   the frozen videos of shard 3 (never rewritten)
      jobs/submission-0001.json    job ids of each submission (submit, retry)
      submitit/                    submitit's pickles and logs (one folder per job)
      videos/<name>.mp4            outputs; <name> is a filesystem-safe form of the video id
      manifest/*.parquet           per job attempt and dp group, segments of up to 64 rows: a row
                                   per video tried
      metrics/*.parquet            one row per shard and job attempt, with its exit reason
      attempts/*.json              what each rank that failed said (read when an attempt ends), and
                                   what each job is doing while it starts up (`job*.phase.json`)
      done/shard-00003.json        completion marker, written after the shard's last manifest row,
                                   with the shard's counts (status reads it instead of the parts)
      corrupt/                     files `hvbatch retry --repair` moved aside

A video is done when a manifest row says so. Its mp4 was written under an attempt-unique temporary
name and hard-linked to its final name before that row was written; the link fails if another
attempt committed the video first, so a final name only ever holds one complete file and a video
has at most one `done` row. Reruns skip done videos: nothing is made twice and nothing is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from hvbatch.batch.files import (
    CorruptRunFile,
    read_json,
    read_parquet,
    read_parquet_parts,
    write_json_exclusive,
    write_parquet_atomic,
)

MANIFEST_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_frames", pa.int32()),
        ("num_inference_steps", pa.int32()),
        ("shard", pa.int32()),
        ("status", pa.string()),  # started (replaced when the video ends) | done | failed
        ("attempt", pa.int32()),  # this video's attempt number, 1-based
        ("final", pa.bool_()),  # a failure that will not be retried (attempts used up)
        ("path", pa.string()),  # relative to the run directory; null unless done
        ("seconds", pa.float64()),
        ("error", pa.string()),  # "ErrorClass: message"; null unless failed
        ("truncated", pa.bool_()),
        ("job_id", pa.string()),
        ("attempt_key", pa.string()),
        ("finished_at", pa.float64()),  # unix time
        ("steps_computed", pa.int32()),  # denoising steps the transformer ran; null unless done
        ("steps_skipped", pa.int32()),  # steps a step cache (sampling.cache) skipped; null unless done
    ]
)


METRICS_SCHEMA = pa.schema(
    [
        ("job_id", pa.string()),
        ("array_index", pa.int64()),
        ("attempt", pa.int64()),
        ("attempt_key", pa.string()),
        ("shard", pa.int64()),
        ("node", pa.string()),
        ("gpu_type", pa.string()),
        ("world_size", pa.int64()),
        ("dp", pa.int64()),
        ("ulysses", pa.int64()),
        ("ring", pa.int64()),
        ("attention_backend", pa.string()),
        ("load_seconds", pa.float64()),
        ("seconds_to_first_step", pa.float64()),
        ("prompt_seconds", pa.list_(pa.float64())),
        ("wall_seconds", pa.float64()),
        ("gpu_seconds", pa.float64()),
        ("peak_memory_bytes", pa.list_(pa.int64())),
        ("attention_fallbacks", pa.string()),  # JSON {"<kernel> -> <kernel>: <why>": calls}; null: none
        ("exit_reason", pa.string()),
        ("exit_detail", pa.string()),
        ("started_at", pa.float64()),
        ("finished_at", pa.float64()),
    ]
)
SHARD_PATTERN = re.compile(r"^shard-(\d+)\.")


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def video_file_name(video_id: str) -> str:
    """A safe, unique file name for any id: readable part plus a hash (slashes, `..`, unicode...)."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", video_id).strip("_")[:60] or "video"
    digest = hashlib.sha1(video_id.encode("utf-8")).hexdigest()[:12]
    return f"{readable}-{digest}.mp4"


def _read_parts(parts: list[Path], keys: dict[str, str] | None = None) -> pa.Table:
    """The rows of manifest parts; with `keys`, tagged `_key` = `name|size:mtime` of their part."""
    tables = read_parquet_parts(parts, MANIFEST_SCHEMA)
    table = pa.concat_tables([t for _, t in tables]) if tables else MANIFEST_SCHEMA.empty_table()
    if keys is None:
        return table
    labels = [f"{path.name}|{keys[path.name]}" for path, part in tables for _ in range(part.num_rows)]
    return table.append_column("_key", pa.array(labels, pa.string()))


_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
                    bool: "a boolean", type(None): "null"}  # fmt: skip
Field = tuple[type, ...]
NUMBER: Field = (int, float)
# The JSON files of a run: the fields each must hold (checked when present, `required` or not).
MARKER_FIELDS: dict[str, Field] = {
    "done": (int,),
    "failed": (int,),
    "videos": (int,),
    "last_done_at": (*NUMBER, type(None)),
}
SUBMISSION_FIELDS: dict[str, Field] = {"jobs": (list,), "submitted_at": NUMBER}
JOB_FIELDS: dict[str, Field] = {"shard": (int,), "job_id": (str, int), "executor": (str,)}
RUN_FIELDS: dict[str, Field] = {"num_shards": (int,), "executor": (str,), "created_at": NUMBER}
RANK_ERROR_FIELDS: dict[str, Field] = {"rank": (int,), "kind": (str,), "error": (str,)}


def json_object(
    path: Path, data: Any, fields: dict[str, Field], required: tuple[str, ...] = (), what: str = "object"
) -> dict[str, Any]:
    """`data` (read from `path`) if it is a JSON object whose fields have their types, else a
    CorruptRunFile naming the file, like an unreadable one."""
    if not isinstance(data, dict):
        kind = _JSON_TYPE_NAMES.get(type(data), type(data).__name__)
        raise CorruptRunFile(path, TypeError(f"it holds {kind} where {what} belongs"))
    for key, types in fields.items():
        value = data.get(key)
        wrong = key in data and (
            not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        )
        if wrong or (key in required and key not in data):
            raise CorruptRunFile(
                path, TypeError(f"its {key!r} is {'missing' if key not in data else repr(value)}")
            )
    return data


def read_marker(path: Path) -> dict[str, Any]:
    """A completion marker: an object with the shard's counts."""
    return checked_marker(path, read_json(path))


def checked_marker(path: Path, data: Any) -> dict[str, Any]:
    """`data`, parsed from the marker at `path`, if it is an object with the shard's counts."""
    return json_object(path, data, MARKER_FIELDS, ("done", "failed"), "an object with the shard's counts")


def read_submission(path: Path) -> dict[str, Any]:
    """A submission record: an object whose `jobs` each name a shard, a job id and an executor."""
    record = json_object(path, read_json(path), SUBMISSION_FIELDS, ("jobs",), "a submission record")
    for job in record["jobs"]:
        json_object(path, job, JOB_FIELDS, tuple(JOB_FIELDS), "a job of a submission record")
    return record


def _shard_of(name: str) -> int | None:
    match = SHARD_PATTERN.match(name)
    return int(match.group(1)) if match else None


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    def exists(self) -> bool:
        return self.run_json.is_file()

    def require(self) -> RunDir:
        """This run, or a ValueError saying that the folder is not a run directory."""
        if not self.exists():
            raise ValueError(
                f"{self.root} is not an hvbatch run directory (no run.json): pass the --run-dir of a submit"
            )
        return self

    def shard_path(self, shard: int) -> Path:
        return self.root / "shards" / f"{shard_name(shard)}.parquet"

    def done_marker(self, shard: int) -> Path:
        return self.root / "done" / f"{shard_name(shard)}.json"

    def video_path(self, video_id: str) -> Path:
        return self.root / "videos" / video_file_name(video_id)

    def manifest_part(
        self, shard: int, attempt_key: str, dp_index: int, segment: int = 0, suffix: str | None = None
    ) -> Path:
        """`shard-NNNNN.<attempt key>.dp<i>[.s<segment>][.<suffix>].parquet`."""
        name = f"{shard_name(shard)}.{attempt_key}.dp{dp_index}"
        name += f".s{segment:04d}" if segment else ""
        name += f".{suffix}" if suffix else ""
        return self.root / "manifest" / f"{name}.parquet"

    def metrics_part(self, shard: int, attempt_key: str) -> Path:
        return self.root / "metrics" / f"{shard_name(shard)}.{attempt_key}.parquet"

    def rank_error_path(self, attempt_key: str, rank: int) -> Path:
        return self.root / "attempts" / f"{attempt_key}.rank{rank:05d}.json"

    def phase_path(self, job_id: str) -> Path:
        """What the job's current attempt is doing while it starts up (`ledger.record_phase`)."""
        return self.root / "attempts" / f"job{job_id}.phase.json"

    def _files(self, folder_name: str, shards: int | list[int] | None, ext: str) -> list[Path]:
        """Files `shard-NNNNN.*.<ext>` of a folder, for some shards: one directory listing."""
        folder = self.root / folder_name
        if not folder.is_dir():
            return []
        wanted = {shards} if isinstance(shards, int) else (set(shards) if shards is not None else None)
        names = sorted(
            entry.name
            for entry in os.scandir(folder)
            if entry.name.endswith(ext)
            and not entry.name.startswith(".")
            and (shard := _shard_of(entry.name)) is not None
            and (wanted is None or shard in wanted)
        )
        return [folder / name for name in names]

    def read_json(self, path: Path) -> Any:
        return read_json(path)

    def read_metrics_part(self, path: Path) -> dict[str, Any]:
        return read_parquet_parts([path], METRICS_SCHEMA)[0][1].to_pylist()[0]

    def metrics_rows(self, shards: int | list[int] | None = None) -> list[dict[str, Any]]:
        """One dict per (shard, attempt), oldest first."""
        parts = self._files("metrics", shards, ".parquet")
        rows = [row for _, table in read_parquet_parts(parts, METRICS_SCHEMA) for row in table.to_pylist()]
        return sorted(rows, key=lambda r: r.get("started_at") or 0.0)

    def read_run(self) -> dict[str, Any]:
        return json_object(
            self.run_json, read_json(self.require().run_json), RUN_FIELDS, tuple(RUN_FIELDS), "a run"
        )

    def num_shards(self) -> int:
        return int(self.read_run()["num_shards"])

    def read_shard(self, shard: int) -> pa.Table:
        return read_parquet(self.shard_path(shard))

    @property
    def videos_path(self) -> Path:
        return self.root / "videos.parquet"

    def all_videos(self, columns: list[str] | None = None) -> pa.Table:
        """Every video of the run with its `shard` (one file, written at submit)."""
        return read_parquet(self.videos_path, columns=columns)

    def completed_shards(self) -> set[int]:
        return {shard for p in self._files("done", None, ".json") if (shard := _shard_of(p.name)) is not None}

    def markers(self, shards: set[int] | None = None) -> dict[int, dict[str, Any]]:
        """The completion markers' contents, by shard."""
        found = {}
        for path in self._files("done", sorted(shards) if shards is not None else None, ".json"):
            shard = _shard_of(path.name)
            assert shard is not None
            found[shard] = read_marker(path)
        return found

    def manifest_rows(self, shards: int | list[int] | None = None) -> pa.Table:
        """Every attempt row (all parts), optionally of some shards; empty table if none yet.

        For the whole run, parts unchanged since the last call come from `manifest-cache.parquet`
        (keyed by each part's name, size and mtime), so status stays fast with thousands of parts.
        """
        parts = self._files("manifest", shards, ".parquet")
        if shards is not None or not parts:
            return _read_parts(parts)
        return self._cached_manifest(parts)

    def _cached_manifest(self, parts: list[Path]) -> pa.Table:
        cache_path = self.root / "manifest-cache.parquet"
        keys = {p.name: f"{(st := p.stat()).st_size}:{st.st_mtime_ns}" for p in parts}
        cached = None
        with contextlib.suppress(CorruptRunFile, FileNotFoundError):  # a bad cache is rebuilt
            cached = read_parquet(cache_path)
        # A cache written before the manifest's last columns existed is rebuilt, as a bad one is.
        if cached is not None and cached.column_names == [*MANIFEST_SCHEMA.names, "_key"]:
            fresh = pc.is_in(cached["_key"], pa.array([f"{n}|{k}" for n, k in keys.items()]))
            cached = cached.filter(fresh)
            have = {key.split("|", 1)[0] for key in pc.unique(cached["_key"]).to_pylist()}
        else:
            cached, have = None, set()
        stale = [p for p in parts if p.name not in have]
        fresh_rows = _read_parts(stale, keys)
        merged = pa.concat_tables([t for t in (cached, fresh_rows) if t is not None])
        if stale:
            with contextlib.suppress(OSError):  # a read-only run directory: the cache is optional
                write_parquet_atomic(cache_path, merged)
        return merged.drop_columns(["_key"])

    def submissions(self) -> list[dict[str, Any]]:
        folder = self.root / "jobs"
        if not folder.is_dir():
            return []
        return [read_submission(p) for p in sorted(folder.glob("submission-*.json"))]

    def add_submission(self, payload: dict[str, Any]) -> Path:
        """Record a submission under the next free number (safe when jobs resubmit concurrently)."""
        number = len(self.submissions()) + 1
        while True:
            path = self.root / "jobs" / f"submission-{number:04d}.json"
            if write_json_exclusive(path, payload):
                return path
            number += 1
