"""dmdx trainer: distillation of diffusion models into few-step students (DMD, DMD2, ADM, DMDX)."""
