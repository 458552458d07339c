"""Import mosaicml-streaming beside a CPU-only torch that has no working torchvision.

`import streaming` imports `streaming.vision`, which does `from torchvision.datasets import VisionDataset` and
`from torchvision.transforms.functional import to_tensor` at import time. PyPI's torchvision wheels are CUDA builds
that fail beside torch 2.13.0+cpu, and installing streaming with its declared dependencies would replace torch
(requirements-nodeps.txt). So when torchvision is not importable, those two names are stubbed for the duration of
the import only and removed afterwards, so transformers / diffusers keep seeing "torchvision not installed".
Nothing in `streaming.base`, which is all dmdx uses, touches torchvision. On a CUDA cluster with a real
torchvision this is a plain import.
"""
from __future__ import annotations

import importlib
import sys
import types


def import_streaming():
    if "streaming" in sys.modules:
        return sys.modules["streaming"]
    try:
        import torchvision  # noqa: F401  (optional: absent or broken beside a CPU torch; probed, not required)
        return importlib.import_module("streaming")
    except Exception:   # ImportError, or a CUDA build's RuntimeError ("operator torchvision::nms does not exist")
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    import torch  # noqa: F401  (the stub subclasses torch's Dataset; imported with the stub only)
    import transformers  # noqa: F401  (imported before the stub so its availability probes see no torchvision)

    class VisionDataset(torch.utils.data.Dataset):   # never used by streaming.base
        def __init__(self, root=None, transforms=None, transform=None, target_transform=None):
            self.root, self.transforms, self.transform, self.target_transform = root, transforms, transform, \
                target_transform

    def to_tensor(pic):   # never used by streaming.base
        raise RuntimeError("torchvision is not installed")

    names = ["torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional"]
    stubs = {n: types.ModuleType(n) for n in names}
    stubs["torchvision.datasets"].VisionDataset = VisionDataset
    stubs["torchvision.transforms.functional"].to_tensor = to_tensor
    stubs["torchvision"].datasets = stubs["torchvision.datasets"]
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    sys.modules.update(stubs)
    try:
        return importlib.import_module("streaming")
    finally:
        for n in names:
            if sys.modules.get(n) is stubs[n]:
                del sys.modules[n]
