"""LoRA on the generator (`distill.generator.lora`), through peft's adapters on the diffusers model (the paper
fine-tunes SD3-Medium's student with LoRA): the base weights stay frozen inside the generator, only `lora_A` / `lora_B`
train, so the optimizer holds moments for the adapters alone.

Loading stays sharded: the adapted generator is built on the meta device like any role, and its state is read from
a `MappedSource` that names the teacher's weights under peft's `base_layer` keys and supplies the adapters' initial
values (peft's own `reset_lora_parameters`, seeded: lora_B = 0, so the student starts as the teacher).
Export fuses the adapters into the base weights (diffusers' `fuse_lora` then `unload_lora`): a plain stock model.
"""
from __future__ import annotations

from unittest import mock

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch._guards import detect_fake_mode

from parallel.loading import MappedSource, TensorsSource


def peft_config(cfg):
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                      init_lora_weights=True)


def add_lora(module, cfg):
    """Adapters on `module`'s target layers (peft freezes everything else); returns the module."""
    if detect_fake_mode() is None:
        module.add_adapter(peft_config(cfg))
        return module
    # the memory planner's fake-tensor trace: peft moves each new adapter to its base layer's device with
    # `Module.to`, which for fake tensors goes through Module._apply's tensor swap and fails; everything is on the
    # one (fake CPU) device in the dtype it is built in already, so `to` is the identity while the adapters are added
    with mock.patch.object(torch.nn.Module, "to", lambda self, *args, **kwargs: self):
        module.add_adapter(peft_config(cfg))
    return module


def initial_adapters(build, seed: int) -> dict[str, torch.Tensor]:
    """{name: tensor} of the adapters' initial values: the adapted model built on the meta device, then each LoRA
    layer's lora_A / lora_B materialised on the CPU and initialised by peft (small: rank x width per layer)."""
    with torch.device("meta"):
        module = build()
    torch.manual_seed(seed)
    out = {}
    for name, layer in sorted(module.named_modules(), key=lambda item: item[0]):
        if not isinstance(layer, LoraLayer):
            continue
        for adapter in sorted(layer.lora_A):
            layer.lora_A[adapter].to_empty(device="cpu")
            layer.lora_B[adapter].to_empty(device="cpu")
            layer.reset_lora_parameters(adapter, True)
            for part in ("lora_A", "lora_B"):
                for pname, param in getattr(layer, part)[adapter].named_parameters():
                    out[f"{name}.{part}.{adapter}.{pname}"] = param.detach().clone()
    return out


def lora_source(base_source, build, seed: int) -> MappedSource:
    """The adapted generator's state: base weights from `base_source` (peft's `.base_layer.` keys mapped back to the
    plain names), adapters from `initial_adapters`."""
    adapters = TensorsSource(initial_adapters(build, seed))
    with torch.device("meta"):
        names = [name for name, _ in build().named_parameters()]
    mapping = {}
    for name in names:
        if ".lora_A." in name or ".lora_B." in name:
            mapping[name] = (adapters, name)
        else:
            mapping[name] = (base_source, name.replace(".base_layer.", "."))
    return MappedSource(mapping, [base_source, adapters])


def fuse(module):
    """Merge the adapters into the base weights and drop them: the stock model with the student's weights."""
    module.fuse_lora(lora_scale=1.0)
    module.unload_lora()
    return module
