"""dmdx trainer: distillation of diffusion models into few-step students (DMD, DMD2, ADM, DMDX)."""
from trainer.runtime_env import apply_runtime_defaults

apply_runtime_defaults()
