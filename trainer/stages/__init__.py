"""The recipe's stages, in order: `teacher` (toy only: train the teacher), `collect` (teacher ODE pairs), `pretrain`
(regression or ADP on the pairs), `distill` (DMD / DMD2 / ADM), `evaluate`. DMDX = collect -> ADP -> ADM.

One module per stage; artifacts.py names what each writes; roles.py assembles the roles for the training stages and
the memory planner. Each stage writes into <run_dir>/<stage>/ and is skipped on rerun once its output exists; an
unfinished stage resumes from its last complete checkpoint. So rerunning the same command is how a run resumes.
"""
from __future__ import annotations

import os

from parallel.distributed import rank0_value
from trainer.families import build_family, prompt_stream_path
from data.convert import is_prompt_file
from trainer.families.prompts import encode_prompt_stream, stream_encoded_from
from trainer.latent_evaluation import check_eval_models, eval_prompt_path
from trainer.stages.collect import run_collect_stage
from trainer.stages.evaluate import run_evaluate_stage
from trainer.stages.teacher import run_teacher_stage
from trainer.stages.training import check_streams, run_training_stage


def prepare_prompts(recipe, run_dir: str, dist_info, log) -> None:
    """Prompt files in family.prompts and eval.prompts are encoded with the teacher's text encoders into
    <run_dir>/prompts and <run_dir>/eval_prompts before any stage, by every rank on its device
    (trainer/families/prompts.py); a rerun reuses or resumes them."""
    family = None
    for source, out in ((getattr(recipe.family, "prompts", None), prompt_stream_path(recipe, run_dir)),
                        (recipe.eval.prompts, eval_prompt_path(recipe, run_dir))):
        if source is None or not is_prompt_file(source):
            continue
        if rank0_value(stream_encoded_from(out, source)):
            log(f"[prompts] encoded already: {out}")
            continue
        family = family or build_family(recipe, read_prompts=False)   # its embedding shapes only
        f = recipe.family
        summary = encode_prompt_stream(recipe, family, source, out, dist_info, f.prompt_column, f.prompt_dtype,
                                       log=log, replace_stale=True)
        log(f"[prompts] wrote {summary}")


def run_stages(recipe, run_dir: str, dist_info, log, provenance: dict | None = None) -> dict | None:
    """Every stage of the recipe in order; returns the evaluate stage's metrics (rank 0), if it ran.
    provenance: this attempt's record (trainer/provenance.py), carried into every checkpoint's extra state."""
    metrics = None
    check_streams(recipe, run_dir)
    check_eval_models(recipe, os.path.join(run_dir, "config.yaml"))
    prepare_prompts(recipe, run_dir, dist_info, log)
    for stage in recipe.stages:
        if stage == "teacher":
            run_teacher_stage(recipe, run_dir, dist_info, log, provenance)
        elif stage == "collect":
            run_collect_stage(recipe, run_dir, dist_info, log)
        elif stage in ("pretrain", "distill"):
            run_training_stage(recipe, run_dir, dist_info, log, stage, provenance)
        elif stage == "evaluate":
            metrics = run_evaluate_stage(recipe, run_dir, dist_info, log)
    return metrics
