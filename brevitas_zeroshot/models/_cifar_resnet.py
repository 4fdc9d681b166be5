"""CIFAR-10 ResNets (He et al. 2016, "option A" shortcuts), registered as timm models.

The pretrained weights are those published by Yerlan Idelbayev (github.com/akamaster/pytorch_resnet_cifar10,
BSD-2-Clause); the state-dict names match that release.
"""

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CifarResNet"]

_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1:
            # Equal to x[:, :, ::2, ::2]; a slice cannot be traced through Brevitas quant tensors.
            shortcut = F.max_pool2d(shortcut, 1, self.stride)
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: a 16-channel stem, three stages of n blocks, global pool, linear head."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, **kwargs):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.num_features = 64
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(planes, width, 2 if (i > 0 and j == 0) else 1))
                planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Unwrap the release format: weights under 'state_dict', every key prefixed with 'module.'."""
    state_dict = state_dict.get("state_dict", state_dict)
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _cfg(file: str | None = None, **kwargs) -> dict:
    return {
        "url": _URL + file if file else "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "linear",
        "license": "bsd-2-clause",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "cifar_resnet20.akamaster_c10": _cfg("resnet20-12fca82f.th"),
        "cifar_resnet32.akamaster_c10": _cfg("resnet32-d509ac18.th"),
        "cifar_resnet44.akamaster_c10": _cfg("resnet44-014dd654.th"),
        "cifar_resnet56.akamaster_c10": _cfg("resnet56-4bfd9763.th"),
        "cifar_resnet110.akamaster_c10": _cfg("resnet110-1d1ed7c2.th"),
    }
)


def _create(variant: str, depth: int, pretrained: bool, **kwargs) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, pretrained_filter_fn=_filter_fn, depth=depth, **kwargs
    )


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet20", 20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet32", 32, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet44", 44, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet56", 56, pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet110", 110, pretrained, **kwargs)
