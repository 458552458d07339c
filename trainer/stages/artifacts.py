"""What a run directory holds and where: file names, paths between stages, atomic writes, fingerprints.

    <run.dir>/config.yaml            the resolved recipe (trainer/stages/run_dir.py)
             provenance.jsonl        one line per attempt: code, versions, argv, world size (trainer/provenance.py)
             prompts/                family.prompts' prompt file encoded: a `prompts` stream (latent families)
             teacher/                teacher.safetensors, pixel_backbone.safetensors (toy)
             ode_pairs/              the collect stage's MDS stream
             pretrain/, distill/     checkpoints/, tb/, student.safetensors (EMA), generator.safetensors (raw),
                                     teacher_ref.json
             evaluate/               metrics.json, sample PNGs, tb/
docs/operations.md "The run directory" describes each.
"""
from __future__ import annotations

import hashlib
import json
import os

from safetensors.torch import save_file

from trainer.checkpoint import file_sha256

TEACHER_FILE = "teacher.safetensors"
PIXEL_BACKBONE_FILE = "pixel_backbone.safetensors"   # the toy's ADP pixel-discriminator backbone (teacher stage)
STUDENT_FILE = "student.safetensors"        # EMA of the generator: what evaluation, sampling and export use
GENERATOR_FILE = "generator.safetensors"    # the raw generator weights
TEACHER_REF_FILE = "teacher_ref.json"       # frozen roles are recorded by path and hash, not copied


def save_atomic(state: dict, path: str) -> None:
    """A safetensors file written beside its final name and renamed: a reader never sees half a file."""
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def folder_fingerprint(path: str) -> str:
    """A cheap identity of a pretrained folder (config files' bytes, weight files' names and sizes): hashing every
    byte of a 16 GB teacher at each start would cost minutes."""
    if not os.path.isdir(path):
        return f"hub:{path}"
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            if name.endswith(".json"):
                with open(full, "rb") as f:
                    h.update(f.read())
            else:
                h.update(str(os.path.getsize(full)).encode())
    return h.hexdigest()


def teacher_path(recipe, run_dir: str) -> str:
    return recipe.teacher.pretrained or os.path.join(run_dir, "teacher", TEACHER_FILE)


def pixel_backbone_path(recipe, run_dir: str) -> str:
    return os.path.join(run_dir, "teacher", PIXEL_BACKBONE_FILE)


def stage_student_path(run_dir: str, stage: str) -> str:
    return os.path.join(run_dir, stage, STUDENT_FILE)


def pairs_path(recipe, run_dir: str) -> str:
    """The ODE-pair stream: data.pairs_remote, else the collect stage's output."""
    return recipe.data.pairs_remote or recipe.collect.out or os.path.join(run_dir, "ode_pairs")


def generator_init_path(recipe, run_dir: str, stage: str) -> str | None:
    """Where the distill stage's generator starts: distill.init_generator, else the pretrain stage's student when
    that stage is listed (DMDX: ADM starts from ADP's generator), else the teacher."""
    if stage != "distill":
        return None
    if recipe.distill.init_generator:
        return recipe.distill.init_generator
    return stage_student_path(run_dir, "pretrain") if "pretrain" in recipe.stages else None


def final_stage(recipe) -> str | None:
    """The last training stage of the recipe: its student is the run's student."""
    return "distill" if "distill" in recipe.stages else "pretrain" if "pretrain" in recipe.stages else None


def method_label(recipe) -> str:
    """What produced the student: e.g. `adm`, `adp`, `adp+adm` (DMDX)."""
    names = [getattr(recipe, st).method.name for st in ("pretrain", "distill") if st in recipe.stages]
    if "distill" in recipe.stages and recipe.distill.init_generator:
        names.insert(0, "init")
    return "+".join(names)


def write_teacher_ref(recipe, run_dir: str, stage_dir: str) -> None:
    """The teacher a training stage distils, by path and hash (a file's sha256, a folder's fingerprint)."""
    path = teacher_path(recipe, run_dir)
    with open(os.path.join(stage_dir, TEACHER_REF_FILE), "w") as f:
        json.dump({"path": os.path.abspath(path) if os.path.exists(path) else path,
                   "sha256": file_sha256(path) if os.path.isfile(path) else folder_fingerprint(path)}, f, indent=1)


COMPLETE_FILE = "complete.json"


def mark_stage_complete(stage_dir: str, outputs: list[str]) -> None:
    """Written last, atomically (temp file + rename), once every output of a stage with several is written."""
    tmp = os.path.join(stage_dir, f"{COMPLETE_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump({"outputs": [os.path.relpath(p, stage_dir) for p in outputs]}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(stage_dir, COMPLETE_FILE))


def stage_complete(stage_dir: str) -> bool:
    return os.path.isfile(os.path.join(stage_dir, COMPLETE_FILE))
