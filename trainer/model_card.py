"""The export's README.md: what the student is (teacher, method, steps, the recipe), how to call it (a runnable code
block with exactly the written sampler arguments), its metrics with their prompt set when the run evaluated it, and
where it came from (the run's provenance). trainer/export.py writes it beside the pipeline."""
from __future__ import annotations

import json
import os

import yaml

from trainer.config import dump_recipe
from trainer.provenance import last_provenance
from trainer.stages.artifacts import method_label

SD3_GLOBAL_RNG = ("torch.manual_seed(seed)   # SD3's pipeline re-noises from torch's global generator between steps\n")


def code_block(pipeline_name: str, folder: str, sampling_file: str, prompt: str, family: str,
               lora_base: str | None = None, scheduler_class: str = "") -> str:
    """Python that loads the export and draws one sample with the student's own sampler. lora_base: the export
    holds adapters only; they load into this (the teacher's) pipeline with the student's scheduler."""
    output = "frames[0]  # a list of PIL frames" if family == "cogvideox" else "images[0]"
    if lora_base is None:
        load = f"pipe = {pipeline_name}.from_pretrained(folder)\n"
    else:
        load = (f"scheduler = {scheduler_class}.from_pretrained(folder, subfolder=\"scheduler\")\n"
                f"pipe = {pipeline_name}.from_pretrained({lora_base!r}, scheduler=scheduler)\n"
                f"pipe.load_lora_weights(folder)   # the student's LoRA adapters\n")
    imports = pipeline_name + (f", {scheduler_class}" if lora_base else "")
    return (f"import json\n\nimport torch\nfrom diffusers import {imports}\n\n"
            f"folder = {folder!r}\n"
            f"{load}"
            f"with open(f\"{{folder}}/{sampling_file}\") as f:\n"
            f"    call = json.load(f)   # the student's sampler: steps, timesteps, guidance 1, size, tokens\n"
            f"seed = 0\n"
            f"{SD3_GLOBAL_RNG if family == 'sd3' else ''}"
            f"out = pipe(prompt=[{prompt!r}], generator=torch.Generator().manual_seed(seed), **call)\n"
            f"sample = out.{output}\n")


def model_card(recipe, run_dir: str, out: str, pipeline_name: str, call: dict, sampling_file: str, prompt: str,
               weights: str, checkpoint: str | None, lora_base: str | None = None, scheduler_class: str = "") -> str:
    """The README.md text of an export (lora_base: an adapters-only export, see code_block)."""
    g = recipe.distill.generator
    lines = [f"# {os.path.basename(os.path.abspath(out))}: a {g.num_steps}-step {recipe.family.name} student", "",
             f"Distilled with dmdx from `{recipe.teacher.pretrained}` by {method_label(recipe)} "
             f"({' -> '.join(recipe.stages)}).", "",
             "| | |", "| --- | --- |",
             f"| teacher | `{recipe.teacher.pretrained}` |",
             f"| method | {method_label(recipe)}, guidance scale {recipe.distill.method.guidance_scale} distilled in |",
             f"| student steps | {g.num_steps} ({g.prediction or recipe.schedule.prediction} prediction) |",
             f"| training | {recipe.distill.train.steps} distill steps at global batch {recipe.distill.train.batch_size} |",
             f"| weights | {weights}{f', from checkpoint {checkpoint}' if checkpoint else ''}"
             f"{', LoRA adapters only' if lora_base else ''} |",
             f"| pipeline | diffusers `{pipeline_name}` |", "",
             "## Use", "", "```python", code_block(pipeline_name, os.path.abspath(out), sampling_file, prompt,
                                                     recipe.family.name, lora_base, scheduler_class).rstrip(),
             "```", "",
             f"The call arguments (`{sampling_file}`): `{json.dumps(call)}`. Guidance is distilled into the student: "
             f"call it at guidance_scale 1.", ""]
    metrics = os.path.join(run_dir, "evaluate", "metrics.json")
    lines += ["## Metrics", ""]
    if os.path.isfile(metrics):
        with open(metrics) as f:
            lines += ["From the run's evaluate stage (`evaluate/metrics.json`):", "", "```json", f.read().strip(),
                      "```", ""]
    else:
        lines += ["The run has no evaluate stage output (`evaluate/metrics.json`).", ""]
    lines += ["## Recipe", "", "```yaml", dump_recipe(recipe).strip(), "```", ""]
    provenance = last_provenance(run_dir)
    lines += ["## Provenance", ""]
    if provenance:
        lines += ["The last attempt's record (`provenance.jsonl`):", "", "```yaml",
                  yaml.safe_dump(provenance, sort_keys=False).strip(), "```", ""]
    else:
        lines += ["No provenance.jsonl in the run directory.", ""]
    return "\n".join(lines)
