"""The `collect` stage: teacher ODE pairs into an MDS stream (kind `ode_pairs`); `python -m trainer.collect` runs it
alone.

Pair i: noise drawn for sample index i under the key derive_seed(run.seed, 0, "ode_noise") (stored as `noise_seed`:
parallel/randomness.py counter_normal(noise_seed, [i], shape) regenerates it; the unit-variance noise is stored too), the prompt / class of sample i (a pure function of the seed and i; latent families store the prompt's
text, its id in the prompt stream and its embeddings in the pair, so training conditions each pair on its own
prompt without the prompt table), and the teacher's deterministic multi-step ODE solution at the recipe's guidance
scale (`collect.sampler_steps`, `collect.guidance_scale`). Micro-batch j holds pairs [j*micro_batch,
(j+1)*micro_batch) and goes to rank j mod world_size; each is written as its own part (data/parts.py), so the stream
is the same for any number of ranks and a rerun after a crash writes only the missing parts.

The teacher runs on the rank's device: on CUDA in bf16 autocast (`collect.bf16`) with the weights in bf16, large
micro-batches (`collect.micro_batch`); the noise and the stored outputs are fp32.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import torch
from tqdm import tqdm

from data.parts import PartsWriter, units_of_rank
from data.schemas import columns, embedding_columns
from parallel.distributed import barrier
from parallel.randomness import StepRandom
from trainer.families import build_family
from trainer.families.latent import LatentFamily
from trainer.families.prompts import embedding_fields
from trainer.sampling import teacher_sample
from trainer.stages.artifacts import pairs_path
from trainer.stages.roles import build_denoiser
from trainer.stages.students import load_teacher


class PairCollector:
    """The teacher on this rank's device and the recipe's sampler: `samples(indices)` computes pairs `indices`
    (one micro-batch) as MDS samples. collect_pairs writes them; benchmarks/data_throughput.py times them."""

    def __init__(self, recipe, family, denoiser, teacher, device):
        cfg = recipe.collect
        self.family, self.denoiser, self.device, self.seed = family, denoiser, torch.device(device), recipe.run.seed
        self.on_gpu = self.device.type == "cuda" and cfg.bf16
        self.teacher = teacher.to(device=self.device, dtype=torch.bfloat16) if self.on_gpu else teacher.to(self.device)
        self.latent = isinstance(family, LatentFamily)
        self.guidance = cfg.guidance_scale if cfg.guidance_scale is not None else recipe.distill.method.guidance_scale
        self.steps = cfg.sampler_steps
        self.sampler = {"name": "ode_first_order", "steps": cfg.sampler_steps, "guidance_scale": self.guidance,
                        "prediction": recipe.schedule.prediction}

    def columns(self) -> dict[str, str]:
        embeddings = embedding_columns(self.family.embedding_shapes(), "float16") if self.latent else None
        return columns("ode_pairs", embeddings)

    def samples(self, indices: range) -> list[dict]:
        family, seed = self.family, self.seed
        labels = family.prompt_labels(indices, seed)
        rand = StepRandom(seed, 0, indices)
        noise = rand.normal("ode_noise", family.data_shape)
        if self.latent:
            rows, texts = family.embeddings(labels), family.prompts.texts(labels)   # the micro-batch's rows only
        else:
            rows, texts = labels, [f"class {int(y)}" if family.conditional else "" for y in labels]
        autocast = torch.autocast("cuda", torch.bfloat16) if self.on_gpu else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            outputs = teacher_sample(self.denoiser, self.teacher, noise.to(self.device),
                                     family.condition(rows, self.device),
                                     family.null_condition(len(indices), self.device), self.guidance, self.steps)
        outputs = outputs.float().cpu()   # the one device-to-host copy per micro-batch
        return [{"id": i, "noise": noise[k].numpy(), "noise_seed": rand.key("ode_noise"),
                 "output": outputs[k].numpy(), "text": texts[k], "label": int(labels[k]) if family.conditional else -1,
                 "sampler": self.sampler, **(embedding_fields(rows, k, "float16") if self.latent else {})}
                for k, i in enumerate(indices)]


def collect_pairs(recipe, dist_info, progress: bool = True) -> str:
    """Write the missing micro-batches of this rank, then (rank 0) merge the parts into one stream. Collective."""
    cfg = recipe.collect
    out = cfg.out or os.path.join(recipe.run.dir, "ode_pairs")
    family = build_family(recipe)
    collector = PairCollector(recipe, family, build_denoiser(recipe), load_teacher(recipe, recipe.run.dir, family),
                              dist_info.device)
    num_units = math.ceil(cfg.num_pairs / cfg.micro_batch)
    writer = PartsWriter(out, collector.columns())
    mine = [u for u in units_of_rank(num_units, dist_info.rank, dist_info.world_size) if not writer.done(u)]
    already = sum(writer.done(u) for u in range(num_units))
    if already and dist_info.is_main:
        print(f"[collect] resuming: {already} of {num_units} micro-batches already written", flush=True)
    bar = tqdm(mine, desc="collect ode pairs", unit="micro-batch", disable=not (progress and dist_info.is_main),
               file=sys.stderr)
    for unit in bar:
        writer.write(unit, collector.samples(range(unit * cfg.micro_batch,
                                                   min((unit + 1) * cfg.micro_batch, cfg.num_pairs))))
    barrier()
    message = writer.merge(num_units) if dist_info.is_main else ""
    barrier()
    return message


def run_collect_stage(recipe, run_dir: str, dist_info, log) -> None:
    """Teacher ODE pairs into <run_dir>/ode_pairs (or collect.out); a rerun writes only the missing parts."""
    out = pairs_path(recipe, run_dir)
    if os.path.isfile(os.path.join(out, "index.json")):
        log(f"[collect] done already: {out}")
        return
    log(f"[collect] wrote {collect_pairs(recipe, dist_info)}")
