"""Flax ResNets, torchvision-exact by default, with the PEEL paper's variants."""

from peel_jax.models.resnet import (
    ACTIVATIONS,
    ARCHS,
    STEM_POOLS,
    BasicBlock,
    Bottleneck,
    PreActBlock,
    ResNet,
    activation_fn,
    get_model,
    paper_variant,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    wide_resnet50_2,
)

__all__ = [
    "ACTIVATIONS", "ARCHS", "STEM_POOLS", "BasicBlock", "Bottleneck", "PreActBlock", "ResNet", "activation_fn",
    "get_model", "paper_variant", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "wide_resnet50_2",
]
