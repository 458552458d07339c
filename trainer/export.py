"""`python -m trainer.export RUN_DIR --out DIR [--weights ema|raw] [--dtype fp32|bf16|fp16] [--checkpoint latest]`

Writes the run's student as a diffusers pipeline folder that the stock `StableDiffusionXLPipeline`,
`StableDiffusion3Pipeline` or `CogVideoXPipeline` loads with `from_pretrained`: the teacher pipeline's text encoders,
tokenizers and VAE (read from `teacher.pretrained`), the student's weights in the stock denoiser class (EMA by
default; the stage end consolidates them from FSDP2 or ZeRO-3 shards; `--checkpoint` reads an unfinished run's
checkpoint of any backend offline, parallel/offline.py), and a scheduler that reproduces the student's
own K-step sampler (trainer/sampling.py: predict x0, re-noise with fresh noise to the next student time):

- eps / v students (SDXL, CogVideoX): `LCMScheduler` with `original_inference_steps=1000`, whose K timesteps are
  DMD2's 999 - 1000 i / K, with the trainer's exact abar table passed as `trained_betas` (CogVideoX's SNR shift and
  zero terminal SNR included) and a `timestep_scaling` large enough that LCM's boundary terms vanish (c_skip < 1e-10).
- rectified-flow students (SD3): `FlowMatchEulerDiscreteScheduler(shift, stochastic_sampling=True)`; the student's
  times are the shifted 1 - i/K, which the stock call reaches with `sigmas=[1 - i/K]` (its default grid differs).
- a one-step student shown a conditioning timestep (DMD2 SDXL: 399) is called with `timesteps=[399]`.
- an RF-velocity student on SDXL (DMDX's ADP parameterisation, docs/algorithms.md "The student's parameterisation"), one step: `UniPCMultistepScheduler` with
  flow sigmas and `flow_prediction` (SDXL's pipeline needs a scheduler with `scale_model_input`, which
  `FlowMatchEulerDiscreteScheduler` lacks); its single step is x0 = x_T - v(x_T, 1000).

Call arguments that the stock pipeline needs besides the folder go to DIR/dmdx_sampling.json (steps, guidance 1 —
the student needs no CFG — sizes, the T5 token count it was trained with, and the sigmas / timesteps above); the
command prints the call. README.md in DIR is the model card (trainer/model_card.py): teacher, method, steps, a code
block that runs the export, the run's metrics, recipe and provenance. An existing non-empty DIR is refused: nothing is
overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import diffusers
import torch
from peft import get_peft_model_state_dict

from parallel.offline import checkpoint_weights
from parallel.runtime_env import apply_runtime_defaults
from trainer.checkpoint import checkpoint_folder
from trainer.config import load_recipe
from trainer.families import build_family, prompt_stream_path
from trainer.families.prompts import StreamPromptTable
from trainer.lora import add_lora, fuse, peft_config
from trainer.model_card import model_card
from trainer.stages.artifacts import GENERATOR_FILE, final_stage, stage_student_path
from trainer.stages.roles import build_generator_denoiser, build_generator_module, load_student_weights

SAMPLING_FILE = "dmdx_sampling.json"
CARD_FILE = "README.md"   # the model card (trainer/model_card.py)


def pipeline_class(family_name: str):
    return {"sdxl": diffusers.StableDiffusionXLPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
            "cogvideox": diffusers.CogVideoXPipeline}[family_name]


def trained_betas(schedule) -> list[float]:
    """Betas whose cumulative product is the trainer's abar table (float64), for the schedulers' `trained_betas`."""
    abar = schedule.alphas_cumprod
    previous = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    return (1.0 - abar / previous).tolist()


def student_scheduler(recipe, denoiser):
    """(scheduler, extra call arguments) reproducing the student's K-step sampler."""
    g = recipe.distill.generator
    steps = g.num_steps
    if denoiser.prediction == "flow":
        if recipe.family.name == "sdxl":
            if steps != 1:
                raise ValueError("an RF-velocity SDXL student exports as one step only (SDXL's pipeline has no "
                                 "stochastic flow scheduler); sample it with python -m trainer.sample")
            return diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                     flow_shift=1.0, final_sigmas_type="zero",
                                                     timestep_spacing="linspace"), {}
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=recipe.schedule.shift, stochastic_sampling=True)
        return scheduler, {"sigmas": [1.0 - i / steps for i in range(steps)]}
    scheduler = diffusers.LCMScheduler(
        trained_betas=trained_betas(denoiser.schedule), prediction_type={"eps": "epsilon", "v": "v_prediction"}[
            denoiser.prediction], original_inference_steps=1000, timestep_scaling=1.0e5, clip_sample=False,
        set_alpha_to_one=True, thresholding=False)
    extra = {}
    if steps == 1 and g.conditioning_timestep is not None:
        extra["timesteps"] = [int(round(g.conditioning_timestep))]
    return scheduler, extra


def sampling_arguments(recipe, family, extra: dict, pipeline) -> dict:
    """The stock call's keyword arguments (besides prompts, generator and output type). The T5 token count is the
    one the student was trained with: a text prompt is then encoded as in training (the pipelines' defaults, 256 for
    SD3 and 226 for CogVideoX, hold only when the recipe's prompt_length says so)."""
    args = {"num_inference_steps": recipe.distill.generator.num_steps, "guidance_scale": 1.0, **extra}
    f = recipe.family
    if f.name == "sdxl":
        # the pipeline's default original_size = target_size = (height, width) are the family's time ids
        args.update(height=f.resolution, width=f.resolution)
    elif f.name == "sd3":
        args.update(height=f.resolution, width=f.resolution,
                    max_sequence_length=f.prompt_length - pipeline.tokenizer_max_length)   # CLIP tokens, then T5's
    else:
        args.update(height=f.height, width=f.width, num_frames=f.frames, use_dynamic_cfg=False,
                    max_sequence_length=family.prompt_length)
    return args


def export(run_dir: str, out: str, weights: str = "ema", dtype: str = "fp32", checkpoint: str | None = None,
           lora_only: bool = False) -> dict:
    """The student as a pipeline folder in `out`; lora_only: a LoRA student's adapters alone, in the format diffusers'
    `load_lora_weights` reads, with the student's scheduler (to load beside the teacher pipeline)."""
    recipe = load_recipe(os.path.join(run_dir, "config.yaml"))
    if recipe.family.name == "toy":
        raise ValueError("the toy family has no diffusers pipeline (hint: python -m trainer.sample draws its samples)")
    lora = recipe.distill.generator.lora
    if lora_only and lora is None:
        raise ValueError(f"{run_dir}: --lora: the run trained no LoRA adapters (distill.generator.lora is not set) "
                         f"(hint: export the whole student, without --lora)")
    stage = final_stage(recipe) or "distill"
    if checkpoint is not None:   # an unfinished run: the weights from a checkpoint of whichever backend wrote it
        folder = checkpoint_folder(run_dir, stage, checkpoint)
        family = build_family(recipe, run_dir=run_dir, read_prompts=False)   # the architecture only
        with torch.device("meta"):
            shapes = build_generator_module(recipe, family)
        path = checkpoint_weights(folder, shapes, "generator", weights)
    else:
        path = stage_student_path(run_dir, stage)
        if weights == "raw":
            path = os.path.join(run_dir, stage, GENERATOR_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: the {stage} stage has not finished (hint: rerun python -m trainer.main "
                                    f"on the recipe, which resumes and writes the student at the end, or export a "
                                    f"checkpoint with --checkpoint latest)")
        family = build_family(recipe, run_dir=run_dir, read_prompts=False)   # the architecture only
    denoiser = build_generator_denoiser(recipe)
    stock = family.denoiser_class.__mro__[1]          # the diffusers class the student subclass extends
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    student = stock.from_config(family.config)
    scheduler, extra = student_scheduler(recipe, denoiser)
    cls = pipeline_class(recipe.family.name)
    denoiser_key = "unet" if recipe.family.name == "sdxl" else "transformer"
    if lora is not None:   # adapters trained on the frozen base: fused into it, then dropped
        load_student_weights(add_lora(student, lora), path)
        if lora_only:
            save_adapters(cls, denoiser_key, student.to(torch_dtype), lora, out)
            scheduler.save_pretrained(os.path.join(out, "scheduler"))
            pipeline = cls.from_pretrained(recipe.teacher.pretrained, **{denoiser_key: None, "vae": None})
        else:
            fuse(student)
    else:
        load_student_weights(student, path)
    if not lora_only:
        student.to(torch_dtype)
        pipeline = cls.from_pretrained(recipe.teacher.pretrained, **{denoiser_key: student, "scheduler": scheduler})
        pipeline.save_pretrained(out)
    call = sampling_arguments(recipe, family, extra, pipeline)
    with open(os.path.join(out, SAMPLING_FILE), "w") as f:
        json.dump(call, f, indent=2)
    card = model_card(recipe, run_dir, out, cls.__name__, call, SAMPLING_FILE, example_prompt(recipe, run_dir),
                      weights, checkpoint, lora_base=recipe.teacher.pretrained if lora_only else None,
                      scheduler_class=type(scheduler).__name__)
    with open(os.path.join(out, CARD_FILE), "w") as f:
        f.write(card)
    return call


def save_adapters(cls, denoiser_key: str, student, lora, out: str) -> None:
    """The adapters of a peft-adapted denoiser through the pipeline class's own `save_lora_weights`, in peft's key
    layout (`lora_A` / `lora_B`, as diffusers' own LoRA training scripts save them: its `convert_state_dict_to_
    diffusers` would rename attention layers' keys to the old `lora.down` layout, which `load_lora_weights` then
    skips), with the LoRA config as metadata so the recipe's alpha / rank apply."""
    layers = get_peft_model_state_dict(student)
    cls.save_lora_weights(out, **{f"{denoiser_key}_lora_layers": layers,
                                  f"{denoiser_key}_lora_adapter_metadata": peft_config(lora).to_dict()})


def example_prompt(recipe, run_dir: str) -> str:
    """The card's example: the run's first prompt when it trained on encoded prompts."""
    stream = prompt_stream_path(recipe, run_dir)
    if stream is not None and os.path.isfile(os.path.join(stream, "index.json")):
        return StreamPromptTable(stream, {}).texts([0])[0]
    return "a photograph of a red fox in fresh snow"


def main(argv=None) -> int:
    apply_runtime_defaults()
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True, help="new folder for the pipeline")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema", help="the EMA student (default) or the "
                        "raw generator weights")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="the student's saved dtype")
    parser.add_argument("--lora", action="store_true", help="a LoRA student's adapters alone (diffusers' "
                        "load_lora_weights format) and its scheduler, to load beside the teacher pipeline")
    parser.add_argument("--checkpoint", default=None, help="export an unfinished run from a checkpoint of its last "
                        "training stage: 'latest' or a step folder (step_0000120), written by any backend")
    args = parser.parse_args(argv)
    config = os.path.join(args.run_dir, "config.yaml")
    if not os.path.isfile(config):
        print(f"error: {args.run_dir}: not a run directory (missing {config}) (hint: the run.dir of a trained recipe)",
              file=sys.stderr)
        return 2
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        print(f"error: {args.out} exists and is not empty (hint: pick a new folder; nothing was written)",
              file=sys.stderr)
        return 2
    try:
        call = export(args.run_dir, args.out, args.weights, args.dtype, args.checkpoint, args.lora)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = pipeline_class(load_recipe(config).family.name).__name__
    arguments = ", ".join(f"{k}={v!r}" for k, v in call.items())
    print(f"wrote {args.out}: load it with diffusers.{name}.from_pretrained({args.out!r}) and call it with "
          f"{arguments} (also in {os.path.join(args.out, SAMPLING_FILE)})")
    if name == "StableDiffusion3Pipeline" and call["num_inference_steps"] > 1:
        print("note: StableDiffusion3Pipeline re-noises from torch's global RNG (it does not pass `generator` to "
              "scheduler.step): call torch.manual_seed(seed) before it to reproduce python -m trainer.sample --seed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
