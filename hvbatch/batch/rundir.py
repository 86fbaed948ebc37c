"""The run directory: frozen inputs, outputs and the manifest, every file written atomically.

    RUN_DIR/
      run.json                     what was submitted (prompts file, counts, executor, version)
      config.yaml                  the resolved config
      videos.parquet               every video of the run with its shard (for status)
      shards/shard-00003.parquet   the frozen videos of shard 3 (never rewritten)
      jobs/submission-0001.json    job ids of each submission (submit, retry)
      submitit/                    submitit's pickles and logs (one folder per job)
      videos/<name>.mp4            outputs; <name> is a filesystem-safe form of the video id
      manifest/*.parquet           one part per job attempt and dp group: a row per video tried
      metrics/*.parquet            one row per shard and job attempt, with its exit reason
      attempts/*.json              what each rank that failed said (read when an attempt ends)
      done/shard-00003.json        completion marker, written after the shard's last manifest row

A video is done when a manifest row says so. Its mp4 was written under an attempt-unique temporary
name and hard-linked to its final name before that row was written; the link fails if another
attempt committed the video first, so a final name only ever holds one complete file and a video
has at most one `done` row. Reruns skip done videos: nothing is made twice and nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

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
    ]
)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def video_file_name(video_id: str) -> str:
    """A safe, unique file name for any id: readable part plus a hash (slashes, `..`, unicode...)."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", video_id).strip("_")[:60] or "video"
    digest = hashlib.sha1(video_id.encode("utf-8")).hexdigest()[:12]
    return f"{readable}-{digest}.mp4"


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_json_exclusive(path: Path, payload: Any) -> bool:
    """Write `path` atomically unless it exists (hard link of a temp file); False if it existed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_parts(parts: list[Path], keys: dict[str, str] | None = None) -> pa.Table:
    """The rows of manifest parts; with `keys`, tagged `_key` = `name|size:mtime` of their part."""
    if not parts:
        empty = MANIFEST_SCHEMA.empty_table()
        return empty.append_column("_key", pa.array([], pa.string())) if keys is not None else empty
    dataset = ds.dataset([str(p) for p in parts], schema=MANIFEST_SCHEMA, format="parquet")
    if keys is None:
        return dataset.to_table()
    batches, labels = [], []
    for tagged in dataset.scanner().scan_batches():
        name = Path(tagged.fragment.path).name
        batches.append(tagged.record_batch)
        labels += [f"{name}|{keys[name]}"] * tagged.record_batch.num_rows
    table = pa.Table.from_batches(batches, schema=MANIFEST_SCHEMA)
    return table.append_column("_key", pa.array(labels, pa.string()))


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    def exists(self) -> bool:
        return self.run_json.is_file()

    def shard_path(self, shard: int) -> Path:
        return self.root / "shards" / f"{shard_name(shard)}.parquet"

    def done_marker(self, shard: int) -> Path:
        return self.root / "done" / f"{shard_name(shard)}.json"

    def video_path(self, video_id: str) -> Path:
        return self.root / "videos" / video_file_name(video_id)

    def manifest_part(self, shard: int, attempt_key: str, dp_index: int) -> Path:
        return self.root / "manifest" / f"{shard_name(shard)}.{attempt_key}.dp{dp_index}.parquet"

    def metrics_part(self, shard: int, attempt_key: str) -> Path:
        return self.root / "metrics" / f"{shard_name(shard)}.{attempt_key}.parquet"

    def rank_error_path(self, attempt_key: str, rank: int) -> Path:
        return self.root / "attempts" / f"{attempt_key}.rank{rank:05d}.json"

    def metrics_rows(self, shard: int | None = None) -> list[dict[str, Any]]:
        """One dict per (shard, attempt), oldest first."""
        folder = self.root / "metrics"
        pattern = f"{shard_name(shard)}.*.parquet" if shard is not None else "shard-*.parquet"
        parts = sorted(folder.glob(pattern)) if folder.is_dir() else []
        rows = [row for part in parts for row in pq.read_table(part).to_pylist()]
        return sorted(rows, key=lambda r: r.get("started_at") or 0.0)

    def read_run(self) -> dict[str, Any]:
        if not self.exists():
            raise ValueError(
                f"{self.root} is not an hvbatch run directory (no run.json): pass the --run-dir of a submit"
            )
        return json.loads(self.run_json.read_text())

    def num_shards(self) -> int:
        return int(self.read_run()["num_shards"])

    def read_shard(self, shard: int) -> pa.Table:
        return pq.read_table(self.shard_path(shard))

    @property
    def videos_path(self) -> Path:
        return self.root / "videos.parquet"

    def all_videos(self, columns: list[str] | None = None) -> pa.Table:
        """Every video of the run with its `shard` (one file, written at submit)."""
        return pq.read_table(self.videos_path, columns=columns)

    def completed_shards(self) -> set[int]:
        folder = self.root / "done"
        if not folder.is_dir():
            return set()
        return {int(p.stem.split("-")[1]) for p in folder.glob("shard-*.json")}

    def manifest_rows(self, shard: int | None = None) -> pa.Table:
        """Every attempt row (all parts), optionally of one shard; empty table if none yet.

        For the whole run, parts unchanged since the last call come from `manifest-cache.parquet`
        (keyed by each part's name, size and mtime), so status stays fast with thousands of parts.
        """
        folder = self.root / "manifest"
        pattern = f"{shard_name(shard)}.*.parquet" if shard is not None else "shard-*.parquet"
        parts = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if shard is not None or not parts:
            return _read_parts(parts)
        return self._cached_manifest(parts)

    def _cached_manifest(self, parts: list[Path]) -> pa.Table:
        cache_path = self.root / "manifest-cache.parquet"
        keys = {p.name: f"{(st := p.stat()).st_size}:{st.st_mtime_ns}" for p in parts}
        cached = pq.read_table(cache_path) if cache_path.is_file() else None
        if cached is not None:
            fresh = pc.is_in(cached["_key"], pa.array([f"{n}|{k}" for n, k in keys.items()]))
            cached = cached.filter(fresh)
            have = {key.split("|", 1)[0] for key in pc.unique(cached["_key"]).to_pylist()}
        else:
            have = set()
        stale = [p for p in parts if p.name not in have]
        fresh_rows = _read_parts(stale, keys)
        merged = pa.concat_tables([t for t in (cached, fresh_rows) if t is not None])
        if stale:
            write_parquet_atomic(cache_path, merged)
        return merged.drop_columns(["_key"])

    def submissions(self) -> list[dict[str, Any]]:
        folder = self.root / "jobs"
        if not folder.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(folder.glob("submission-*.json"))]

    def add_submission(self, payload: dict[str, Any]) -> Path:
        """Record a submission under the next free number (safe when jobs resubmit concurrently)."""
        number = len(self.submissions()) + 1
        while True:
            path = self.root / "jobs" / f"submission-{number:04d}.json"
            if write_json_exclusive(path, payload):
                return path
            number += 1
