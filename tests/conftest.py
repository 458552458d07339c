"""Test-wide environment: set before torch is imported anywhere (docs/testing.md, "Pitfalls")."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from parallel.runtime_env import apply_runtime_defaults  # noqa: E402

apply_runtime_defaults()
