"""Chest X-rays: PEEL against the baselines on medical images, from each stage of a ResNet.

The shared study is :mod:`experiments._attack` (methods, metrics, outputs). Offline the default data is
``bundled:medical`` (images bundled in installed wheels; the medical stand-in is scikit-image's retina photo, the
only medical image bundled). For the real study pass ``--data`` a chest X-ray folder sorted by class
(``root/NORMAL``, ``root/PNEUMONIA``, ...), ``--weights`` a pretrained torchvision ``state_dict``
(with ``--variant torchvision``) and ``--eval-weights`` an evaluation classifier trained on the same identities or
classes.
"""

from __future__ import annotations

import dataclasses
import sys

from experiments import _attack
from experiments import _harness as H


@dataclasses.dataclass(frozen=True)
class Config(_attack.AttackConfig):
  """Config of the chest_xray study (fields: :class:`experiments._attack.AttackConfig`).

  Default run (2 CPU cores: see experiments/RESULTS.md for its duration)::

      python -m experiments.chest_xray          # writes experiments/results/chest_xray

  Smallest run (the test's)::

      python -m experiments.chest_xray --out /tmp/chest_xray --images 1 --size 32 --layers layer1 --max-iters 3 \\
          --authors-steps 3 --mv-steps 3
  """

  out: str = dataclasses.field(default="experiments/results/chest_xray", metadata={"help": "output directory"})
  data: str = dataclasses.field(default="bundled:medical", metadata={
      "help": "bundled:NAME, an image folder root/CLASS/*, or tfds:NAME (needs TF)"})


def run(config: Config, run: H.Run) -> dict:
  return _attack.run(config, run, "chest_xray")


def main(argv=None) -> int:
  return H.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  sys.exit(main())
