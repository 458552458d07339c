"""Bad input to `trainer.export`, `trainer.tiny_pipeline` and the latent `trainer.sample` options: one line, exit 2,
nothing written."""
import os

from tests.helpers import ROOT
from trainer.config import dump_recipe, load_recipe


def run_dir_with_config(tmp_path, recipe_name, *overrides):
    recipe = load_recipe(os.path.join(ROOT, "recipes", recipe_name), [f"run.dir={tmp_path / 'run'}", *overrides])
    os.makedirs(recipe.run.dir)
    with open(os.path.join(recipe.run.dir, "config.yaml"), "w") as f:
        f.write(dump_recipe(recipe))
    return recipe.run.dir


def one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_export_refuses_bad_input(tmp_path, capsys):
    from trainer.export import main
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "not a run directory" in one_line(capsys)
    run = run_dir_with_config(tmp_path, "tiny/sdxl_tiny.yaml", "teacher.pretrained=org/model")
    assert main([run, "--out", str(tmp_path / "out")]) == 2
    assert "has not finished" in one_line(capsys)
    assert main([run, "--out", str(tmp_path / "out"), "--checkpoint", "latest"]) == 2
    assert "no checkpoint" in one_line(capsys)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert main([run, "--out", str(occupied)]) == 2
    assert "nothing was written" in one_line(capsys)
    assert os.listdir(occupied) == ["keep.txt"]
    assert not (tmp_path / "out").exists()


def test_export_of_a_toy_run_is_refused(tmp_path, capsys):
    from trainer.export import main
    run = run_dir_with_config(tmp_path, "tiny/toy_smoke.yaml")
    os.makedirs(os.path.join(run, "distill"))
    open(os.path.join(run, "distill", "student.safetensors"), "w").close()
    assert main([run, "--out", str(tmp_path / "out")]) == 2
    assert "toy family has no diffusers pipeline" in one_line(capsys)


def test_tiny_pipeline_refuses_bad_input(tmp_path, capsys):
    from trainer.tiny_pipeline import main
    assert main(["sd4_tiny", str(tmp_path / "p")]) == 2
    assert "unknown tiny model" in one_line(capsys)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    assert main(["sd3_medium_tiny", str(occupied)]) == 2
    assert "nothing was written" in one_line(capsys)
    assert os.listdir(occupied) == ["x"]
