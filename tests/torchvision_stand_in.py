"""The three torchvision names Opacus's ``grad_sample_module_test.py`` imports, for machines without torchvision.

PyPI's torchvision wheels are built against CUDA torch and do not load beside the CPU build (its operators fail
to register), so the Opacus-suite harness (`tests.opacus_suite`) registers these in ``sys.modules`` instead:

* ``torchvision.datasets.FakeData(size, image_size, num_classes, transform)``: ``size`` images of ``image_size``
  with entries uniform in [0, 1) (what ``ToTensor`` makes of FakeData's random PIL images) and integer labels,
  drawn from a generator seeded per index, as FakeData's are;
* ``torchvision.transforms.Compose``, ``ToTensor`` (the identity on tensors) and ``Normalize(mean, std)``
  (per channel, (x − mean)/std);
* ``torchvision.models.mobilenet_v3_small``: raises ``ImportError`` (the one test that builds it checks Opacus's
  own ``GradSampleModule`` on it).
"""

from __future__ import annotations

import types

import torch


class FakeData(torch.utils.data.Dataset):
    def __init__(self, size=1000, image_size=(3, 224, 224), num_classes=10, transform=None, random_offset=0):
        self.size, self.image_size, self.num_classes = size, tuple(image_size), num_classes
        self.transform, self.random_offset = transform, random_offset

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index + self.random_offset)
        image = torch.rand(self.image_size, generator=generator)
        label = int(torch.randint(0, self.num_classes, (1,), generator=generator))
        return (self.transform(image) if self.transform is not None else image), label


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ToTensor:
    def __call__(self, x):
        return torch.as_tensor(x)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __call__(self, x):
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (x - self.mean.view(shape).to(x)) / self.std.view(shape).to(x)


def mobilenet_v3_small(*args, **kwargs):
    raise ImportError("torchvision is not installed (tests.torchvision_stand_in has no models)")


def register(modules: dict) -> None:
    """Adds ``torchvision``, ``torchvision.datasets``, ``.transforms`` and ``.models`` to ``modules``."""
    root = types.ModuleType("torchvision", __doc__)
    parts = {
        "datasets": {"FakeData": FakeData},
        "transforms": {"Compose": Compose, "ToTensor": ToTensor, "Normalize": Normalize},
        "models": {"mobilenet_v3_small": mobilenet_v3_small},
    }
    for name, members in parts.items():
        module = types.ModuleType(f"torchvision.{name}")
        module.__dict__.update(members)
        setattr(root, name, module)
        modules[f"torchvision.{name}"] = module
    modules["torchvision"] = root
