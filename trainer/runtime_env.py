"""Process-wide environment defaults, applied once before torch is imported.

Each default below was seen failing without it on the project's CPU machines (shared/ENV.md, "Pitfalls"):
- OMP_NUM_THREADS=1: torch's default of 2 intra-op threads on a loaded 2-core box made a tiny UNet step 70x slower.
  On GPU nodes it only affects host-side ops; torchrun sets the same value for multi-process runs.
- TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it, torchrun's restarted workers read the previous attempt's gloo
  addresses from the agent's store and fail to connect or hang.
- DS_ACCELERATOR=cpu when no CUDA device exists: silences DeepSpeed's accelerator probe warning.
Everything is `setdefault`: a user's explicit value always wins.
"""
import os
import warnings


def apply_runtime_defaults() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

# DeepSpeed and FSDP2 call the c10d names torch deprecated in favour of *_single; the warning repeats every step
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
