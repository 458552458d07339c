"""`python -m trainer.main RECIPE --dry-run` (the README's own command) on every recipe under recipes/ with every
backend the recipe allows there: it prints a plan, or one error line for a backend the recipe's world size or
family refuses, never a traceback. Model states only (--no-trace), and the toy ones also trace a step (fake tensors)
on the default backend, data_parallel, whose dry run used to crash. The tiny twins name a pipeline folder on the
command line (teacher.pretrained): a hub id stands in, planning reads the checked-in config. One process."""
import glob
import os

from tests.helpers import ROOT
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
