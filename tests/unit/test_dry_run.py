"""`python -m trainer.main RECIPE --dry-run` (the README's own command) on every recipe under recipes/ with every
backend the recipe allows there: it prints a plan, or one error line for a backend the recipe's world size or
family refuses, never a traceback. Model states only (--no-trace), and the toy ones also trace a step (fake tensors)
on the default backend, data_parallel, whose dry run used to crash. The tiny twins name a pipeline folder on the
command line (teacher.pretrained): a hub id stands in, planning reads the checked-in config. One process."""
import glob
import os

from tests.helpers import ROOT, saved_clip, saved_vision, tiny_sdxl_pipeline
from trainer.config import load_recipe
from trainer.main import main

RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True))
BACKENDS = ("data_parallel", "fsdp2", "zero3")


def test_dry_run_plans_every_recipe_on_every_backend_it_allows(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    planned = {}
    for path in RECIPES:
        toy = os.sep + "toy" + os.sep in path or path.endswith("toy_smoke.yaml")
        teacher = ["teacher.pretrained=org/tiny-twin"] if os.sep + "tiny" + os.sep in path and not toy else []
        for backend in BACKENDS:
            trace = toy and backend == "data_parallel"
            code = main([path, "--dry-run", f"parallel.backend={backend}", *teacher, *([] if trace else ["--no-trace"])])
            out, err = capsys.readouterr()
            assert "Traceback" not in err, (path, backend, err[-2000:])
            if code == 0:
                assert "total per GPU" in out and "planning for" in out, (path, backend, out[-1000:])
                for stage in [st for st in ("pretrain", "distill") if st in load_recipe(path, teacher).stages]:
                    assert f"memory plan of the {stage} stage" in out, (path, backend, stage)   # ADP's too
                planned.setdefault(os.path.relpath(path, ROOT), []).append(backend)
            else:
                errors = [line for line in err.splitlines() if line.startswith("error: ")]
                assert code == 2 and len(errors) == 1, (path, backend, err[-2000:])
    assert sorted(planned) == sorted(os.path.relpath(p, ROOT) for p in RECIPES), planned   # each plans somewhere
    assert all("data_parallel" in backends for name, backends in planned.items() if "toy" in name), planned


def test_the_world_size_comes_from_the_flag_the_environment_or_the_launch_section(capsys, monkeypatch):
    sdxl = os.path.join(ROOT, "recipes", "sdxl", "dmdx_1step.yaml")
    toy = os.path.join(ROOT, "recipes", "toy", "default.yaml")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cases = [([sdxl], "planning for 32 ranks (launch: nodes x gpus_per_node)"),
             ([sdxl, "--world-size", "8"], "planning for 8 ranks (--world-size)"),
             ([toy], "planning for 1 ranks")]
    for args, expected in cases:
        assert main([*args, "--dry-run", "--no-trace"]) == 0
        assert expected in capsys.readouterr().out, args
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert main([sdxl, "--dry-run", "--no-trace"]) == 0
    assert "planning for 16 ranks (WORLD_SIZE)" in capsys.readouterr().out


def test_in_loop_evaluation_models_are_planned(tmp_path, capsys):
    """eval.every keeps a whole generator, the VAE and the feature models on every rank: one `evaluation` row of
    their parameters (fp32), read from the local configs."""
    from trainer.memory_plan import plan_memory
    pipeline = tiny_sdxl_pipeline(str(tmp_path / "pipeline"))
    dino, clip = saved_vision("dinov2", str(tmp_path / "dino")), saved_clip(str(tmp_path / "clip"))
    settings = [f"teacher.pretrained={pipeline}", "eval.every=10", f"eval.dinov2={dino}", f"eval.clip={clip}",
                f"eval.prompts={os.path.join(ROOT, 'recipes', 'prompts', 'tiny.txt')}"]
    recipe = load_recipe(os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml"), settings)
    plan = plan_memory(recipe, 2, trace=False)
    row = next(r for r in plan.roles if r.role == "evaluation")
    generator = next(r for r in plan.roles if r.role == "generator")
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, Dinov2Model
    expected = generator.numel + sum(sum(p.numel() for p in cls.from_pretrained(folder).parameters())
                                     for cls, folder in ((AutoencoderKL, os.path.join(pipeline, "vae")),
                                                         (Dinov2Model, dino), (CLIPModel, clip)))
    assert row.numel == expected and row.params == 4 * expected
    assert plan.total >= plan_memory(recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"every": 0})}),
                                      2, trace=False).total + row.params


def test_a_zero3_teacher_kept_whole_is_planned_whole():
    """`parallel.keep_gathered: [teacher]` under ZeRO-3 (persistent parameters): the plan holds the teacher's every
    parameter on each of 4 ranks (bf16: 2 bytes each; DeepSpeed's gathered layer and prefetch bucket are there
    either way), where the default holds a quarter (persistence threshold 0: no parameter is whole by default)."""
    from trainer.memory_plan import plan_memory   # imports the planner's model classes (seconds): this test only
    settings = ["teacher.pretrained=org/planning-only", "parallel.backend=zero3", "parallel.mixed_precision=bf16",
                "parallel.zero3_persistence_threshold=0"]
    path = os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml")
    default, kept = (next(r for r in plan_memory(load_recipe(path, [*settings, *extra]), 4, trace=False).roles
                          if r.role == "teacher") for extra in ([], ["parallel.keep_gathered=[teacher]"]))
    assert kept.params - default.params == 2 * default.numel * 3 / 4 > 0
    assert kept.buffers == default.buffers


def test_the_plan_prices_keeping_the_teacher_gathered():
    """The default plan (teacher sharded, re-gathered per call) names the gather policy that avoids it and its cost:
    the teacher's whole bf16 weights minus the quarter each of 4 ranks holds; a plan that keeps it says nothing."""
    from trainer.memory_plan import plan_memory   # imports the planner's model classes (seconds): this test only
    path = os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml")
    for backend in ("fsdp2", "zero3"):
        settings = ["teacher.pretrained=org/planning-only", f"parallel.backend={backend}",
                    "parallel.mixed_precision=bf16", "parallel.zero3_persistence_threshold=0",
                    "parallel.gpu_memory_gib=0.001"]
        plan = plan_memory(load_recipe(path, settings), 4, trace=False)
        teacher = next(r for r in plan.roles if r.role == "teacher")
        note = next(n for n in plan.notes if n.startswith("parallel.keep_gathered: [teacher]"))
        assert f"+{2 * teacher.numel * 3 / 4 / 2**30:.3f} GiB per rank" in note, note
        assert "does NOT fit in 0.001 GiB" in note, note
        kept = plan_memory(load_recipe(path, [*settings, "parallel.keep_gathered=[teacher]"]), 4, trace=False)
        assert not any("keep_gathered" in n for n in kept.notes), kept.notes
