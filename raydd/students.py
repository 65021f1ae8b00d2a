"""Student networks used to evaluate distilled sets; `register_in_timm()` adds raydd's own to timm's registry.

Two families come from the dataset-distillation literature (IDC, Minimax, RDED evaluations) and
are written here in plain PyTorch:

* ``convnet_d1`` ... ``convnet_d6`` -- ConvNet-D: D blocks of
  [Conv3x3(128) -> instance norm -> ReLU -> AvgPool2d(2)], then one Linear classifier.
* ``resnetap10`` -- ResNetAP-10 (IDC): a ResNet-10 (BasicBlocks [1, 1, 1, 1]) with instance norm
  whose downsampling is AvgPool2d(2) instead of strided convolutions.

"Instance norm" is ``nn.GroupNorm(C, C, affine=True)`` (one group per channel), as in the
reference code: it normalises each channel of each image over its spatial positions, so it does
not depend on the batch (distilled sets are tiny, often fewer images than a batch).

The remaining students are stock timm architectures created without pretrained weights.
Every student takes images normalised by ``raydd.protocols.to_float`` (uint8 -> [-1, 1]).

timm is imported only when a timm model is asked for: its import (which pulls in torchvision) takes
about 2 s and 180 MB in every process, and the default students never need it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from raydd.config import ConfigError
from raydd.errors import CheckpointError

__all__ = ["list_students", "create_student", "register_in_timm", "ConvNet", "ResNetAP", "BasicBlockAP",
           "instance_norm"]

CONVNET_WIDTH = 128
TIMM_STUDENTS = ["resnet18", "resnet50", "resnet101", "efficientnet_b0", "mobilenetv2_100"]
OWN_STUDENTS = [f"convnet_d{d}" for d in range(1, 7)] + ["resnetap10"]


def list_students() -> list[str]:
    """Names accepted by `create_student` (and by the config key `eval.students`)."""
    return OWN_STUDENTS + TIMM_STUDENTS


def create_student(name: str, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """A freshly initialised student (never pretrained, never downloads anything)."""
    if name not in list_students():
        raise ConfigError(f"unknown student {name!r}; allowed: {', '.join(list_students())}")
    if name in OWN_STUDENTS:
        return OWN_BUILDERS[name](num_classes=num_classes, in_chans=in_chans, img_size=image_size)
    import timm

    # stock timm models size themselves from the input (global pooling): no img_size kwarg
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def pretrained_timm(name: str, device, num_classes: int | None = None):
    """A pretrained timm model from the local Hugging Face cache (no network here) and its eval transform
    on uint8 images: -> (model, prepare(x_uint8 [B,C,H,W]) -> float [B,3,crop,crop]). prepare resizes square
    images to crop / crop_pct, centre-crops `crop` and normalises with the model's mean/std, as timm's eval
    transform does (grayscale is repeated to RGB). num_classes=0 drops the head (pooled features)."""
    import math

    import timm
    import torch.nn.functional as F

    try:
        kw = {} if num_classes is None else {"num_classes": num_classes}
        model = timm.create_model(name, pretrained=True, **kw)
    except Exception as e:
        raise CheckpointError(f"timm model {name!r}: its pretrained weights are not in the local Hugging Face cache "
                           f"({type(e).__name__}: {e}); put them there (timm.create_model('{name}', pretrained=True) "
                           f"on a machine with network, then copy ~/.cache/huggingface)") from e
    model = model.to(device).eval().requires_grad_(False)
    pc = model.pretrained_cfg
    mean = torch.tensor(pc["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(pc["std"], device=device).view(1, -1, 1, 1)
    crop = int(pc["input_size"][-1])                                     # 224 for resnet18.tv_in1k
    resize = int(math.floor(crop / pc.get("crop_pct", 0.875)))

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device).float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", antialias=True, align_corners=False)
        o = (resize - crop) // 2
        return (x[..., o:o + crop, o:o + crop] - mean) / std
    return model, prepare


def register_in_timm() -> None:
    """Make raydd's own students creatable through `timm.create_model` (e.g. from timm-based training
    scripts): convnet_d1..6 and resnetap10, under those names. Idempotent."""
    from timm.models import is_model, register_model

    for name in OWN_STUDENTS:
        if not is_model(name):
            register_model(OWN_BUILDERS[name])


def instance_norm(channels: int) -> nn.GroupNorm:
    """Instance norm with a learned per-channel affine: GroupNorm with one group per channel."""
    return nn.GroupNorm(channels, channels, affine=True)


def _side(img_size) -> tuple[int, int]:
    """img_size as (H, W); accepts an int or an (H, W) pair."""
    if isinstance(img_size, (tuple, list)):
        return int(img_size[0]), int(img_size[1])
    return int(img_size), int(img_size)


# --------------------------------------------------------------------------------------------
# ConvNet-D
# --------------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """ConvNet-D: `depth` x [Conv3x3(width, pad 1) -> InstanceNorm -> ReLU -> AvgPool2d(2)] -> Linear."""

    def __init__(self, depth: int, num_classes: int = 1000, in_chans: int = 3, img_size=32,
                 width: int = CONVNET_WIDTH):
        super().__init__()
        h, w = _side(img_size)
        # every block halves the side (floor); the last block's conv output must still have at
        # least 2x2 positions, otherwise instance norm sees one value per channel and outputs 0
        if h < 2 ** depth or w < 2 ** depth:
            raise ConfigError(f"convnet_d{depth} needs images of at least {2 ** depth}x{2 ** depth} "
                             f"pixels ({depth} 2x average-poolings); got {h}x{w}. Use a shallower "
                             f"ConvNet (convnet_d{max(1, min(h, w).bit_length() - 1)}) or larger images")
        layers: list[nn.Module] = []
        c = in_chans
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, kernel_size=3, padding=1), instance_norm(width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(kernel_size=2, stride=2)]
            c = width
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.num_features = width * h * w
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in_chans, H, W]
        f = self.features(x)                       # [B, width, H / 2^D, W / 2^D]
        return self.classifier(f.flatten(1))       # [B, num_classes]


def _convnet(depth: int, pretrained: bool, kwargs: dict) -> ConvNet:
    if pretrained:
        raise ValueError(f"convnet_d{depth} has no pretrained weights")
    # timm passes its own bookkeeping kwargs (pretrained_cfg, cache_dir, ...): drop them
    keep = {k: kwargs[k] for k in ("num_classes", "in_chans", "img_size", "width") if k in kwargs}
    return ConvNet(depth, **keep)


def convnet_d1(pretrained: bool = False, **kwargs) -> ConvNet:
    return _convnet(1, pretrained, kwargs)


def convnet_d2(pretrained: bool = False, **kwargs) -> ConvNet:
    return _convnet(2, pretrained, kwargs)


def convnet_d3(pretrained: bool = False, **kwargs) -> ConvNet:
    return _convnet(3, pretrained, kwargs)


def convnet_d4(pretrained: bool = False, **kwargs) -> ConvNet:
    return _convnet(4, pretrained, kwargs)


def convnet_d5(pretrained: bool = False, **kwargs) -> ConvNet:
    return _convnet(5, pretrained, kwargs)


def convnet_d6(pretrained: bool = False, **kwargs) -> ConvNet:
    return _convnet(6, pretrained, kwargs)


# --------------------------------------------------------------------------------------------
# ResNetAP-10
# --------------------------------------------------------------------------------------------
class BasicBlockAP(nn.Module):
    """ResNet BasicBlock whose stride-2 downsampling is an AvgPool2d(2) after the second conv.

    main:     conv3x3 -> IN -> ReLU -> conv3x3 -> [AvgPool2d(2)] -> IN
    shortcut: identity, or conv1x1 -> [AvgPool2d(2)] -> IN when channels or size change
    out = ReLU(main + shortcut)
    """

    def __init__(self, in_ch: int, out_ch: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False)
        self.norm1 = instance_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2) if downsample else nn.Identity()
        self.norm2 = instance_norm(out_ch)
        if downsample or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False),
                                          nn.AvgPool2d(2) if downsample else nn.Identity(),
                                          instance_norm(out_ch))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in_ch, h, w]; s = 2 if downsample else 1
        out = self.relu(self.norm1(self.conv1(x)))         # [B, out_ch, h, w]
        out = self.norm2(self.pool(self.conv2(out)))        # [B, out_ch, h/s, w/s]
        return self.relu(out + self.shortcut(x))            # [B, out_ch, h/s, w/s]


class ResNetAP(nn.Module):
    """ResNetAP (IDC): instance norm, average-pool downsampling, stages of widths 64/128/256/512."""

    def __init__(self, layers=(1, 1, 1, 1), num_classes: int = 1000, in_chans: int = 3, img_size=32):
        super().__init__()
        h, w = _side(img_size)
        small = max(h, w) <= 64
        # the last stage runs at side/8 (small stem) or side/32 (ImageNet stem); instance norm
        # needs >= 2x2 positions there
        min_side = 16 if small else 65
        if min(h, w) < min_side:
            raise ConfigError(f"resnetap10 needs images of at least {min_side}x{min_side} pixels; got {h}x{w}")
        if small:   # CIFAR-style stem keeps the resolution
            self.stem = nn.Sequential(nn.Conv2d(in_chans, 64, kernel_size=3, padding=1, bias=False),
                                      instance_norm(64), nn.ReLU(inplace=True))
        else:       # ImageNet stem: /4
            self.stem = nn.Sequential(nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False),
                                      instance_norm(64), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        blocks: list[nn.Module] = []
        c = 64
        for stage, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            for i in range(n):
                blocks.append(BasicBlockAP(c, width, downsample=(stage > 0 and i == 0)))
                c = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_classes = num_classes
        self.num_features = c
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in_chans, H, W]
        f = self.stem(x)                    # [B, 64, H, W] (small stem) or [B, 64, H/4, W/4]
        f = self.layers(f)                  # [B, 512, H/8, W/8] or [B, 512, H/32, W/32]
        f = self.pool(f).flatten(1)         # [B, 512]
        return self.fc(f)                   # [B, num_classes]


def resnetap10(pretrained: bool = False, **kwargs) -> ResNetAP:
    if pretrained:
        raise ValueError("resnetap10 has no pretrained weights")
    keep = {k: kwargs[k] for k in ("num_classes", "in_chans", "img_size") if k in kwargs}
    return ResNetAP(layers=(1, 1, 1, 1), **keep)


# the builders by name (one per entry of OWN_STUDENTS), for create_student and register_in_timm
OWN_BUILDERS = {f.__name__: f for f in (convnet_d1, convnet_d2, convnet_d3, convnet_d4, convnet_d5, convnet_d6,
                                        resnetap10)}
assert list(OWN_BUILDERS) == OWN_STUDENTS
