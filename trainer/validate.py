"""Validation in one place: every rule that spans recipe sections, and every rule that needs the world size or the
run directory, checked before anything is built or written (docs/recipes.md "Validation").

- `check_recipe(recipe, path)`: rules on the recipe alone; `trainer.config.load_recipe` runs it, so every command
  that reads a recipe gets them.
- `check_launch(recipe, world_size, device_type, path)`: rules that need the process count and the device: parallel
  dims, batch and micro-batch divisibility, the attention kernel, and a run directory's existing ZeRO-3 checkpoints.
Every failure is a `RecipeError`: one line naming the file, the key and a hint; the commands exit 2.
"""
from __future__ import annotations

import os

from data.convert import PROMPT_FILE_SUFFIXES, is_prompt_file
from parallel.dims import ParallelDims, ParallelDimsError
from parallel.sequence import check_heads
from trainer.families import TEACHER_PREDICTION
from trainer.families.configs import model_config
from trainer.methods import METHODS
from trainer.methods.adm import ADMConfig
from trainer.methods.adp import ADPConfig
from trainer.sections import RecipeError

STAGE_ORDER = ["teacher", "collect", "pretrain", "distill", "evaluate"]
TRAINING_SECTIONS = ("teacher", "pretrain", "distill")


def source_of(dotted: str, provenance: dict, default: str) -> str:
    """The file (or `command line`) that set `dotted` or its nearest parent section."""
    probe = dotted
    while probe:
        if probe in provenance:
            return provenance[probe]
        probe = probe.rpartition(".")[0]
    return default


def check_recipe(recipe, path: str, provenance: dict | None = None) -> None:
    """Settings that validate one by one but cannot work together (the world size aside: check_launch)."""
    provenance = provenance or {}
    def fail(key: str, problem: str, hint: str) -> None:
        raise RecipeError(source_of(key, provenance, path), key, problem, hint)

    s = recipe.schedule
    if s.prediction == "flow" and (s.snr_shift != 1.0 or s.zero_terminal_snr):
        fail("schedule.prediction", "snr_shift / zero_terminal_snr apply to DDPM schedules, not rectified flow",
             "use schedule.shift for flow, or prediction: v")
    if s.prediction != "flow" and s.shift != 1.0:
        fail("schedule.shift", "shift applies to rectified flow only", "use schedule.snr_shift for DDPM")
    if s.beta_end <= s.beta_start:
        fail("schedule.beta_end", "must exceed schedule.beta_start", "e.g. 0.00085 .. 0.012 (SDXL)")
    m = recipe.distill.method
    if m.t_min_frac >= m.t_max_frac:
        fail("distill.method.t_min_frac", "must be below t_max_frac", "e.g. 0.02 .. 0.98")
    if isinstance(m, ADMConfig) and m.t_min_frac + m.dt_frac >= m.t_max_frac:
        fail("distill.method.dt_frac", "t_min_frac + dt_frac must stay below t_max_frac (t - dt must stay valid)",
             "lower dt_frac or widen the t range")
    family = recipe.family
    expected = TEACHER_PREDICTION.get(family.name)
    if expected is not None and s.prediction != expected:
        fail("schedule.prediction", f"family '{family.name}' teachers predict '{expected}' (got '{s.prediction}')",
             f"schedule.prediction: {expected}")
    if family.name == "cogvideox" and not s.zero_terminal_snr:
        fail("schedule.zero_terminal_snr", "CogVideoX is trained with zero terminal SNR", "schedule.zero_terminal_snr: "
             "true (and snr_shift 3.0 for 2B, 1.0 for 5B)")
    if family.name == "toy":
        conditional = family.dataset == "digits"
        if not conditional and m.guidance_scale != 1.0:
            fail("distill.method.guidance_scale", f"dataset '{family.dataset}' is unconditional: CFG needs labels",
                 "set guidance_scale: 1.0 or use dataset: digits")
        depth = family.depth
        bad = [t for t in family.taps if not 0 <= t < depth]
        if bad or not family.taps:
            fail("family.taps", f"tap indices must lie in [0, {depth}) (got {family.taps})", "taps are block indices")
    else:
        check_latent_eval(recipe, fail)
        if "teacher" in recipe.stages:
            fail("stages", f"the teacher stage trains toy teachers only; family '{family.name}' distills a "
                           f"pretrained one", "drop 'teacher' from stages and set teacher.pretrained")
        pm = recipe.pretrain.method
        if "pretrain" in recipe.stages and isinstance(pm, ADPConfig) and pm.pixel_weight > 0 and family.name != "sdxl":
            fail("pretrain.method.pixel_weight", f"family '{family.name}' has no pixel discriminator backbone (the "
                 f"paper's SD3 and CogVideoX students use ADM alone, from the teacher)",
                 "pretrain.method.pixel_weight: 0 and latent_weight: 1, or drop the pretrain stage")
        if family.uncond == "empty_prompt" and family.prompts is None:
            fail("family.uncond", "the empty prompt's embeddings come from the text encoders, which run only with a "
                 "prompt file", "set family.prompts, or family.uncond: zeros")
        if family.prompts is not None and not (is_prompt_file(family.prompts)
                                               or os.path.isfile(os.path.join(family.prompts, "index.json"))):
            fail("family.prompts", f"'{family.prompts}' is neither a prompt file nor an encoded prompt stream",
                 f"a local {', '.join(PROMPT_FILE_SUFFIXES)} file, or a folder python -m trainer.prepare prompts wrote")
        if ("pretrain" in recipe.stages and isinstance(pm, ADPConfig) and pm.pixel_weight > 0
                and family.model != "sdxl_tiny" and family.pixel_backbone_pretrained is None):
            fail("family.pixel_backbone_pretrained", "ADP's pixel discriminator needs a pretrained backbone (random "
                 "weights are for the tiny twin only)", "e.g. facebook/sam-vit-base in the local cache")
        if m.name == "dmd2" and recipe.data.real_remote is None:
            fail("data.real_remote", f"{m.name} on family '{family.name}' needs a real_latents stream",
                 "convert images with `python -m data.convert images ... --vae` and set data.real_remote")
    g = recipe.distill.generator
    if g.lora is not None and (family.name == "toy" or "pretrain" in recipe.stages or recipe.distill.init_generator):
        fail("distill.generator.lora", "LoRA adapts a diffusers generator initialised from the teacher (not a toy, "
             "not after a pretrain stage or from init_generator)", "drop distill.generator.lora")
    if g.conditioning_timestep is not None and g.num_steps != 1:
        fail("distill.generator.conditioning_timestep", "only one-step students take a conditioning timestep",
             "set generator.num_steps: 1 or drop conditioning_timestep")
    needs_teacher = [st for st in ("collect", "pretrain", "distill") if st in recipe.stages]
    if needs_teacher and recipe.teacher.pretrained is None and "teacher" not in recipe.stages:
        fail("stages", f"{needs_teacher[0]} needs a teacher: list the 'teacher' stage or set teacher.pretrained",
             "stages: [teacher, distill, evaluate]")
    pretrained = recipe.teacher.pretrained
    if pretrained is not None and family.name == "toy" and not os.path.isfile(pretrained):
        fail("teacher.pretrained", f"file '{pretrained}' not found", "point at a teacher .safetensors")
    if pretrained is not None and family.name != "toy" and not os.path.exists(pretrained) and (
            pretrained.startswith((".", "/")) or pretrained.count("/") != 1):
        fail("teacher.pretrained", f"'{pretrained}' is neither a local folder nor a hub id",
             "a diffusers pipeline folder (with unet/), a model folder, or a hub id such as "
             "stabilityai/stable-diffusion-xl-base-1.0 in the local cache")
    p = recipe.parallel
    if p.sp != 1:
        check_sequence_parallel(recipe, fail)
    if p.backend == "zero3" and (p.dp_replicate != 1 or p.dp_shard not in (-1, 1) or p.cpu_offload):
        fail("parallel.backend", "zero3 shards every role over all ranks (dp_replicate / dp_shard / cpu_offload are "
                                 "FSDP2 settings)", "set parallel.backend: fsdp2 for HSDP or offload")
    if p.backend == "data_parallel" and (p.dp_replicate != 1 or p.dp_shard not in (-1, 1) or
                                         p.mixed_precision != "fp32" or p.cpu_offload or p.activation_checkpointing):
        fail("parallel.backend", "dp_replicate / dp_shard / mixed_precision / cpu_offload / activation_checkpointing "
                                 "need a sharded backend",
             "set parallel.backend: fsdp2")
    if p.fsdp_min_unit_params and p.backend != "fsdp2":
        fail("parallel.fsdp_min_unit_params", f"an FSDP2 setting; parallel.backend is {p.backend}",
             "set parallel.backend: fsdp2, or drop parallel.fsdp_min_unit_params")
    if p.keep_gathered and p.backend == "data_parallel":
        fail("parallel.keep_gathered", "data_parallel holds every role whole already",
             "drop parallel.keep_gathered, or set parallel.backend: fsdp2 or zero3")
    if p.backend == "zero3" and set(p.keep_gathered) - {"teacher"}:
        # a trained role's checkpoint holds its partitions; made persistent, its layout would change between
        # attempts that differ in this placement key
        fail("parallel.keep_gathered", f"under zero3 only the frozen teacher can be kept whole, not "
                                       f"{sorted(set(p.keep_gathered) - {'teacher'})}",
             "set parallel.keep_gathered: [teacher], or parallel.backend: fsdp2")
    if p.compile and p.backend == "zero3":
        fail("parallel.compile", "torch.compile does not combine with ZeRO-3's per-submodule parameter hooks",
             "set parallel.backend: fsdp2, or leave parallel.compile unset (off under zero3)")
    if [st for st in STAGE_ORDER if st in recipe.stages] != list(recipe.stages):
        fail("stages", f"stages must be a subset in the order {STAGE_ORDER}", "e.g. [teacher, distill, evaluate]")
    check_pretrain(recipe, fail)
    check_optimizers(recipe, provenance, path)


def check_latent_eval(recipe, fail, always: bool = False) -> None:
    """A latent family's evaluation (the evaluate stage, eval.every; always: python -m trainer.evaluate) scores
    decoded samples with the feature models the recipe names (docs/evaluation.md); the CLIP score needs each
    prompt's text."""
    ev, family = recipe.eval, recipe.family
    if "evaluate" not in recipe.stages and not ev.every and not always:
        return
    key = "stages" if "evaluate" in recipe.stages else "eval.every" if ev.every else "eval.dinov2"
    if ev.dinov2 is None and ev.clip is None:
        fail(key, f"evaluating family '{family.name}' needs a feature model", "set eval.dinov2 (FD-DINOv2) and / or "
             "eval.clip (CLIP score): local folders or cached hub ids")
    if ev.dinov2 is not None and ev.num_samples < 2:
        fail("eval.num_samples", "a Fréchet distance needs a covariance: at least 2 samples", "eval.num_samples: "
             "thousands for figures that compare across runs")
    if ev.clip is not None and ev.prompts is None and family.prompts is None:
        fail("eval.clip", "the CLIP score compares each sample with its prompt's text, and the run has no prompt texts",
             "set eval.prompts or family.prompts (a prompt file or an encoded stream)")
    if ev.prompts is not None and not (is_prompt_file(ev.prompts)
                                       or os.path.isfile(os.path.join(ev.prompts, "index.json"))):
        fail("eval.prompts", f"'{ev.prompts}' is neither a prompt file nor an encoded prompt stream",
             f"a local {', '.join(PROMPT_FILE_SUFFIXES)} file, or a folder python -m trainer.prepare prompts wrote")
    if ev.reference is not None and not os.path.isfile(ev.reference):
        fail("eval.reference", f"file '{ev.reference}' not found", "python -m trainer.reference_stats writes one; or "
             "drop eval.reference to compare with the teacher's samples")


def check_sequence_parallel(recipe, fail) -> None:
    """parallel.sp > 1: Ulysses over CogVideoX's video tokens (parallel/sequence.py), in the distill stage, under a
    sharded backend, with SDPA, and with a head count the SP ranks split evenly."""
    p, family = recipe.parallel, recipe.family
    if family.name != "cogvideox":
        fail("parallel.sp", f"sequence parallelism is implemented for CogVideoX's video tokens, not family "
             f"'{family.name}'", "set parallel.sp: 1")
    if p.backend == "data_parallel":
        fail("parallel.sp", "sequence parallelism needs a sharded backend", "set parallel.backend: fsdp2 or zero3")
    if p.attention != "sdpa":
        fail("parallel.attention", "the Ulysses attention runs torch SDPA", "set parallel.attention: sdpa")
    other = [stage for stage in recipe.stages if stage != "distill"]
    if other:
        fail("stages", f"parallel.sp applies to the distill stage only (got {other})",
             "run the other stages with parallel.sp: 1")
    heads = model_config(family.model, recipe.teacher.pretrained, "transformer").get("num_attention_heads")
    problem = check_heads(heads or 1, p.sp)
    if problem:
        fail("parallel.sp", problem, "pick an sp that divides the head count")


def generator_prediction(recipe) -> str:
    return recipe.distill.generator.prediction or recipe.schedule.prediction


def check_pretrain(recipe, fail) -> None:
    pm, g = recipe.pretrain.method, recipe.distill.generator
    if isinstance(pm, ADPConfig):
        if abs(pm.latent_weight + pm.pixel_weight - 1.0) > 1e-6:
            fail("pretrain.method.pixel_weight", f"latent_weight + pixel_weight must be 1 (got {pm.latent_weight} + "
                 f"{pm.pixel_weight})", "the paper: 0.85 and 0.15")
        if pm.renoise_t_min_frac >= pm.renoise_t_max_frac:
            fail("pretrain.method.renoise_t_min_frac", "must be below renoise_t_max_frac", "e.g. 0 .. 1")
    if "pretrain" not in recipe.stages:
        return
    if isinstance(pm, ADPConfig) and generator_prediction(recipe) != "flow":
        fail("distill.generator.prediction", f"ADP trains a straight-path velocity student; the generator would "
             f"predict '{generator_prediction(recipe)}'", "set distill.generator.prediction: flow")
    if g.conditioning_timestep is not None:
        fail("distill.generator.conditioning_timestep", "the pretrain stage trains the student at its true "
             "timesteps, so it cannot be shown a fixed conditioning timestep", "drop conditioning_timestep")
    if "collect" not in recipe.stages and recipe.data.pairs_remote is None and not os.path.isdir(
            recipe.collect.out or os.path.join(recipe.run.dir, "ode_pairs")):
        fail("stages", "pretrain needs teacher ODE pairs: list the 'collect' stage or set data.pairs_remote",
             "stages: [teacher, collect, pretrain, distill, evaluate]")


def check_optimizers(recipe, provenance: dict, path: str) -> None:
    """`<stage>.optimizer` gives every role the stage's method trains (a missing one failed with a KeyError after
    hours of earlier stages) and, where the recipe file itself or the command line names roles, none it does not
    train (an unused learning rate is a silent mistake). Roles inherited from a `base:` file or the defaults are not
    held against it: a child recipe cannot delete its base's keys."""
    def naming_source(role: str) -> str | None:
        """The recipe file or `command line` that names this role's optimizer (most specific key first)."""
        dotted = f"{stage}.optimizer.{role}"
        related = sorted((key for key in provenance if dotted == key or dotted.startswith(key + ".") or
                          key.startswith(dotted + ".")), key=len, reverse=True)
        sources = [provenance[key] for key in related if provenance[key] in (path, "command line")]
        return sources[0] if sources else None

    for stage in ("pretrain", "distill"):
        if stage not in recipe.stages:
            continue
        section = getattr(recipe, stage)
        trains = set(METHODS[section.method.name].trains)
        given = set(section.optimizer)
        prefix = f"{stage}.optimizer"
        explicit = {role for role in given if naming_source(role)}
        missing, extra = sorted(trains - given), sorted(explicit - trains)
        if missing or extra:
            problems = ([f"no optimizer for {', '.join(missing)}"] if missing else []) + (
                [f"{', '.join(extra)} {'is' if len(extra) == 1 else 'are'} not trained by it"] if extra else [])
            example = ", ".join(f"{role}: {{lr: 1.0e-4}}" for role in sorted(trains))
            key = prefix if missing else f"{prefix}.{extra[0]}"
            raise RecipeError(source_of(key, provenance, path) if missing else naming_source(extra[0]), key,
                              f"{section.method.name} trains {', '.join(sorted(trains))}: {'; '.join(problems)}",
                              f"give exactly those roles, e.g. {prefix}={{{example}}}")


def check_launch(recipe, world_size: int, device_type: str, path: str) -> None:
    """Rules that need the world size and the device."""
    def fail(key: str, problem: str, hint: str) -> None:
        raise RecipeError(path, key, problem, hint)

    p = recipe.parallel
    try:
        ParallelDims.resolve(world_size, p.dp_replicate, p.dp_shard, p.sp)
    except ParallelDimsError as e:
        fail("parallel", f"{e}", "match the parallel section to the process count (or --world-size)")
    data_ranks = world_size // p.sp
    for section in TRAINING_SECTIONS:
        train = getattr(recipe, section).train
        if train.batch_size % data_ranks:
            fail(f"{section}.train.batch_size", f"{train.batch_size} is not divisible by the {data_ranks} "
                 f"data-parallel ranks (world size {world_size} / parallel.sp {p.sp})",
                 "change the batch size or the process count")
        local = train.batch_size // data_ranks
        if train.micro_batch_size and local % train.micro_batch_size:
            fail(f"{section}.train.micro_batch_size", f"{train.micro_batch_size} does not divide the local batch "
                 f"{local} (batch_size {train.batch_size} / {data_ranks} data-parallel ranks)",
                 "pick a divisor of the local batch")
    problem = attention_problem(p.attention, device_type, recipe.family.name)
    if problem:
        raise RecipeError(path, "", problem)


def attention_problem(backend: str, device_type: str, family: str) -> str | None:
    """One line saying why the attention kernel `backend` cannot run here, or None. xformers has CUDA kernels only
    (its memory_efficient_attention raises NotImplementedError on CPU), so asking for it on a CPU run, or where its
    binary does not load, is a configuration error reported before any work, not a crash mid-run."""
    if backend == "sdpa":
        return None
    if family == "toy":
        return "parallel.attention: the toy family has no attention layers (hint: parallel.attention: sdpa)"
    if device_type != "cuda":
        return (f"parallel.attention: xformers has no {device_type} kernel (its memory_efficient_attention runs on "
                f"CUDA only) (hint: parallel.attention: sdpa, torch's own kernels)")
    try:
        import xformers.ops  # noqa: F401  (optional CUDA-only dependency: imported only when asked for)
    except Exception as e:   # not installed, or a binary built for another torch / CUDA
        return (f"parallel.attention: xformers does not load here ({type(e).__name__}: {e}) (hint: install the "
                f"xformers build matching torch, or parallel.attention: sdpa)")
    return None
