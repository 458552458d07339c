"""Recipes: base inheritance, overrides, and the one-line errors (exit 2, no traceback) for bad input."""
import concurrent.futures
import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers import ROOT, SMOKE
from trainer.config import RecipeError, dump_recipe, load_recipe
from trainer.stages.run_dir import prepare_run_dir


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "run: {dir: a, seed: 3}\ndistill:\n  train: {steps: 7, batch_size: 4}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ndistill:\n  train: {steps: 9}\n")
    r = load_recipe(child, ["distill.method.name=dmd2", "distill.method.ttur=3", "run.seed=11"])
    assert r.run.dir == "a" and r.run.seed == 11
    assert r.distill.train.steps == 9 and r.distill.train.batch_size == 4
    assert r.distill.method.name == "dmd2" and r.distill.method.ttur == 3


def test_shipped_recipes_validate():
    for folder, _, files in os.walk(os.path.join(ROOT, "recipes")):
        for name in files:
            if name.endswith(".yaml"):
                # tiny twins of pretrained families name their teacher on the command line (a tiny pipeline folder)
                path = os.path.join(folder, name)
                tiny_twin = folder.endswith("tiny") and name != "toy_smoke.yaml"
                load_recipe(path, ["teacher.pretrained=stabilityai/stable-diffusion-xl-base-1.0"] if tiny_twin else [])


# a CogVideoX tiny twin's distill stage (2 attention heads)
COGVIDEOX = ("run: {dir: x}\nfamily: {name: cogvideox, model: cogvideox_2b_tiny, frames: 9, height: 64, width: 64}\n"
             "schedule: {prediction: v, zero_terminal_snr: true}\nteacher: {pretrained: org/model}\n"
             "stages: [distill]\n")
CASES = {
    "unknown key": ("run: {dir: x}\ndistill:\n  train: {stepz: 5, batch_size: 2}\n", [], "distill.train.stepz",
                    "did you mean 'steps'"),
    "wrong type": ("run: {dir: x}\ndistill:\n  train: {steps: many, batch_size: 2}\n", [], "distill.train.steps",
                   "valid integer"),
    "missing base file": ("base: nowhere.yaml\nrun: {dir: x}\n", [], "base", "not found"),
    "bad override syntax": ("run: {dir: x}\n", ["distill.train.steps"], "distill.train.steps", "key=value"),
    "override unknown key": ("run: {dir: x}\n", ["distill.method.guidance=3"], "distill.method.guidance",
                             "guidance_scale"),
    "override wrong type": ("run: {dir: x}\n", ["teacher.train.steps=[1,2]"], "teacher.train.steps", "integer"),
    "impossible combination": ("run: {dir: x}\nfamily: {dataset: grid25}\ndistill:\n  method: {name: adm, "
                               "guidance_scale: 3.0}\n", [], "distill.method.guidance_scale", "unconditional"),
    "unknown method": ("run: {dir: x}\ndistill:\n  method: {name: gan}\n", [], "distill.method", "dmd"),
    "missing required": ("family: {dataset: digits}\n", [], "run", "missing"),
    "adp needs a velocity student": ("run: {dir: x}\nschedule: {prediction: eps}\n"
                                     "stages: [teacher, collect, pretrain, distill]\n", [],
                                     "distill.generator.prediction", "flow"),
    "pretrain without pairs": ("run: {dir: x}\nstages: [teacher, pretrain, distill]\n", [], "stages", "ODE pairs"),
    "adp weights": ("run: {dir: x}\npretrain:\n  method: {name: adp, pixel_weight: 0.5}\n", [],
                    "pretrain.method.pixel_weight", "must be 1"),
    "pretrain with conditioning timestep": ("run: {dir: x}\nstages: [teacher, collect, pretrain]\ndistill:\n"
                                            "  generator: {conditioning_timestep: 400}\n", [],
                                            "distill.generator.conditioning_timestep", "true timesteps"),
    "stage order": ("run: {dir: x}\nstages: [teacher, pretrain, collect]\n", [], "stages", "order"),
    "optimizer missing a trained role": ("run: {dir: x}\ndistill:\n  optimizer: {generator: {lr: 1.0e-4}}\n", [],
                                         "distill.optimizer", "no optimizer for fake_score, heads"),
    "override of an optimizer for a role the method does not train": ("run: {dir: x}\ndistill:\n  optimizer: "
                                                                      "{generator: {lr: 1.0e-4}, fake_score: {lr: "
                                                                      "1.0e-4}}\n", ["distill.method.name=dmd",
                                                                           "distill.optimizer.heads.lr=1.0e-3"],
                                                       "distill.optimizer.heads", "not trained by it"),
    "override of a boolean for a number": ("run: {dir: x}\n", ["distill.train.steps=true"], "distill.train.steps",
                             "expected a number"),
    "family prediction": ("run: {dir: x}\nfamily: {name: sd3, model: sd3_medium_tiny}\nschedule: {prediction: eps}\n"
                          "teacher: {pretrained: org/model}\nstages: [distill]\n", [], "schedule.prediction",
                          "prediction: flow"),
    "cogvideox needs zero terminal snr": ("run: {dir: x}\nfamily: {name: cogvideox}\nschedule: {prediction: v}\n"
                                          "teacher: {pretrained: org/model}\nstages: [distill]\n", [],
                                          "schedule.zero_terminal_snr", "zero_terminal_snr"),
    "empty prompt needs prompts": ("run: {dir: x}\nfamily: {name: sd3, uncond: empty_prompt}\n"
                                   "teacher: {pretrained: org/model}\nstages: [distill]\n", [], "family.uncond",
                                   "family.prompts"),
    "missing prompt file": ("run: {dir: x}\nfamily: {name: sd3, prompts: /nonexistent/p.txt}\n"
                            "teacher: {pretrained: org/model}\nstages: [distill]\n", [], "family.prompts",
                            "neither a prompt file nor an encoded prompt stream"),
    "evaluate without feature models": ("run: {dir: x}\nfamily: {name: sdxl}\nschedule: {prediction: eps}\n"
                                        "teacher: {pretrained: org/model}\nstages: [distill, evaluate]\n", [], "stages",
                                        "eval.dinov2"),
    "one sample for a covariance": ("run: {dir: x}\nfamily: {name: sdxl}\nschedule: {prediction: eps}\n"
                                    "teacher: {pretrained: org/model}\nstages: [distill, evaluate]\n"
                                    "eval: {dinov2: org/dino, num_samples: 1}\n", [], "eval.num_samples",
                                    "at least 2"),
    "clip override without prompt texts": ("run: {dir: x}\nfamily: {name: sdxl}\nschedule: {prediction: eps}\n"
                                        "teacher: {pretrained: org/model}\nstages: [distill]\n",
                                        ["eval.every=100", "eval.clip=org/clip"], "eval.clip", "eval.prompts"),
    "lora on a toy": ("run: {dir: x}\ndistill:\n  generator: {lora: {rank: 4}}\n", [], "distill.generator.lora",
                      "drop distill.generator.lora"),
    "pixel discriminator on sd3": ("run: {dir: x}\nfamily: {name: sd3}\ndistill:\n  generator: {prediction: flow}\n"
                                   "teacher: {pretrained: org/model}\ndata: {pairs_remote: s3://b/p}\n"
                                   "stages: [pretrain, distill]\n", [], "pretrain.method.pixel_weight",
                                   "no pixel discriminator"),
    "sequence parallel on sdxl": ("run: {dir: x}\nfamily: {name: sdxl}\nschedule: {prediction: eps}\n"
                                  "teacher: {pretrained: org/model}\nstages: [distill]\n"
                                  "parallel: {backend: fsdp2, sp: 2}\n", [], "parallel.sp", "CogVideoX"),
    "sequence parallel without sharding": (COGVIDEOX + "parallel: {sp: 2}\n", [], "parallel.sp", "fsdp2 or zero3"),
    "sequence parallel with xformers": (COGVIDEOX + "parallel: {backend: zero3, sp: 2, attention: xformers}\n", [],
                                        "parallel.attention", "sdpa"),
    "sequence parallel heads": (COGVIDEOX + "parallel: {backend: fsdp2, sp: 4}\n", [], "parallel.sp",
                                "2 attention heads do not split over parallel.sp = 4"),
    "keep gathered without sharding": (COGVIDEOX + "parallel: {backend: data_parallel, keep_gathered: [teacher]}\n",
                                       [], "parallel.keep_gathered", "holds every role whole"),
    "zero3 keeps a trained role": (COGVIDEOX + "parallel: {backend: zero3, keep_gathered: [teacher, fake_score]}\n",
                                   [], "parallel.keep_gathered", "only the frozen teacher"),
    "unit size without fsdp2": (COGVIDEOX + "parallel: {backend: zero3, fsdp_min_unit_params: 1000}\n", [],
                                "parallel.fsdp_min_unit_params", "parallel.backend: fsdp2"),
    "compile with zero3": (COGVIDEOX + "parallel: {backend: zero3, compile: true}\n", [], "parallel.compile",
                           "parallel.backend: fsdp2"),
    "sequence parallel stages": (COGVIDEOX.replace("[distill]", "[collect, distill]") +
                                 "parallel: {backend: fsdp2, sp: 2}\n", [], "stages", "distill stage only"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_errors_name_file_key_and_hint(tmp_path, case):
    text, overrides, key, fragment = CASES[case]
    path = write(tmp_path, "r.yaml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert key in message and fragment in message, message
    assert "\n" not in message
    assert ("command line" in message) if overrides and "override" in case else (str(tmp_path) in message)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("/nonexistent/recipe.yaml")


def test_error_names_the_base_file_that_set_the_key(tmp_path):
    write(tmp_path, "base.yaml", "run: {dir: x}\nteacher:\n  train: {steps: -4, batch_size: 2}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    assert str(info.value).startswith(str(tmp_path / "base.yaml")) and "teacher.train.steps" in str(info.value)


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "trainer.main", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def run_clis(cases, at_once: int = 2) -> list[subprocess.CompletedProcess]:
    """run_cli for each argument list, `at_once` processes at a time (each spends seconds importing torch)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(lambda args: subprocess.run([sys.executable, "-m", "trainer.main", *args],
                                                         capture_output=True, text=True, cwd=ROOT, env=env,
                                                         timeout=120), cases))


def test_cli_exit_2_one_line_no_traceback(tmp_path):
    """Each malformed input through the real entry point: exit 2, one line on stderr, no traceback, no run dir."""
    bad = write(tmp_path, "bad.yaml", f"run: {{dir: {tmp_path}/run}}\ndistill:\n  train: {{stepz: 1, batch_size: 2}}\n")
    wrong = write(tmp_path, "wrong.yaml", f"run: {{dir: {tmp_path}/run}}\nteacher:\n  train: {{steps: x, batch_size: 2}}\n")
    cases = [[bad], [wrong], [str(tmp_path / "missing.yaml")], [SMOKE, "distill.train.steps"],
             [SMOKE, f"run.dir={tmp_path}/run", "distill.train.steps=-1"],
             [SMOKE, f"run.dir={tmp_path}/run", "distill.train.batch_size=8", "distill.train.micro_batch_size=3"],
             [SMOKE, f"run.dir={tmp_path}/run", "pretrain.train.batch_size=8", "pretrain.train.micro_batch_size=3"],
             [SMOKE, f"run.dir={tmp_path}/run", "distill.optimizer={generator: {lr: 1.0e-4}}"],
             [SMOKE, f"run.dir={tmp_path}/run", "distill.train.steps=true"]]
    for result in run_clis(cases):
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_xformers_without_cuda_is_a_configuration_error(tmp_path):
    """xformers has CUDA kernels only: asking for it on a CPU run stops before any work with one line (exit 2);
    the toy has no attention to switch."""
    sdxl = os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml")
    cases = ((sdxl, "CUDA only", ["teacher.pretrained=stabilityai/stable-diffusion-xl-base-1.0"]),
             (SMOKE, "no attention layers", []))
    for recipe, family_hint, extra in cases:
        result = run_cli(recipe, f"run.dir={tmp_path}/run", "parallel.attention=xformers", *extra)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "parallel.attention" in lines[0] and family_hint in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_rerun_with_a_different_recipe_is_refused(tmp_path):
    from trainer.config import dump_recipe
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = load_recipe(SMOKE, [f"run.dir={run_dir}"])
    (run_dir / "config.yaml").write_text(dump_recipe(recipe))
    result = run_cli(SMOKE, f"run.dir={run_dir}", "distill.train.steps=3")
    assert result.returncode == 2 and "different recipe" in result.stderr
    assert (run_dir / "config.yaml").read_text() == dump_recipe(recipe)   # nothing overwritten


def test_a_run_recorded_before_a_new_option_resumes_after_it(tmp_path):
    """A run dir written by an older version lacks the options added since: at their defaults they keep the old
    behaviour, so the same recipe is accepted; a non-default value of the new option is still refused."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = load_recipe(SMOKE, [f"run.dir={run_dir}"])
    old = yaml.safe_load(dump_recipe(recipe))
    del old["distill"]["method"]["dmd_weight"]          # an option this version added
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    assert prepare_run_dir(recipe, SMOKE) == str(run_dir)
    changed = load_recipe(SMOKE, [f"run.dir={run_dir}", "distill.method.dmd_weight=1.0"])
    with pytest.raises(RecipeError, match="distill.method.dmd_weight"):
        prepare_run_dir(changed, SMOKE)


def test_another_method_keeps_none_of_the_base_methods_own_options(tmp_path):
    """The toy default tunes ADM (gradient_penalty); a child recipe or `distill.method.name=dmd` runs DMD with the
    options DMD has (guidance_scale carries over) and without ADM's own. Given with the new name, an option DMD lacks
    is still an error, and so is a misspelt key under an unchanged name."""
    assert load_recipe(SMOKE).distill.method.gradient_penalty > 0
    dmd = load_recipe(SMOKE, ["distill.method.name=dmd"]).distill.method
    assert dmd.name == "dmd" and dmd.guidance_scale == 2.0 and not hasattr(dmd, "gradient_penalty")
    child = tmp_path / "dmd2.yaml"
    child.write_text(f"base: {SMOKE}\ndistill:\n  method: {{name: dmd2, ttur: 3}}\n")
    assert load_recipe(str(child)).distill.method.ttur == 3
    with pytest.raises(RecipeError, match="distill.method.gradient_penalty"):
        load_recipe(SMOKE, ["distill.method.name=dmd", "distill.method.gradient_penalty=1.0"])
    with pytest.raises(RecipeError, match="distill.method.gradient_penaltyy"):
        load_recipe(SMOKE, ["distill.method.gradient_penaltyy=1.0"])
