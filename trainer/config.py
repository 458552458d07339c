"""Typed recipes: YAML with `base:` inheritance and dotted `key=value` overrides, validated before any work.

A recipe is read with `yaml.safe_load`, merged over its `base:` chain (paths relative to the file that names them),
then the command line's `key=value` overrides are applied (values parsed as YAML, so `train.steps=10` is an int).
pydantic validates types and rejects unknown keys; `check_combinations` rejects settings that cannot work together.
Every failure raises `RecipeError`, which the CLI prints as ONE line — file, key, problem, hint — and exits 2.
"""
from __future__ import annotations

import difflib
import os
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class RecipeError(Exception):
    """A recipe problem found before any work: formatted as one line `file: key: problem (hint: ...)`."""

    def __init__(self, source: str, key: str, problem: str, hint: str = ""):
        self.source, self.key, self.problem, self.hint = source, key, problem, hint
        line = f"{source}: {key}: {problem}" if key else f"{source}: {problem}"
        super().__init__(line + (f" (hint: {hint})" if hint else ""))


class Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ---------------------------------------------------------------------------------------------- sections
class RunConfig(Section):
    dir: str = Field(description="run directory: config.yaml, stage folders, checkpoints, tensorboard, samples")
    seed: int = 0


class ToyFamilyConfig(Section):
    name: Literal["toy"] = "toy"
    dataset: Literal["digits", "grid25", "grid25u"] = "digits"
    hidden: int = Field(256, gt=0)
    depth: int = Field(4, gt=0)
    time_embed_dim: int = Field(64, gt=0)
    taps: list[int] = Field(default_factory=lambda: [1, 2, 3], description="block indices whose outputs feed heads")


class LatentFamilyConfig(Section):
    """What the latent families share (trainer/families/latent.py): prompts, the null branch, the heads."""
    prompts: Optional[str] = Field(None, description="a text file with one prompt per line: encoded once by the teacher "
                                   "pipeline's text encoders into <run.dir>/prompts/ (the precomputed-embeddings "
                                   "path); default: a random embedding table (tiny twins, benchmarks)")
    num_prompts: int = Field(64, gt=0, description="rows of the random embedding table (without `prompts`)")
    prompt_seed: int = 0
    uncond: Literal["zeros", "empty_prompt"] = Field("zeros", description="the unconditional branch of CFG: zero "
                                                     "embeddings (DMD2) or the encoded empty prompt (needs prompts)")
    head_hidden: int = Field(128, gt=0, description="channels of each discriminator head's conv")


class SDXLFamilyConfig(LatentFamilyConfig):
    """SDXL's UNet (trainer/families/sdxl.py). The architecture comes from `teacher.pretrained` when it is a
    diffusers folder or hub id, else from the checked-in config `model` (`sdxl`, or the tiny twin `sdxl_tiny`)."""
    name: Literal["sdxl"] = "sdxl"
    model: Literal["sdxl", "sdxl_tiny"] = "sdxl"
    resolution: int = Field(1024, gt=0, multiple_of=8, description="pixels; latents are resolution / 8")
    prompt_length: int = Field(77, gt=0, description="tokens per prompt embedding")
    pixel_backbone: Literal["sam", "dinov2"] = Field("sam", description="ADP's pixel discriminator backbone "
                                                     "(§10.10): SAM's image encoder, or DINOv2")
    pixel_backbone_pretrained: Optional[str] = Field(
        None, description="local folder or cached hub id of the backbone (e.g. facebook/sam-vit-base, "
        "facebook/dinov2-base); default: the checked-in config with random weights (tiny twins only)")
    pixel_image_size: Optional[int] = Field(None, gt=0, description="the backbone's input size (decoded images are "
                                            "resized to it); default: the backbone's own (SAM 1024)")


class SD3FamilyConfig(LatentFamilyConfig):
    """SD3-Medium / SD3.5-Large's MMDiT (trainer/families/sd3.py): the pretrained folder's `transformer/` config, else
    the checked-in `model`."""
    name: Literal["sd3"] = "sd3"
    model: Literal["sd3_medium", "sd35_large", "sd3_medium_tiny", "sd35_large_tiny"] = "sd3_medium"
    resolution: int = Field(1024, gt=0, multiple_of=16, description="pixels; latents are resolution / 8")
    prompt_length: int = Field(333, gt=0, description="tokens per prompt: 77 CLIP + 256 T5 (the pipeline's default)")
    taps: Optional[list[int]] = Field(None, description="joint blocks whose image tokens feed the heads; default: the "
                                      "ends of 1/4, 1/2, 3/4 and all of the depth")


class CogVideoXFamilyConfig(LatentFamilyConfig):
    """CogVideoX-2B / 5B (trainer/families/cogvideox.py): the pretrained folder's `transformer/` config, else the
    checked-in `model`."""
    name: Literal["cogvideox"] = "cogvideox"
    model: Literal["cogvideox_2b", "cogvideox_5b", "cogvideox_2b_tiny", "cogvideox_5b_tiny"] = "cogvideox_2b"
    frames: int = Field(49, gt=0, description="video frames (4k + 1); latent frames are (frames - 1) / 4 + 1")
    height: int = Field(480, gt=0, multiple_of=16)
    width: int = Field(720, gt=0, multiple_of=16)
    prompt_length: Optional[int] = Field(None, gt=0, description="T5 tokens per prompt; default: the transformer's "
                                         "max_text_seq_length (226)")
    taps: Optional[list[int]] = Field(None, description="blocks whose video tokens feed the 3-D heads; default: the "
                                      "ends of 1/4, 1/2, 3/4 and all of the depth")


FamilyConfig = Annotated[Union[ToyFamilyConfig, SDXLFamilyConfig, SD3FamilyConfig, CogVideoXFamilyConfig],
                         Field(discriminator="name")]


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
        None, description="the generator's own parameterisation (ALGORITHMS.md §10.7); default: the teacher's. "
        "ADP trains a straight-path velocity predictor: 'flow' (an eps teacher such as SDXL then gets an "
        "RF-velocity student)")
    conditioning_timestep: Optional[float] = Field(
        None, description="one-step students only: timestep the network sees on pure-noise input (DMD2 SDXL: 399)")
    lora: Optional[LoraSettings] = Field(None, description="train LoRA adapters instead of every weight (the "
                                         "generator starts from the teacher; export fuses them)")


class DMDConfig(Section):
    """DMD (Yin et al. 2024): reverse-KL gradient + fake-score denoising. ALGORITHMS.md §2."""
    name: Literal["dmd"] = "dmd"
    guidance_scale: float = Field(1.0, ge=0)
    t_min_frac: float = Field(0.02, ge=0, le=1)
    t_max_frac: float = Field(0.98, ge=0, le=1)
    ttur: int = Field(1, gt=0, description="critic updates per generator update")


class DMD2Config(DMDConfig):
    """DMD2 (Yin et al. 2024b): DMD + GAN head on the fake score's features, real-data branch, TTUR. §3."""
    name: Literal["dmd2"] = "dmd2"  # type: ignore[assignment]
    ttur: int = Field(5, gt=0)
    gen_gan_weight: float = Field(5e-3, ge=0)
    disc_gan_weight: float = Field(1e-2, ge=0)


class ADMConfig(Section):
    """ADM (Lu et al. 2025): one ODE step of dt from the same x_t, hinge loss on teacher-backbone heads. §5."""
    name: Literal["adm"] = "adm"
    guidance_scale: float = Field(1.0, ge=0)
    t_min_frac: float = Field(0.02, ge=0, le=1)
    t_max_frac: float = Field(0.98, ge=0, le=1)
    dt_frac: float = Field(1 / 64, gt=0, lt=1, description="dt = dt_frac * T in network time units")
    ttur: int = Field(1, gt=0)
    detach_fake_velocity: bool = False


MethodConfig = Annotated[Union[DMDConfig, DMD2Config, ADMConfig], Field(discriminator="name")]


class RegressionConfig(Section):
    """ODE-pair regression: the student maps each pair's noise to ITS teacher output (DMD's regression loss,
    DMD2's one-step initialisation, the ADM paper's ablation A1). MSE in data space. ALGORITHMS.md §6.4."""
    name: Literal["regression"] = "regression"


class ADPConfig(Section):
    """ADP (Lu et al. 2025 §3.3; ALGORITHMS.md §6): velocity on the straight path between the pair's noise and the
    teacher's output at cubic high-noise timesteps; hybrid hinge discriminators (latent: frozen teacher backbone +
    heads on re-noised samples; pixel: decode -> frozen vision backbone + heads)."""
    name: Literal["adp"] = "adp"
    latent_weight: float = Field(0.85, ge=0, le=1, description="lambda1: latent discriminator")
    pixel_weight: float = Field(0.15, ge=0, le=1, description="lambda2: pixel discriminator; lambda1 + lambda2 = 1")
    timestep_power: float = Field(3.0, gt=0, description="student times t = (1 - u^p) T; 3: the paper's cubic")
    renoise_t_min_frac: float = Field(0.0, ge=0, le=1, description="latent D re-noising t' ~ U[min, max] * T")
    renoise_t_max_frac: float = Field(1.0, ge=0, le=1)
    share_renoise: bool = Field(False, description="§10.9: real and fake share (t', noise); default independent")
    velocity_mse_weight: float = Field(0.0, ge=0, description="§10.8: optional velocity-MSE term on the pairs")


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


class EvalConfig(Section):
    num_samples: int = Field(2000, gt=0)
    sample_seed: int = 12345
    grid_samples: int = Field(64, gt=0, description="fixed-seed samples drawn into the PNG grid")


class CollectConfig(Section):
    """Teacher ODE pairs (`python -m data.collect RECIPE`): deterministic sampler, per-sample seeds, fixed
    micro-batches assigned to ranks round-robin, so the pairs do not depend on the number of ranks."""
    out: Optional[str] = Field(None, description="MDS output folder (default: <run.dir>/ode_pairs)")
    num_pairs: int = Field(1024, gt=0)
    micro_batch: int = Field(64, gt=0)
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
    cpu_offload: bool = False
    gpu_memory_gib: Optional[float] = Field(
        None, gt=0, description="memory of one GPU; the planner (--dry-run) warns when its prediction exceeds it")
    zero3_persistence_threshold: int = Field(
        100_000, ge=0, description="zero3: parameters with fewer elements stay replicated (DeepSpeed's "
                                   "stage3_param_persistence_threshold)")
    activation_checkpointing: list[Literal["generator", "teacher", "fake_score"]] = Field(
        default_factory=list, description="roles whose blocks recompute activations in backward (fsdp2)")


Stage = Literal["teacher", "collect", "pretrain", "distill", "evaluate"]
STAGE_ORDER = ["teacher", "collect", "pretrain", "distill", "evaluate"]


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
                                "checkpoints at its next logging step and the job requeues itself")
    max_restarts: int = Field(3, ge=0, description="torchrun --max-restarts: worker-group restarts after a failure")
    rdzv_port: int = Field(29500, gt=0, lt=65536, description="c10d rendezvous port on the first node")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the job")
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
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(path, "", "a recipe must be a mapping of sections", "see recipes/toy/default.yaml")
    return data


def _merge(base: dict, child: dict, child_source: str, provenance: dict, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in child.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
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
    node[parts[-1]] = value
    provenance[".".join(parts)] = "command line"


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` (for the did-you-mean hint on unknown keys)."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def _source_of(dotted: str, provenance: dict, default: str) -> str:
    probe = dotted
    while probe:
        if probe in provenance:
            return provenance[probe]
        probe = probe.rpartition(".")[0]
    return default


UNION_TAGS = {"toy", "sdxl", "sd3", "cogvideox", "dmd", "dmd2", "adm", "regression", "adp"}


def load_recipe(path: str, overrides: list[str] = ()) -> Recipe:
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
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        # report a misspelt key before the "missing" error it usually causes
        rank = {"extra_forbidden": 0, "missing": 2}
        err = sorted(e.errors(), key=lambda x: rank.get(x["type"], 1))[0]
        # pydantic puts the union tag ('adm', 'dmd', ...) into the location of a discriminated union; drop it.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in UNION_TAGS))
        dotted = ".".join(str(p) for p in loc)
        source = _source_of(dotted, provenance, path)
        if err["type"] == "extra_forbidden":
            known = _known_keys(Recipe, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(known)}"
            raise RecipeError(source, dotted, "unknown key", hint) from None
        if err["type"] == "missing":
            raise RecipeError(source, dotted, "required key is missing", "add it to the recipe or pass it as key=value") from None
        got = err.get("input")
        got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
        raise RecipeError(source, dotted, f"{err['msg']}{got_text}", "fix the value's type or range") from None
    check_combinations(recipe, path, provenance)
    return recipe


def check_combinations(recipe: Recipe, path: str, provenance: dict) -> None:
    """Settings that validate one by one but cannot work together."""
    def fail(key: str, problem: str, hint: str) -> None:
        raise RecipeError(_source_of(key, provenance, path), key, problem, hint)

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
    from trainer.families import TEACHER_PREDICTION
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
        if "evaluate" in recipe.stages:
            fail("stages", f"the evaluate stage measures the toy families (FD against their data); family "
                           f"'{family.name}' has no such data here", "drop 'evaluate'; export the student with "
                           "python -m trainer.export and score it with your own pipeline")
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
        if family.prompts is not None and not os.path.isfile(family.prompts):
            fail("family.prompts", f"file '{family.prompts}' not found", "a text file with one prompt per line")
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
    if [st for st in STAGE_ORDER if st in recipe.stages] != list(recipe.stages):
        fail("stages", f"stages must be a subset in the order {STAGE_ORDER}", "e.g. [teacher, distill, evaluate]")
    check_pretrain(recipe, fail)


def check_sequence_parallel(recipe: Recipe, fail) -> None:
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
    from parallel.sequence import check_heads
    from trainer.families.configs import model_config
    heads = model_config(family.model, recipe.teacher.pretrained, "transformer").get("num_attention_heads")
    problem = check_heads(heads or 1, p.sp)
    if problem:
        fail("parallel.sp", problem, "pick an sp that divides the head count")


def generator_prediction(recipe: Recipe) -> str:
    return recipe.distill.generator.prediction or recipe.schedule.prediction


def check_pretrain(recipe: Recipe, fail) -> None:
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
             f"predict '{generator_prediction(recipe)}'", "set distill.generator.prediction: flow (§10.7)")
    if g.conditioning_timestep is not None:
        fail("distill.generator.conditioning_timestep", "the pretrain stage trains the student at its true "
             "timesteps, so it cannot be shown a fixed conditioning timestep", "drop conditioning_timestep")
    if "collect" not in recipe.stages and recipe.data.pairs_remote is None and not os.path.isdir(
            recipe.collect.out or os.path.join(recipe.run.dir, "ode_pairs")):
        fail("stages", "pretrain needs teacher ODE pairs: list the 'collect' stage or set data.pairs_remote",
             "stages: [teacher, collect, pretrain, distill, evaluate]")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
