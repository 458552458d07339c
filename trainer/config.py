"""Typed recipes: YAML with `base:` inheritance and dotted `key=value` overrides, validated before any work.

A recipe is read with `yaml.safe_load`, merged over its `base:` chain (paths relative to the file that names them),
then the command line's `key=value` overrides are applied (values parsed as YAML, so `train.steps=10` is an int).
pydantic validates types and rejects unknown keys; trainer/validate.py rejects settings that cannot work together.
Every failure raises `RecipeError`, which the CLI prints as ONE line — file, key, problem, hint — and exits 2.
Sections live here; each method's own section lives beside the method (trainer/methods/). docs/recipes.md.
"""
from __future__ import annotations

import difflib
import os
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator

from trainer.eval_section import EvalConfig
from trainer.families.sections import FamilyConfig, ToyFamilyConfig
from trainer.methods.adm import ADMConfig
from trainer.methods.adp import ADPConfig
from trainer.methods.dmd import DMDConfig
from trainer.methods.dmd2 import DMD2Config
from trainer.methods.regression import RegressionConfig
from trainer.sections import (STALE, RecipeError, Section, boolean_for_number, drop_stale_options, known_keys,
                               note_kind_change)
from trainer.validate import check_recipe, source_of


# ---------------------------------------------------------------------------------------------- sections
class RunConfig(Section):
    dir: str = Field(min_length=1, description="run directory: config.yaml, stage folders, checkpoints, tensorboard, samples")
    seed: int = 0


class ScheduleConfig(Section):
    """Noise schedule + the network's native prediction (trainer/schedules.py, trainer/denoiser.py)."""
    prediction: Literal["eps", "v", "flow"] = "flow"
    # DDPM (eps / v): betas scaled_linear, optional SNR shift and zero terminal SNR (CogVideoX).
    beta_start: float = Field(0.00085, gt=0)
    beta_end: float = Field(0.012, gt=0)
    snr_shift: float = Field(1.0, gt=0)
    zero_terminal_snr: bool = False
    # rectified flow: sigma' = k*sigma / (1 + (k-1)*sigma)
    shift: float = Field(1.0, gt=0)


class OptimizerConfig(Section):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)


class TrainConfig(Section):
    steps: int = Field(gt=0, description="optimizer iterations of this stage")
    batch_size: int = Field(gt=0, description="global batch (samples per iteration over all ranks)")
    micro_batch_size: Optional[int] = Field(
        None, gt=0, description="samples per rank per forward/backward; gradients accumulate over batch_size / "
        "(world size * micro_batch_size) micro-batches, so the global batch stays fixed on any GPU count. "
        "Default: the whole local batch")
    grad_clip: float = Field(10.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    bf16: bool = False
    checkpoint_every: int = Field(500, gt=0)
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(50, gt=0)
    sample_every: int = Field(0, ge=0, description="every this many steps, a fixed-seed grid of the generator's "
                              "samples goes to tensorboard (images; latent previews for latent families); 0: off")


class TeacherConfig(Section):
    """The teacher: either `pretrained` (a file) or trained by the `teacher` stage on the toy data."""
    pretrained: Optional[str] = None
    cfg_drop_prob: float = Field(0.1, ge=0, lt=1, description="label dropout that makes CFG possible")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=3000, batch_size=256))
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=1e-3, weight_decay=0.0))
    sampler_steps: int = Field(32, gt=0, description="steps of the teacher's deterministic sampler in evaluation")


class LoraSettings(Section):
    """LoRA adapters on the generator (trainer/lora.py; peft): the paper's SD3-Medium student."""
    rank: int = Field(64, gt=0)
    alpha: float = Field(64.0, gt=0, description="peft's lora_alpha: the update is scaled by alpha / rank")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                 "to_add_out"],
        description="layer names that get adapters (the attention projections, image and text streams)")


class GeneratorConfig(Section):
    """The student, shared by the pretrain and distill stages."""
    num_steps: int = Field(1, gt=0, description="K: student sampling steps")
    prediction: Optional[Literal["eps", "v", "flow"]] = Field(
        None, description="the generator's own parameterisation (docs/algorithms.md §10.7); default: the teacher's. "
        "ADP trains a straight-path velocity predictor: 'flow' (an eps teacher such as SDXL then gets an "
        "RF-velocity student)")
    conditioning_timestep: Optional[float] = Field(
        None, description="one-step students only: timestep the network sees on pure-noise input (DMD2 SDXL: 399)")
    lora: Optional[LoraSettings] = Field(None, description="train LoRA adapters instead of every weight (the "
                                         "generator starts from the teacher; export fuses them)")


MethodConfig = Annotated[Union[DMDConfig, DMD2Config, ADMConfig], Field(discriminator="name")]


PretrainMethodConfig = Annotated[Union[RegressionConfig, ADPConfig], Field(discriminator="name")]


class PretrainConfig(Section):
    """The pretrain stage (DMDX step 2): the student learns from teacher ODE pairs before distillation."""
    method: PretrainMethodConfig = Field(default_factory=ADPConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=1000, batch_size=256))
    optimizer: dict[Literal["generator", "heads"], OptimizerConfig] = Field(
        default_factory=lambda: {r: OptimizerConfig() for r in ("generator", "heads")})


class DistillConfig(Section):
    method: MethodConfig = Field(default_factory=ADMConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    init_generator: Optional[str] = Field(
        None, description="a student .safetensors the generator starts from (default: the pretrain stage's student "
        "when that stage is listed, else the teacher's weights); the fake score and heads always start fresh")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=2000, batch_size=256))
    optimizer: dict[Literal["generator", "fake_score", "heads"], OptimizerConfig] = Field(
        default_factory=lambda: {r: OptimizerConfig() for r in ("generator", "fake_score", "heads")})


class CollectConfig(Section):
    """Teacher ODE pairs (`python -m trainer.collect RECIPE`): deterministic sampler, per-sample seeds, fixed
    micro-batches assigned to ranks round-robin, so the pairs do not depend on the number of ranks."""
    out: Optional[str] = Field(None, description="MDS output folder (default: <run.dir>/ode_pairs)")
    num_pairs: int = Field(1024, gt=0)
    micro_batch: int = Field(64, gt=0, description="pairs per teacher call (the unit of work and of resume)")
    bf16: bool = Field(True, description="on CUDA: the teacher's weights in bf16 and its passes in bf16 autocast "
                       "(outputs stored fp32); ignored on CPU")
    sampler_steps: int = Field(32, gt=0)
    guidance_scale: Optional[float] = Field(None, ge=0, description="default: distill.method.guidance_scale")


class DataConfig(Section):
    """Optional MDS streams (local folder or object-store URI). Without them the toy reads its bundled data."""
    real_remote: Optional[str] = Field(None, description="real_latents stream for DMD2's real branch")
    real_local: Optional[str] = Field(None, description="local cache folder for real_remote")
    pairs_remote: Optional[str] = Field(None, description="ode_pairs stream for the pretrain stage (default: the "
                                        "collect stage's output, collect.out)")
    pairs_local: Optional[str] = Field(None, description="local cache folder for pairs_remote")
    num_canonical_nodes: int = Field(1, gt=0, description="fixed so resumption works on any number of nodes")
    loader_workers: int = Field(0, ge=0, description="decode processes per rank for the training streams "
                                "(persistent, prefetching beside the step); 0: decode in the training process")
    check_hashes: bool = True


class ParallelConfig(Section):
    """How roles are spread over ranks (parallel/). dp_replicate x dp_shard x sp = world size; dp_shard -1 = the rest."""
    backend: Literal["data_parallel", "fsdp2", "zero3"] = "data_parallel"
    dp_replicate: int = Field(1, ge=1, description="HSDP replicas (fsdp2)")
    dp_shard: int = Field(-1, ge=-1, description="shards per replica (fsdp2); -1: world / (dp_replicate * sp)")
    sp: int = Field(1, ge=1, description="sequence-parallel degree")
    collective_timeout_seconds: int = Field(600, gt=0, description="a collective waiting longer than this (a hung or "
                                            "dead peer) fails the process group, so torchrun restarts it instead of "
                                            "the job hanging until its time limit")
    mixed_precision: Literal["fp32", "bf16"] = "fp32"
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="attention kernels of the diffusers roles: "
                                                   "torch SDPA, or xformers (CUDA only; trainer/attention.py)")
    reshard_after_forward: bool = True
    fsdp_min_unit_params: int = Field(0, ge=0, description="fsdp2: blocks grouped into units of at least this many "
                                      "parameters (0: one unit per block; docs/parallelism.md)")
    keep_gathered: list[Literal["generator", "teacher", "fake_score", "heads"]] = Field(
        default_factory=list, description="fsdp2: roles kept gathered between calls; zero3: [teacher] only, its "
        "parameters persistent (whole on every rank) (docs/parallelism.md)")
    cpu_offload: bool = False
    gpu_memory_gib: Optional[float] = Field(
        None, gt=0, description="memory of one GPU; the planner (--dry-run) warns when its prediction exceeds it")
    zero3_persistence_threshold: int = Field(
        100_000, ge=0, description="zero3: parameters with fewer elements stay replicated (DeepSpeed's "
                                   "stage3_param_persistence_threshold)")
    activation_checkpointing: list[Literal["generator", "teacher", "fake_score"]] = Field(
        default_factory=list, description="roles whose blocks recompute activations in backward (fsdp2)")
    compile: Optional[bool] = Field(None, description="torch.compile each denoiser block; unset: on with CUDA "
                                    "except under zero3 (docs/parallelism.md)")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"


Stage = Literal["teacher", "collect", "pretrain", "distill", "evaluate"]


class GuardsConfig(Section):
    """Stability guards (trainer/guards.py). The step never syncs for them: non-finite losses skip the update on the
    device; everything below is read at the logging cadence."""
    max_consecutive_skips: int = Field(3, gt=0, description="this many skipped updates in a row roll the stage back "
                                       "to its last checkpoint")
    max_rollbacks: int = Field(2, ge=0, description="rollbacks per run before the stage fails")
    disc_win_accuracy: float = Field(0.99, gt=0.5, le=1, description="alarm when the discriminator classifies at "
                                     "least this fraction of real and fake samples right over a logging window")
    disc_win_logit_gap: float = Field(10.0, gt=0, description="alarm when the discriminator's mean real logit "
                                      "exceeds its mean fake logit by this much over a logging window (10x the hinge "
                                      "margin): it separates the two outright")
    sample_abs_limit: float = Field(4.0, gt=0, description="|generator sample| above this counts as saturated "
                                    "(data units: the toy's data, the families' scaled latents)")
    saturation_fraction: float = Field(0.05, gt=0, le=1, description="alarm when more than this fraction of the "
                                       "generator's sample values is saturated")
    mean_drift: float = Field(1.0, gt=0, description="alarm when |mean of the generator's samples| exceeds this")
    inject_nan_at_steps: list[int] = Field(default_factory=list, description="fault injection (tests of the guard "
                                           "itself): these steps' losses are replaced by NaN")


class LaunchConfig(Section):
    """How `python -m slurm.submit` launches the recipe: one srun task per node running torchrun."""
    nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(8, gt=0, description="torchrun processes per node (one per GPU; CPU processes "
                               "when device is cpu)")
    device: Literal["gpu", "cpu"] = Field("gpu", description="gpu: request --gres=gpu:<gpus_per_node>")
    cpus_per_task: int = Field(16, gt=0, description="CPU cores per node for its torchrun and workers")
    time: str = Field("24:00:00", pattern=r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$",
                      description="Slurm time limit, [D-]HH:MM:SS")
    partition: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.,-]+$")
    account: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    job_name: str = Field("dmdx", pattern=r"^[A-Za-z0-9_.-]+$")
    signal_seconds: int = Field(300, gt=0, description="USR1 this long before the time limit: the trainer "
                                "checkpoints at its next step boundary and the job requeues itself")
    max_restarts: int = Field(3, ge=0, description="torchrun --max-restarts: worker-group restarts after a failure")
    rdzv_port: int = Field(29500, gt=0, lt=65536, description="c10d rendezvous port on the first node")
    env: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], str] = Field(
        default_factory=dict, description="extra environment for the job (names: letters, digits, _)")
    sbatch_args: list[str] = Field(default_factory=list, description="extra sbatch options, one per item")

    @field_validator("time", mode="before")
    @classmethod
    def _sexagesimal(cls, value):
        """YAML 1.1 reads an unquoted 1:00:00 as the integer 3600 (seconds): turn it back into H:MM:SS."""
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value // 3600}:{value % 3600 // 60:02d}:{value % 60:02d}"
        return value


class Recipe(Section):
    run: RunConfig
    family: FamilyConfig = Field(default_factory=ToyFamilyConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    collect: CollectConfig = Field(default_factory=CollectConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    stages: list[Stage] = Field(default_factory=lambda: ["teacher", "distill", "evaluate"])


# ---------------------------------------------------------------------------------------------- loading
def _read_yaml(path: str, named_by: str) -> dict:
    if not os.path.isfile(path):
        raise RecipeError(named_by, "", f"recipe file '{path}' not found", "check the path; base: paths are relative "
                                                                          "to the file that names them")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise RecipeError(path, "", f"not valid YAML at {where}: {getattr(e, 'problem', e)}",
                          "check indentation and quoting") from None
    except UnicodeDecodeError as e:
        raise RecipeError(path, "", f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})",
                          "save the recipe as UTF-8") from None
    except OSError as e:
        raise RecipeError(path, "", f"cannot read it: {e.strerror}", "check the file's permissions") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(path, "", "a recipe must be a mapping of sections", "see recipes/toy/default.yaml")
    return data


def _merge(base: dict, child: dict, child_source: str, provenance: dict, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in child.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            note_kind_change(provenance, dotted, out[key], value.get("name", out[key].get("name")), value)
            out[key] = _merge(out[key], value, child_source, provenance, dotted + ".")
        else:
            out[key] = value
            provenance[dotted] = child_source
    return out


def _load_with_bases(path: str, provenance: dict, seen: tuple = ()) -> dict:
    real = os.path.realpath(path)
    if real in seen:
        raise RecipeError(path, "base", "base: chain is circular", "remove the cycle")
    data = _read_yaml(path, seen and seen[-1] or path)
    base_ref = data.pop("base", None)
    merged: dict = {}
    if base_ref is not None:
        if not isinstance(base_ref, str):
            raise RecipeError(path, "base", "must be a path string", "e.g. base: ../toy/default.yaml")
        base_path = os.path.join(os.path.dirname(path), base_ref)
        if not os.path.isfile(base_path):
            raise RecipeError(path, "base", f"base recipe '{base_path}' not found",
                              "base: paths are relative to the file that names them")
        merged = _load_with_bases(base_path, provenance, seen + (real,))
    return _merge(merged, data, path, provenance)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text or text.startswith("="):
        raise RecipeError("command line", text, "override must look like dotted.key=value",
                          "e.g. distill.train.steps=100")
    key, raw = text.split("=", 1)
    parts = key.split(".")
    if any(not p for p in parts):
        raise RecipeError("command line", key, "empty key segment", "e.g. distill.train.steps=100")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw  # an unparseable value stays a string; validation then names the key if the type is wrong
    return parts, value


def _apply_override(data: dict, parts: list[str], value: Any, text: str, provenance: dict) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise RecipeError("command line", ".".join(parts[:i + 1]), f"'{text}' indexes into a value, not a section",
                              "override a leaf key")
        node = nxt
    section = ".".join(parts[:-1])
    if parts[-1] == "name":
        note_kind_change(provenance, section, node, value, ())
    provenance.get(section + STALE, set()).discard(parts[-1])   # given after the new name: validated
    node[parts[-1]] = value
    provenance[".".join(parts)] = "command line"


UNION_TAGS = {"toy", "sdxl", "sd3", "cogvideox", "dmd", "dmd2", "adm", "regression", "adp"}


def load_recipe(path: str, overrides: list[str] = ()) -> Recipe:
    """The typed, validated recipe (everything that does not depend on the world size; trainer/validate.py)."""
    provenance: dict[str, str] = {}
    data = _load_with_bases(path, provenance)
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(data, parts, value, text, provenance)
    # tagged unions pick their class by `name`; a section that omits it takes the default class
    if isinstance(data.get("family"), dict):
        data["family"].setdefault("name", "toy")
    distill = data.get("distill")
    if isinstance(distill, dict) and isinstance(distill.get("method"), dict):
        distill["method"].setdefault("name", "adm")
    pretrain = data.get("pretrain")
    if isinstance(pretrain, dict) and isinstance(pretrain.get("method"), dict):
        pretrain["method"].setdefault("name", "adp")
    drop_stale_options(Recipe, data, provenance)
    wrong = boolean_for_number(Recipe, data)
    if wrong:
        raise RecipeError(source_of(wrong, provenance, path), wrong, "expected a number, got a boolean",
                          "give a number")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        # report a misspelt key before the "missing" error it usually causes
        rank = {"extra_forbidden": 0, "missing": 2}
        err = sorted(e.errors(), key=lambda x: rank.get(x["type"], 1))[0]
        # pydantic puts the union tag ('adm', 'dmd', ...) into the location of a discriminated union; drop it.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in UNION_TAGS))
        dotted = ".".join(str(p) for p in loc)
        source = source_of(dotted, provenance, path)
        if err["type"] == "extra_forbidden":
            known = known_keys(Recipe, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(known)}"
            raise RecipeError(source, dotted, "unknown key", hint) from None
        if err["type"] == "missing":
            raise RecipeError(source, dotted, "required key is missing", "add it to the recipe or pass it as key=value") from None
        got = err.get("input")
        got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
        raise RecipeError(source, dotted, f"{err['msg']}{got_text}", "fix the value's type or range") from None
    check_recipe(recipe, path, provenance)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
