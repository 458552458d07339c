"""The training stages, `pretrain` (regression or ADP on the ODE pairs) and `distill` (DMD / DMD2 / ADM): build the
stage's trainer over the assembled roles and its data source, run it (it resumes from its last complete checkpoint),
and write the raw generator and its EMA (the student)."""
from __future__ import annotations

import dataclasses
import json
import os

from data.streams import TrainingStream, is_local, read_root, require_embeddings, verify_local_stream
from data.toy import ToyStream
from parallel.backends import build_backend, compile_enabled
from parallel.distributed import barrier
from parallel.randomness import derive_seed
from parallel.runtime_env import compile_cache_defaults
from trainer.families import build_family, prompt_stream_path
from trainer.config import dump_recipe
from trainer.families.latent import LatentFamily
from trainer.latent_evaluation import InLoopEvaluation
from trainer.methods import build_method
from trainer.provenance import last_provenance
from trainer.stages.artifacts import (GENERATOR_FILE, STUDENT_FILE, generator_init_path, pairs_path, save_atomic,
                                      write_teacher_ref)
from trainer.stages.roles import assemble_roles, build_denoiser, build_generator_denoiser, build_generator_module
from trainer.stages.students import load_teacher
from trainer.stages.teacher import ensure_pixel_backbone
from trainer.trainer import StageTrainer, loop_config


def build_stage_trainer(recipe, run_dir: str, dist_info, stage: str = "distill") -> StageTrainer:
    """The trainer of a training stage: `pretrain` (recipe.pretrain) or `distill` (recipe.distill)."""
    stage_dir = os.path.join(run_dir, stage)
    os.makedirs(stage_dir, exist_ok=True)
    dist_info = dataclasses.replace(dist_info, sp=recipe.parallel.sp)   # data ranks: dp_rank, dp_size
    section = getattr(recipe, stage)
    family = build_family(recipe)
    denoiser, generator_denoiser = build_denoiser(recipe), build_generator_denoiser(recipe)
    method = build_method(section.method)
    train = section.train
    if compile_enabled(recipe.parallel, dist_info.device.type):
        compile_cache_defaults(run_dir)   # before the first compilation reads the variables
    backend = build_backend(recipe.parallel, dist_info, family, train.grad_clip, train.ema_decay,
                            method.gathered_roles)
    nets = assemble_roles(recipe, run_dir, backend, family, method, section.optimizer,
                          generator_init_path(recipe, run_dir, stage))
    generator_cfg = recipe.distill.generator
    if method.needs_pairs:
        data = pairs_data(recipe, run_dir, family, dist_info, train.batch_size)
    elif method.needs_real_data:
        data = real_data(recipe, run_dir, family, dist_info, train.batch_size)
    else:
        data = None
    prompts = None
    if getattr(family, "prompt_stream", None) is not None and not method.needs_pairs:
        prompts = prompt_data(recipe, run_dir, family, dist_info, train.batch_size)
    timesteps = generator_denoiser.schedule.student_timesteps(generator_cfg.num_steps)
    trainer = StageTrainer(stage_dir=stage_dir, stage_name=f"{stage}:{section.method.name}", method=method,
                           nets=nets, backend=backend, denoiser=denoiser, family=family,
                           loop=loop_config(train, recipe.run.seed), dist_info=dist_info, student_timesteps=timesteps,
                           conditioning_timestep=generator_cfg.conditioning_timestep, data_source=data,
                           guards_cfg=recipe.guards, generator_denoiser=generator_denoiser, prompt_source=prompts)
    trainer.run_text = run_text(recipe, run_dir)
    if stage == "distill" and recipe.eval.every and isinstance(family, LatentFamily):
        def load_teacher_here():
            return denoiser, load_teacher(recipe, run_dir, family).to(dist_info.device)
        conditioning = generator_cfg.conditioning_timestep if generator_cfg.num_steps == 1 else None
        trainer.in_loop_eval = InLoopEvaluation(recipe, run_dir, dist_info, family,
                                                lambda: build_generator_module(recipe, family), generator_denoiser,
                                                timesteps, conditioning, load_teacher_here,
                                                log=print if dist_info.is_main else (lambda message: None))
    return trainer


def run_text(recipe, run_dir: str) -> dict[str, str]:
    """Tensorboard text written when a training stage starts: the resolved recipe and the last attempt's provenance
    (markdown code blocks)."""
    text = {"run/recipe": "```yaml\n" + dump_recipe(recipe) + "```"}
    record = last_provenance(run_dir)
    if record is not None:
        record = {k: v for k, v in record.items() if k != "recipe"}   # the recipe has its own entry
        text["run/provenance"] = "```json\n" + json.dumps(record, indent=1) + "\n```"
    return text


def own_prompts(batch):
    """A sample's conditioning: its stored text embeddings (latent families), else its label (the toy's class)."""
    return batch.embeddings or batch.labels


def pairs_data(recipe, run_dir: str, family, dist_info, global_batch: int) -> "StreamAdapter":
    """The teacher ODE pairs (an `ode_pairs` MDS stream) as the trainer's `batch(indices) -> (noise, x0, prompts)`,
    each pair with its own prompt's embeddings (the toy: its class)."""
    d = recipe.data
    root = pairs_path(recipe, run_dir)
    if is_local(root) and isinstance(family, LatentFamily):
        require_embeddings(root, family.embedding_shapes(), "collect the pairs again with this version: python "
                           "-m trainer.collect")
    stream = TrainingStream("ode_pairs", root, d.pairs_local, global_batch // dist_info.dp_size, recipe.run.seed,
                            num_canonical_nodes=d.num_canonical_nodes, replication=replication(dist_info),
                            check_hashes=d.check_hashes, workers=d.loader_workers,
                            cache=stream_cache(run_dir, "ode_pairs"))
    return StreamAdapter(stream, lambda b: (b.noise.float(), b.outputs.float(), own_prompts(b)))


def real_data(recipe, run_dir: str, family, dist_info, global_batch: int):
    """The real-data source: an MDS `real_latents` stream when `data.real_remote` is set (each latent with its own
    caption's embeddings), else the bundled toy data."""
    d = recipe.data
    if d.real_remote is None:
        return ToyStream(family.dataset, recipe.run.seed)
    if is_local(d.real_remote) and isinstance(family, LatentFamily):
        require_embeddings(d.real_remote, family.embedding_shapes(), "write it with python -m trainer.prepare images")
    stream = TrainingStream("real_latents", d.real_remote, d.real_local, global_batch // dist_info.dp_size,
                            recipe.run.seed, num_canonical_nodes=d.num_canonical_nodes,
                            replication=replication(dist_info), check_hashes=d.check_hashes,
                            workers=d.loader_workers, cache=stream_cache(run_dir, "real_latents"))
    return StreamAdapter(stream, lambda b: (b.latents.float(), own_prompts(b)))


def prompt_data(recipe, run_dir: str, family, dist_info, global_batch: int) -> "StreamAdapter":
    """The generator's prompts: the encoded prompt stream, read per batch like the data (exactly once per epoch,
    its position in the checkpoint, any world size; only the batch's rows reach the device). Shuffled with its own
    seed, so its order is not the real stream's."""
    d = recipe.data
    root = family.prompt_stream
    require_embeddings(root, family.embedding_shapes(), "encode the prompts with python -m trainer.prepare prompts")
    stream = TrainingStream("prompts", root, None, global_batch // dist_info.dp_size,
                            derive_seed(recipe.run.seed, 0, 0, "prompt_order") % 2**31,
                            num_canonical_nodes=d.num_canonical_nodes, replication=replication(dist_info),
                            check_hashes=d.check_hashes, workers=d.loader_workers,
                            cache=stream_cache(run_dir, "prompts"))
    return StreamAdapter(stream, lambda b: b.embeddings)


def check_streams(recipe, run_dir: str) -> None:
    """Before the first stage: every local stream the recipe names that exists already (data.real_remote, a prompt
    stream, and the pairs when no collect stage writes them) has the right schema and intact shards, so a wrong
    stream fails with one line before hours of teacher or collect work, not after (hashes are remembered: opening
    it later is free)."""
    d = recipe.data
    named = [("real_latents", d.real_remote, d.real_local)]
    if "collect" not in recipe.stages:
        named.append(("ode_pairs", pairs_path(recipe, run_dir), d.pairs_local))
    if recipe.family.name != "toy":
        named.append(("prompts", prompt_stream_path(recipe, run_dir), None))
    for kind, root, local in named:
        if root is None or not is_local(root) or not os.path.exists(os.path.join(root, "index.json")):
            continue
        verify_local_stream(root, kind, d.check_hashes, read_root(root, local, stream_cache(run_dir, kind)))


def stream_cache(run_dir: str, name: str) -> str:
    """Where a compressed stream without data.*_local is decompressed: inside the run dir (writable, one reader per
    run: the run-dir lock), never the stream's own folder, which may be read-only or shared by other runs."""
    return os.path.join(run_dir, "stream_cache", name)


def replication(dist_info) -> int | None:
    """Streaming's `replication`: the ranks of one sequence-parallel group read the same samples."""
    return dist_info.sp if dist_info.sp > 1 else None


class StreamAdapter:
    """Gives a stream the trainer's `batch(indices) -> tuple of [B, ...] tensors` interface (`fields` picks them from
    the typed batch); the stream owns the data position (checkpointed through state_dict)."""

    def __init__(self, stream, fields):
        self.stream, self.fields = stream, fields

    def batch(self, indices):
        b = self.stream.next_batch()
        if len(b.ids) != len(indices):
            raise ValueError(f"stream batch of {len(b.ids)} samples, the step needs {len(indices)}")
        return self.fields(b)

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def run_training_stage(recipe, run_dir: str, dist_info, log, stage: str = "distill",
                       provenance: dict | None = None) -> None:
    """A training stage (`pretrain` or `distill`): resumes from its last checkpoint; writes the raw generator and
    its EMA (the student)."""
    stage_dir = os.path.join(run_dir, stage)
    out_path = os.path.join(stage_dir, STUDENT_FILE)
    if os.path.isfile(out_path):
        log(f"[{stage}] done already: {out_path}")
        return
    method = getattr(recipe, stage).method
    if stage == "pretrain" and getattr(method, "pixel_weight", 0) > 0:
        ensure_pixel_backbone(recipe, run_dir, dist_info, log)
    init = generator_init_path(recipe, run_dir, stage)
    if init and not os.path.isfile(init):
        raise FileNotFoundError(f"[{stage}] the generator's starting point {init} does not exist")
    trainer = build_stage_trainer(recipe, run_dir, dist_info, stage)
    trainer.provenance = provenance or {}
    if dist_info.is_main:
        write_teacher_ref(recipe, run_dir, stage_dir)
    trainer.run()
    generator, ema = trainer.backend.full_state("generator"), trainer.backend.full_state("ema")   # collectives
    if dist_info.is_main:
        save_atomic(generator, os.path.join(stage_dir, GENERATOR_FILE))
        save_atomic(ema, out_path)
    barrier()
    log(f"[{stage}] wrote {out_path}")
