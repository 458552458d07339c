"""Worker for tests/distributed/test_host_syncs.py: counts the host synchronisations of 3 non-logging ADM steps of
the tiny SDXL twin (one rank) under FSDP2 and ZeRO-3, and once more under FSDP2 with an `.item()` planted in the
generator's forward for one step (the counter must see it).

Counted with a TorchDispatchMode, so every op that reaches the dispatcher is seen whoever calls it (our code,
FSDP2, DeepSpeed): `aten::_local_scalar_dense` (what `.item()`, `bool(tensor)`, `float(tensor)` dispatch to),
`aten::is_nonzero` / `aten::equal` (a tensor read as a Python bool), and the ops whose output shape depends on the
data (nonzero, masked_select, unique, boolean indexing), which must read the data on the host to size their output.
Under ZeRO-3 it also counts calls of DeepSpeed's fp32-partition accessor (`_get_fp32_opt_state_partition`, behind
`safe_get_local_fp32_param`), which synchronises its reduce stream with the host on CUDA: invisible to a dispatch
mode, and on the CPU a no-op.

Usage: host_sync_worker.py OUT_JSON
"""
import collections
import contextlib
import json
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402
apply_runtime_defaults()
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from parallel.distributed import init_distributed  # noqa: E402
from trainer.config import load_recipe  # noqa: E402
from trainer.families import build_family  # noqa: E402
from trainer.memory_plan import build_trainer  # noqa: E402

HOST_READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::nonzero", "aten::masked_select",
              "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive"}
BOOLEAN_INDEXING = {"aten::index.Tensor", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"}


class HostSyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.first_stack = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if func._overloadpacket.__name__ in ("index", "index_put_", "index_put", "_index_put_impl_"):
            name = f"{name}.{func._overloadname}"
        bool_index = name in BOOLEAN_INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name in HOST_READS or bool_index:
            key = name + (" (boolean index)" if bool_index else "")
            self.counts[key] += 1
            self.first_stack.setdefault(key, "".join(traceback.format_stack(limit=12)[:-1]))
        return func(*args, **(kwargs or {}))


def nonfinite_gradient_skips(trainer) -> dict:
    """A finite loss whose generator gradient is NaN (0 * d sqrt(x)/dx at 0): the ZeRO-3 step, with DeepSpeed's
    host-side norm check moved onto the device (parallel/zero3.py norm_check_on_device), must leave the weights."""
    def nan_gradient(module, args, output):
        return output + 0 * torch.sqrt(output * 0)   # value unchanged; gradient 0 * inf = NaN

    before = trainer.backend.full_state("generator")
    handle = trainer.nets.generator.register_forward_hook(nan_gradient)
    sums = collections.defaultdict(list)
    trainer.train_step(4, sums)
    handle.remove()
    after = trainer.backend.full_state("generator")
    trainer.train_step(5, collections.defaultdict(list))
    moved_next = trainer.backend.full_state("generator")
    return {"loss_finite": bool(torch.isfinite(torch.stack(sums["loss/generator"])).all()),
            "norm_finite": bool(torch.isfinite(torch.stack(sums["grad_norm/generator"])).all()),
            "moved": max((after[k] - v).abs().max().item() for k, v in before.items()),
            "moved_next": max((moved_next[k] - v).abs().max().item() for k, v in after.items())}


def build(backend: str):
    recipe = load_recipe(os.path.join(ROOT, "recipes", "tiny", "sdxl_tiny.yaml"), [
        "teacher.pretrained=org/host-sync-check", f"parallel.backend={backend}",
        "parallel.zero3_persistence_threshold=0", "distill.train.batch_size=2"])
    trainer = build_trainer(recipe, info, build_family(recipe, planning=True))
    trainer.train_step(0, collections.defaultdict(list))   # warm-up: lazy initialisation (FSDP2, DeepSpeed)
    return trainer


def count(trainer, steps) -> dict:
    counter = HostSyncCounter()
    with counter, deepspeed_stream_syncs(trainer, counter):
        for step in steps:
            trainer.train_step(step, collections.defaultdict(list))
    return {"counts": dict(counter.counts), "stacks": counter.first_stack}


@contextlib.contextmanager
def deepspeed_stream_syncs(trainer, counter):
    """Counts the ZeRO-3 optimizers' calls of their stream-synchronising fp32 accessor into `counter`."""
    optimizers = [engine.optimizer for engine in getattr(trainer.backend, "engines", {}).values()
                  if hasattr(engine.optimizer, "_get_fp32_opt_state_partition")]
    for optimizer in optimizers:
        accessor = optimizer._get_fp32_opt_state_partition

        def spy(*args, accessor=accessor, **kwargs):
            key = "deepspeed _get_fp32_opt_state_partition (CUDA: stream synchronize)"
            counter.counts[key] += 1
            counter.first_stack.setdefault(key, "".join(traceback.format_stack(limit=12)[:-1]))
            return accessor(*args, **kwargs)
        optimizer._get_fp32_opt_state_partition = spy
    try:
        yield
    finally:
        for optimizer in optimizers:
            del optimizer._get_fp32_opt_state_partition


def read_on_host(module, args, output):
    output.float().sum().item()   # the planted sync; returns None, so the output is kept


info = init_distributed(need_group=True)
fsdp2 = build("fsdp2")
result = {"fsdp2": count(fsdp2, range(1, 4))}
fsdp2.nets.generator.register_forward_hook(read_on_host)
result["fsdp2_planted"] = count(fsdp2, range(4, 5))
zero3 = build("zero3")
result["zero3"] = count(zero3, range(1, 4))
result["zero3_nonfinite_gradient"] = nonfinite_gradient_skips(zero3)
json.dump(result, open(sys.argv[1], "w"), indent=1)
