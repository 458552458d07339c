"""Test-wide environment: set before torch is imported anywhere (ENV.md pitfalls 1, 2, 7, 8)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from trainer.runtime_env import apply_runtime_defaults  # noqa: E402

apply_runtime_defaults()
