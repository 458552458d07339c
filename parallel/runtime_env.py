"""Process-wide environment defaults, applied explicitly by every command's `main()` (and by test workers) before
any work; importing this module changes nothing.

Each default below was seen failing without it on the project's CPU machines (docs/testing.md, "Pitfalls"):
- OMP_NUM_THREADS=1: torch's default of 2 intra-op threads on a loaded 2-core box made a tiny UNet step 70x slower.
  On GPU nodes it only affects host-side ops; torchrun sets the same value for multi-process runs. When torch was
  imported before the call, its intra-op pool is set to match (libgomp reads the variable only at load).
- TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it, torchrun's restarted workers read the previous attempt's gloo
  addresses from the agent's store and fail to connect or hang.
- DS_ACCELERATOR=cpu when no CUDA device exists: silences DeepSpeed's accelerator probe warning.
- TOKENIZERS_PARALLELISM=false: the tokenizers' thread pool warns (and may deadlock) after a fork.
`pin_mmap_threshold` is not applied here: the ZeRO-3 backend applies it on CPU (see its docstring).
Everything is `setdefault`: a user's explicit value always wins.
"""
from __future__ import annotations

import ctypes
import os
import sys
import warnings


def pin_mmap_threshold(threshold_bytes: int = 128 * 1024) -> None:
    """mallopt(M_MMAP_THRESHOLD): blocks above the threshold are mmapped and go back to the OS when freed.

    By default glibc raises the threshold each time a large block is freed, after which freed tensors stay in the
    heap and are never returned. DeepSpeed's `zero.Init` allocates each module whole and then keeps only its
    partition: with the dynamic threshold, each of 2 CPU ranks kept 0.78x the memory of one process holding every
    role whole; pinned, ~0.4x. The cost: an mmap + page faults per large CPU allocation, which is why only the
    ZeRO-3 backend on CPU pins it. A user's MALLOC_MMAP_THRESHOLD_ wins; a libc without mallopt is left alone."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold_bytes)   # M_MMAP_THRESHOLD = -3 (malloc.h)
    except (OSError, AttributeError):
        pass


def compile_cache_defaults(run_dir: str) -> str:
    """Point torch.compile's caches (inductor's FX graph and kernel cache, Triton's) at `<run_dir>/compile_cache`
    unless the user chose a place (node-local disk is faster: set TORCHINDUCTOR_CACHE_DIR in the job script). The
    run dir survives a requeue or an elastic restart, so a restarted attempt reuses the compiled kernels instead of
    compiling again (minutes at full size). Returns the inductor cache folder in effect."""
    folder = os.path.join(run_dir, "compile_cache")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(folder, "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(folder, "triton"))
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def apply_runtime_defaults() -> None:
    """Set the process defaults (idempotent). Call it first thing in a command's main()."""
    threads_given = "OMP_NUM_THREADS" in os.environ
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch = sys.modules.get("torch")
    if torch is not None and not threads_given:
        torch.set_num_threads(1)   # torch was loaded before the variable was set
    # DeepSpeed and FSDP2 call the c10d names torch deprecated in favour of *_single; the warning repeats every step
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                                    r"deprecated")
