"""Methods: small objects with phases. `build_method(cfg)` picks one by `cfg.name`."""
from trainer.methods.adm import ADM
from trainer.methods.adp import ADP
from trainer.methods.base import LossOut, Method, Nets, Phase, StepContext
from trainer.methods.dmd import DMD
from trainer.methods.dmd2 import DMD2
from trainer.methods.regression import Regression

METHODS = {"dmd": DMD, "dmd2": DMD2, "adm": ADM, "regression": Regression, "adp": ADP}


def build_method(cfg) -> Method:
    return METHODS[cfg.name](cfg)


__all__ = ["ADM", "ADP", "Regression", "DMD", "DMD2", "LossOut", "Method", "Nets", "Phase", "StepContext", "build_method"]
