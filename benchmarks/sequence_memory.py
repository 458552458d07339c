"""Per-rank activation memory of a CogVideoX ADM step with Ulysses sequence parallelism off (SP = 1) and on (SP = 2).

    python benchmarks/sequence_memory.py [--model cogvideox_5b_tiny] [--frames 17] [--height 96] [--width 96]

Two real processes (gloo, fp32) run the tiny twin's ADM phases on ONE sample per sequence-parallel group: SP = 1 is
two data-parallel ranks with a sample each, SP = 2 is one SP group sharing one sample. Activation memory is what
autograd saves for backward during a phase's forward (a `saved_tensors_hooks` pack hook adds up the distinct
storages: what every rank holds at the start of that phase's backward). The default 17 frames at 96 x 96 give
5 x 6 x 6 = 180 video tokens. Never run in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MIB = 1 << 20


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cogvideox_5b_tiny", choices=["cogvideox_2b_tiny", "cogvideox_5b_tiny"])
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every code path (CI runs it)")
    parser.add_argument("--worker", nargs=3, metavar=("PIPELINE", "SP", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.frames, args.height, args.width = 5, 32, 32
    return args


def saved_bytes_per_phase(args) -> dict[str, int]:
    """On this rank: {phase: bytes saved for backward during its forward} of step 0 (every phase of ADM)."""
    import torch
    from torch.distributed import _functional_collectives as funcol
    from parallel.distributed import init_distributed
    from trainer.config import load_recipe
    from trainer.stages.training import build_stage_trainer
    pipeline, sp, out = args.worker
    info = init_distributed(need_group=True)
    with tempfile.TemporaryDirectory() as run_dir:
        recipe = load_recipe(os.path.join(ROOT, "recipes", "tiny", f"{args.model}.yaml"), [
            f"run.dir={run_dir}", f"teacher.pretrained={pipeline}", f"family.frames={args.frames}",
            f"family.height={args.height}", f"family.width={args.width}", f"parallel.sp={sp}",
            f"distill.train.batch_size={info.world_size // int(sp)}", "distill.method.ttur=1"])
        t = build_stage_trainer(recipe, run_dir, info, "distill")
        contexts = t.micro_contexts(0)
        per_phase = {}
        for phase in t.method.phases(0):
            seen, total = set(), [0]

            def pack(tensor):
                if isinstance(tensor, funcol.AsyncCollectiveTensor):   # a collective's output: its wrapped tensor
                    tensor = tensor.elem
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total[0] += storage.nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                t.phase_backward(phase, contexts)
            t.backend.clip_and_step(phase.updates)
            per_phase[phase.name] = total[0]
    if info.is_main:
        with open(out, "w") as f:
            json.dump(per_phase, f)
    return per_phase


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        saved_bytes_per_phase(args)
        return 0
    from tests.distributed.test_data_parallel import ENV, free_port
    from trainer.tiny_pipeline import save_tiny_pipeline
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = save_tiny_pipeline(args.model, os.path.join(tmp, "pipeline"))
        results = {}
        for sp in (1, 2):
            out = os.path.join(tmp, f"sp{sp}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{free_port()}", os.path.abspath(__file__), "--model", args.model,
                   "--frames", str(args.frames), "--height", str(args.height), "--width", str(args.width),
                   "--worker", pipeline, str(sp), out]
            done = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            with open(out) as f:
                results[sp] = json.load(f)
    tokens = ((args.frames - 1) // 4 + 1) * (args.height // 16) * (args.width // 16)
    print(f"{args.model}, {args.frames} frames at {args.height}x{args.width} ({tokens} video tokens), one sample per "
          f"SP group, rank 0, activation MiB saved for backward:")
    print(f"{'phase':<15} {'SP = 1':>10} {'SP = 2':>10} {'ratio':>7}")
    for phase in results[1]:
        one, two = results[1][phase] / MIB, results[2][phase] / MIB
        print(f"{phase:<15} {one:>10.2f} {two:>10.2f} {two / one:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
