"""Counts behind "The count along the path" in benchmarks/RESULTS.md, at the true images (no attack runs).

    python -m benchmarks.preimage_probes.path_counts --networks resnet18,resnet50 --size 128

Per network, layer and image: the observation's non-zero values, and the fewest informative values of any gated
layer on the way (``peel_jax._certify_network.path_informative_values``: non-zero values; the max-pool's distinct
window maxima) with the layer that holds it. Networks as ``benchmarks.deployed.build_network`` (seed 0).
"""

import argparse
import json

import jax.numpy as jnp
import numpy as np

import peel_jax
from benchmarks.deployed import build_network
from peel_jax import images
from peel_jax._certify_network import path_informative_values

p = argparse.ArgumentParser()
p.add_argument("--networks", default="resnet18,resnet50")
p.add_argument("--layers", default="maxpool,layer1,layer2,layer3,layer4")
p.add_argument("--images", default="astronaut,chelsea,coffee,grace_hopper,lfw:0,lfw:1,lfw:2,lfw:3")
p.add_argument("--size", type=int, default=128)
a = p.parse_args()

names = a.images.split(",")
x = jnp.asarray(np.stack([images.normalize(images.bundled(n, a.size)) for n in names]))
for net in a.networks.split(","):
  model, variables = build_network(net, a.size, 0)
  layers = a.layers.split(",")
  feats = peel_jax.features(model, variables, x, layers)
  for layer in layers:
    counts, where = path_informative_values(model, variables, layer, x)
    counts = np.asarray(counts)
    print(json.dumps({"network": net, "layer": layer, "images": names, "pixels": int(np.prod(x.shape[1:])),
                      "observed_nonzero": np.count_nonzero(np.asarray(feats[layer]).reshape(len(names), -1),
                                                           axis=1).tolist(),
                      "path_fewest": counts.min(axis=1).tolist(),
                      "path_layer": [where[i] for i in counts.argmin(axis=1)]}), flush=True)
