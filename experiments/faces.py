"""Faces: PEEL against the baselines on face photos, from each stage of a ResNet (the paper's face study).

The shared study is :mod:`experiments._attack` (methods, metrics, outputs). Offline the default data is
``bundled:faces`` (images bundled in installed wheels). For the real study pass ``--data`` a face folder sorted by
identity (CelebA or FaceScrub: ``root/IDENTITY/*.jpg``), ``--weights`` a pretrained torchvision ``state_dict`` (with
``--variant torchvision``) and ``--eval-weights`` an evaluation classifier trained on the same identities.
"""

from __future__ import annotations

import dataclasses
import sys

from experiments import _attack
from experiments import _harness as H


@dataclasses.dataclass(frozen=True)
class Config(_attack.AttackConfig):
  """Config of the faces study (fields: :class:`experiments._attack.AttackConfig`).

  Default run (2 CPU cores: see experiments/RESULTS.md for its duration)::

      python -m experiments.faces          # writes experiments/results/faces

  Smallest run (the test's)::

      python -m experiments.faces --out /tmp/faces --images 1 --size 32 --layers layer1 --max-iters 3 \\
          --authors-steps 3 --mv-steps 3
  """

  out: str = dataclasses.field(default="experiments/results/faces", metadata={"help": "output directory"})
  data: str = dataclasses.field(default="bundled:faces", metadata={
      "help": "bundled:NAME, an image folder root/CLASS/*, or tfds:NAME (needs TF)"})


def run(config: Config, run: H.Run) -> dict:
  return _attack.run(config, run, "faces")


def main(argv=None) -> int:
  return H.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  sys.exit(main())
