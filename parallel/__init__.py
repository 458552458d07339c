"""How nets are spread over devices: the backend surface and its implementations."""
from trainer.runtime_env import apply_runtime_defaults

apply_runtime_defaults()
