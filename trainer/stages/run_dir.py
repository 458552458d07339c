"""The run directory's recipe: written once, compared on every rerun (docs/operations.md "Resuming").

A run dir is the same run when the EXPERIMENT part of the recipe agrees. What only says how the run is laid onto
machines may change between attempts, and each attempt's values are kept in provenance.jsonl:
`run.dir` itself (a run dir copied or moved elsewhere resumes there), `launch:`, the world size (not in the recipe), `parallel.dp_replicate / dp_shard / sp`, activation checkpointing,
resharding and offload, the collective timeout, the GPU memory figure, the loader workers and every stage's
`micro_batch_size` (accumulation regroups the same samples; trainer/trainer.py `micro_contexts`).
`parallel.backend` changes the checkpoint format and `parallel.mixed_precision` the numbers: both belong to the
experiment, like the method, the learning rates and the seeds.
"""
from __future__ import annotations

import copy
import os

import yaml

from trainer.config import Recipe, dump_recipe
from trainer.sections import RecipeError

PLACEMENT_KEYS = ("run.dir", "launch", "parallel.dp_replicate", "parallel.dp_shard", "parallel.sp",
                  "parallel.activation_checkpointing", "parallel.reshard_after_forward", "parallel.cpu_offload",
                  "parallel.keep_gathered", "parallel.fsdp_min_unit_params", "parallel.compile",
                  "parallel.compile_backend",
                  "parallel.collective_timeout_seconds", "parallel.gpu_memory_gib", "data.loader_workers",
                  "teacher.train.micro_batch_size", "pretrain.train.micro_batch_size",
                  "distill.train.micro_batch_size")


def experiment(resolved: dict) -> dict:
    """The resolved recipe without its placement keys."""
    out = copy.deepcopy(resolved)
    for dotted in PLACEMENT_KEYS:
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def first_difference(a, b, prefix: str = "") -> str | None:
    """The dotted key of the first difference between two nested dicts, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        if "name" in a and "name" in b and a["name"] != b["name"]:   # another method or family: say so first
            return f"{prefix}name"
        for key in list(a) + [k for k in b if k not in a]:
            found = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if a == b else prefix.rstrip(".")


def with_new_defaults(written: dict) -> dict:
    """A run dir's recorded recipe with the keys this version added since (new options) at their defaults: a new
    option's default keeps the old behaviour, so a run started before an upgrade resumes after it. A recorded recipe
    that no longer validates is compared as written."""
    try:
        return yaml.safe_load(dump_recipe(Recipe.model_validate(written)))
    except Exception:   # noqa: BLE001 - any schema change: fall back to the literal comparison, which names the key
        return written


def prepare_run_dir(recipe, path: str) -> str:
    """Write the resolved recipe into the run dir; a run dir holding a recipe of another EXPERIMENT is refused
    (resuming it with other settings would silently mix two runs). A rerun that changes placement keys keeps the
    first config.yaml (provenance.jsonl records each attempt's recipe)."""
    run_dir = recipe.run.dir
    text = dump_recipe(recipe)
    config_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                written = yaml.safe_load(f.read())
            if not isinstance(written, dict):
                raise ValueError(f"holds a {type(written).__name__}, not a recipe")
        except (UnicodeDecodeError, yaml.YAMLError, ValueError) as e:
            problem = str(e).splitlines()[0] if isinstance(e, ValueError) and not isinstance(
                e, UnicodeDecodeError) else type(e).__name__
            raise RecipeError(config_path, "", f"the run dir's recorded recipe is damaged ({problem}); nothing was "
                              f"changed", "restore it (provenance.jsonl holds every attempt's resolved recipe), or "
                              "pick a new run.dir") from None
        key = first_difference(experiment(with_new_defaults(written)), experiment(yaml.safe_load(text)))
        if key:
            raise RecipeError(path, key, f"this run directory ({run_dir}) holds a different recipe (the experiment "
                              f"differs at {key})", "pick a new run.dir, or rerun with the same recipe; only "
                              "launch, parallel layout and micro-batch sizes may change between attempts")
        return run_dir
    os.makedirs(run_dir, exist_ok=True)
    with open(config_path + ".tmp", "w") as f:
        f.write(text)
    os.replace(config_path + ".tmp", config_path)
    return run_dir
