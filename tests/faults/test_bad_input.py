"""Faults 7, 8, 9: bad input gets one line and a documented exit code (trainer/exit_codes.py: 2 bad input, 3 the
environment), before any work and with nothing lost."""
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys


from tests.faults.conftest import ENV, copy_run, one_error_line, run_trainer, unfinish
from tests.helpers import ROOT, SMOKE
from trainer.checkpoint import problems


def test_optimizer_for_one_of_several_trained_roles_is_refused_before_the_teacher(tmp_path):
    """(7) ADM trains generator, fake_score and heads: an optimizer section naming only the generator is refused at
    start (exit 2, one line naming the key), before the teacher stage writes anything."""
    run_dir = tmp_path / "run"
    line = one_error_line(run_trainer(run_dir, "distill.optimizer={generator: {lr: 1e-4}}", expect=2))
    assert "distill.optimizer" in line
    assert not (run_dir / "teacher").exists()


def dry_run_script(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "slurm.submit", SMOKE, *overrides, "--dry-run"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)


def test_sbatch_template_values_are_never_expanded_again(tmp_path):
    """(8) A launch.env value "{{OVERRIDES}}" beside a run.dir holding `$(touch X)`: the env value stays those
    literal characters (executed by bash: no file appears) and run.dir reaches trainer.main as one literal argv
    item. Env names that are not shell names are refused with one line; `{{` in a value is just text."""
    marker = tmp_path / "X"
    run_dir = f"{tmp_path}/run$(touch {marker})"
    result = dry_run_script(tmp_path, f"run.dir={run_dir}", "launch.env={PAYLOAD: '{{OVERRIDES}}'}")
    assert result.returncode == 0, result.stderr[-2000:]
    script = result.stdout
    export = next(line for line in script.splitlines() if line.startswith("export PAYLOAD="))
    shown = subprocess.run(["bash", "-c", f'{export}; printf %s "$PAYLOAD"'], capture_output=True, text=True)
    assert shown.stdout == "{{OVERRIDES}}" and not marker.exists()
    launch_line = script[script.index("srun "):].split("&\n")[0].replace("\\\n", " ")
    argv = shlex.split(launch_line)
    assert argv.count(f"run.dir={os.path.abspath(run_dir)}") == 1, argv
    assert not marker.exists()

    refused = dry_run_script(tmp_path, f"run.dir={tmp_path}/run", "launch.env={'B;C': x}")
    assert refused.returncode == 2 and "launch.env" in one_error_line(refused)
    braces = dry_run_script(tmp_path, f"run.dir={tmp_path}/run", "launch.env={A: 'x{{y'}")
    assert braces.returncode == 0 and "export A='x{{y'" in braces.stdout, braces.stderr[-2000:]


def call_main(capsys, *argv):
    from trainer.main import main
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    return code, errors[0]


def unwritable_dir(tmp_path):
    """A folder this process cannot create files in: a read-only folder, or (as root, which ignores permissions)
    a path on sysfs, where mkdir fails with EPERM."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return folder / "run"
    return "/sys/dmdx-read-only-run"


def test_bad_input_and_environment_faults_get_one_line_and_their_exit_code(tmp_path, capsys, finished):
    """(9) Each case: one `error:` line, exit 2 (bad input) or 3 (environment), nothing written or lost."""
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(f"base: {SMOKE}\nrun: {{dir: /tmp/caf\xe9}}\n".encode("latin-1"))
    code, line = call_main(capsys, str(bad))
    assert code == 2 and "not UTF-8" in line
    code, line = call_main(capsys, SMOKE, 'run.dir=""')
    assert code == 2 and "run.dir" in line
    code, line = call_main(capsys, SMOKE, f"run.dir={tmp_path / 'r'}", "distill.train.steps=true")
    assert code == 2 and "distill.train.steps" in line
    code, line = call_main(capsys, SMOKE, f"run.dir={unwritable_dir(tmp_path)}")
    assert code == 3 and ("Permission denied" in line or "not permitted" in line), line

    damaged = copy_run(finished, tmp_path / "damaged")
    (damaged / "config.yaml").write_bytes(b"run: [\n\xff")
    code, line = call_main(capsys, SMOKE, f"run.dir={damaged}")
    assert code == 2 and "config.yaml" in line and "damaged" in line
    assert (damaged / "config.yaml").read_bytes() == b"run: [\n\xff"

    # a stream of the wrong kind is refused before the teacher stage runs
    fresh = tmp_path / "fresh"
    code, line = call_main(capsys, SMOKE, f"run.dir={fresh}", f"data.real_remote={finished / 'ode_pairs'}")
    assert code == 2 and "ode_pairs" in line and not (fresh / "teacher").exists()

    # an evaluation model that is not here is refused before training, not after it
    latent = tmp_path / "latent"
    code, line = call_main(capsys, os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml"), f"run.dir={latent}",
                           "teacher.pretrained=org/model", "stages=[distill,evaluate]", "eval.dinov2=org/no-such-dinov2")
    assert code == 2 and "eval.dinov2" in line and "org/no-such-dinov2" in line and not (latent / "distill").exists()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(finished, tmp_path):
    """(9) A checkpoint write the file system refuses (here: the file-size limit, EFBIG, as a full disk's ENOSPC):
    one line, exit 3, no temp folder left, and the previous checkpoint still verifies."""
    run_dir = copy_run(finished, tmp_path / "run")
    unfinish(run_dir, "distill")
    checkpoints = run_dir / "distill" / "checkpoints"
    shutil.rmtree(checkpoints / "step_0000040")
    state_bytes = (checkpoints / "step_0000030" / "state.pt").stat().st_size

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (state_bytes // 2, state_bytes // 2))

    result = subprocess.run([sys.executable, "-m", "trainer.main", SMOKE, f"run.dir={run_dir}"], env=ENV, cwd=ROOT,
                            capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert result.returncode == 3, result.stderr[-3000:]
    line = one_error_line(result)
    assert "step 40" in line and "File too large" in line and "step_0000030" in line, line
    assert sorted(os.listdir(checkpoints)) == ["latest", "step_0000030"]
    assert problems(str(checkpoints / "step_0000030")) == []


def test_sample_and_export_refuse_bad_paths(finished, tmp_path, capsys):
    """(9) trainer.sample --out naming a directory: one line, exit 2; a path without .npz is written as given.
    trainer.export --checkpoint naming a temp folder (an unfinished write): one line, exit 2."""
    from trainer.export import main as export_main
    from trainer.sample import main as sample_main
    assert sample_main([str(finished), "--num", "4", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    out = tmp_path / "samples"
    assert sample_main([str(finished), "--num", "4", "--out", str(out)]) == 0
    assert f"to {out}\n" in capsys.readouterr().out and out.is_file()

    from tests.unit.test_export_cli import run_dir_with_config
    run = run_dir_with_config(tmp_path, "tiny/sdxl_tiny.yaml", "teacher.pretrained=org/model")
    partial = os.path.join(run, "distill", "checkpoints", "tmp-step_0000010")
    os.makedirs(partial)
    with open(os.path.join(partial, "extra.json"), "w") as f:
        json.dump({"step": 10}, f)
    assert export_main([run, "--out", str(tmp_path / "out"), "--checkpoint", "tmp-step_0000010"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "no such checkpoint" in err


def test_evaluate_reads_a_toy_checkpoint_and_refuses_bad_input(finished, tmp_path, capsys):
    """trainer.evaluate on the smoke run: its newest checkpoint's EMA evaluated (metrics under evaluate/step_N); a
    missing checkpoint and a non-eval override are one line each, exit 2."""
    from trainer.evaluate import main as evaluate_main
    run = copy_run(finished, tmp_path / "run")
    assert evaluate_main([str(run), "--checkpoint", "latest", "eval.num_samples=200"]) == 0
    step_dirs = list((run / "evaluate").glob("step_*"))
    assert len(step_dirs) == 1 and json.loads((step_dirs[0] / "metrics.json").read_text())["student"]["fd"] > 0
    for args, fragment in ((["--checkpoint", "step_9999999"], "no such checkpoint"),
                           (["distill.train.steps=5"], "only eval.* settings")):
        assert evaluate_main([str(run), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and fragment in err, err
