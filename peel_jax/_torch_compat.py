"""Importing torchvision beside the CPU build of torch.

The registry's torchvision 0.28.0 wheel is a CUDA build: its import registers fake kernels for the custom ops
``torchvision::nms`` and ``torchvision::qnms``, whose schemas the CPU torch build lacks, and fails. Defining the two
schemas first lets ``import torchvision`` succeed; the models work, only ``torchvision.ops`` kernels do not.
"""

from __future__ import annotations


def import_torchvision():
  """Returns the ``torchvision`` module, defining the two missing op schemas first when needed."""
  import torch

  try:
    import torchvision  # noqa: F401

    return torchvision
  except Exception:
    pass
  for name in ("nms", "qnms"):
    try:
      torch.library.define(f"torchvision::{name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except Exception:  # already defined
      pass
  import sys

  for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[mod]
  import torchvision

  return torchvision
