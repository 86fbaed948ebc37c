"""The user's config layers (a `--config` file, `key=value` overrides) before they are merged.

Two jobs, both on one layer at a time, so that a later layer still overrides an earlier one:

- The job's shape has one owner, `slurm.nodes` and `slurm.gpus_per_node`, with one rank per GPU
  (`slurm.tasks_per_node`). `parallel.num_nodes` / `parallel.gpus_per_node` are older spellings of
  the same two numbers: a layer's value moves to `slurm.*`, and a layer that sets only one of
  `slurm.gpus_per_node` / `slurm.tasks_per_node` sets the other to it. Two values of one number
  are a problem in the overrides; in a file (perhaps a run saved before this rule) `slurm.*` and
  the ranks win (`fold_job_shape`). After the merge `parallel.*` mirror `slurm.*`.
- When omegaconf refuses a layer, every leaf of it is tried alone against the schema, and each
  refused leaf becomes one problem in hvbatch's words (unknown key with the nearest valid one, or a
  value of the wrong type), so a file with two mistakes is reported with both.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

ALIASES = {"parallel.num_nodes": "slurm.nodes", "parallel.gpus_per_node": "slurm.gpus_per_node"}
RANKS, GPUS = "slurm.tasks_per_node", "slurm.gpus_per_node"


def _layer_value(layer: DictConfig, key: str) -> Any:
    return OmegaConf.select(layer, key, default=None)


def _drop(layer: DictConfig, key: str) -> None:
    section, name = key.split(".")
    node = layer.get(section)
    if isinstance(node, DictConfig) and name in node:
        node.pop(name)


def fold_job_shape(layer: DictConfig, where: str, strict: bool = True) -> list[str]:
    """Move the layer's `parallel.num_nodes` / `gpus_per_node` to `slurm.*` and tie GPUs to ranks.

    `strict` (overrides: the user typed both): two values of one number are a problem. Otherwise
    (a file, which may be a run's saved config from before one owner held these numbers, written
    with both names and with ranks and GPUs apart) `slurm.*` wins over the old names and the ranks
    (`tasks_per_node`, what the jobs ran) over `gpus_per_node`."""
    problems = []
    for alias, owner in ALIASES.items():
        given, owned = _layer_value(layer, alias), _layer_value(layer, owner)
        if given is None:
            continue
        if strict and owned is not None and str(owned) != str(given):
            problems.append(
                f"{where}: {alias}={given} and {owner}={owned} are one setting (the job's "
                f"{'nodes' if 'nodes' in owner else 'GPUs per node'}) with two values: set {owner} only"
            )
        _drop(layer, alias)
        if owned is None:
            OmegaConf.update(layer, owner, given, force_add=True)
    ranks, gpus = _layer_value(layer, RANKS), _layer_value(layer, GPUS)
    if strict and ranks is not None and gpus is not None and str(ranks) != str(gpus):
        problems.append(
            f"{where}: {RANKS}={ranks} but {GPUS}={gpus}: a job runs one rank per GPU; set one of "
            "them (the other follows it)"
        )
    elif ranks is not None and (gpus is None or not strict):
        OmegaConf.update(layer, GPUS, ranks, force_add=True)
    elif gpus is not None and ranks is None:
        OmegaConf.update(layer, RANKS, gpus, force_add=True)
    return problems


def job_shape_problems(config: Any) -> list[str]:
    """The merged config runs one rank per GPU."""
    s = config.slurm
    if s.tasks_per_node != s.gpus_per_node:
        return [
            f"slurm.tasks_per_node={s.tasks_per_node} but slurm.gpus_per_node={s.gpus_per_node}: a job "
            "runs one rank per GPU; set one of them (the other follows it)"
        ]
    return []


def mirror_job_shape(config: Any) -> None:
    """`parallel.num_nodes` / `gpus_per_node` after the merge: the same numbers as `slurm.*`."""
    config.parallel.num_nodes = config.slurm.nodes
    config.parallel.gpus_per_node = config.slurm.gpus_per_node


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, DictConfig) and len(node) > 0:
        for key in node:
            yield from _leaves(node._get_node(key), f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def _valid_keys(schema: DictConfig, path: str) -> list[str]:
    section = path.rpartition(".")[0]
    node = OmegaConf.select(schema, section) if section else schema
    if not isinstance(node, DictConfig):
        return []
    return [f"{section}.{k}" if section else str(k) for k in node]


def _type_words(schema: DictConfig, path: str) -> str:
    parent, _, name = path.rpartition(".")
    node = OmegaConf.select(schema, parent) if parent else schema
    if isinstance(node, DictConfig):
        child = node._get_node(name)
        kind = type(child).__name__.replace("Node", "").lower() if child is not None else ""
        words = {"integer": "a whole number", "float": "a number", "boolean": "true or false"}
        if kind in words:
            return words[kind]
        if isinstance(child, DictConfig):
            return "a mapping (key: value lines)"
        if isinstance(child, ListConfig):
            return "a list"
        if kind == "string":
            return "text"
    return "a value of another type"


def _leaf_problem(schema: DictConfig, path: str, value: Any) -> str | None:
    plain = OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
    probe = OmegaConf.create({})
    OmegaConf.update(probe, path, plain, force_add=True)
    try:
        OmegaConf.merge(schema, probe)
    except ConfigKeyError:
        section = path.partition(".")[0]
        if "." in path and section not in schema:
            path, valid = section, [str(k) for k in schema]
            kind = "section"
        else:
            valid, kind = _valid_keys(schema, path), "key"
        near = difflib.get_close_matches(path, valid, n=1, cutoff=0.6)
        if near:
            return f"unknown {kind} {path}: did you mean {near[0]}?"
        if not valid:
            return f"{path}: {path.rpartition('.')[0]} takes no keys"
        return f"unknown {kind} {path}; valid: {', '.join(k.rpartition('.')[2] for k in valid)}"
    except OmegaConfBaseException:
        return f"{path}={plain!r} must be {_type_words(schema, path)}"
    return None


def layer_problems(schema: DictConfig, layer: DictConfig, where: str) -> list[str]:
    """Every leaf of `layer` that the schema refuses, each in hvbatch's words (`where: ...`)."""
    try:
        OmegaConf.merge(schema, layer)
        return []
    except OmegaConfBaseException:
        pass
    problems = [_leaf_problem(schema, path, value) for path, value in _leaves(layer) if path]
    found = [f"{where}: {p}" for p in problems if p is not None]
    return found or [f"{where}: omegaconf refuses it as a whole, but no single key of it"]
