"""ResNet backbones written without torchvision, with torchvision's state-dict key names.

torchvision and timm do not import on the CPU torch build used here (docs/architecture.md, known
traps), so the architectures are re-implemented. ``resnet50`` reproduces torchvision's ResNet-50
(v1.5: stride on the 3x3 conv) key for key, so official, MoCo v2 and DINO checkpoints load
unchanged; ``small_resnet`` is a BasicBlock ResNet small enough to train from scratch on a CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

LAYERS = ("layer1", "layer2", "layer3", "layer4")

# Top-level keys of a checkpoint that wrap the actual state dict (torchvision/MoCo/DINO style).
_CONTAINER_KEYS = ("state_dict", "model")
# MoCo v2 saves the query encoder under this prefix; the momentum encoder and the queue ride along.
_MOCO_PREFIX = "module.encoder_q."
_DDP_PREFIX = "module."
# Keys that a self-supervised or classification checkpoint carries and a backbone never uses.
_IGNORED_HEADS = ("fc.",)


def _conv3x3(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut (He et al. 2016, Fig. 2)."""

    expansion = 1

    def __init__(
        self,
        c_in: int,
        width: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, width, stride, dilation)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, 1, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 block; the stride sits on the 3x3 conv as in torchvision (ResNet v1.5)."""

    expansion = 4

    def __init__(
        self,
        c_in: int,
        width: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class Backbone(nn.Module):
    """A ResNet trunk that returns the outputs of its four stages.

    ``channels[name]`` and ``strides[name]`` describe ``forward(x)[name]`` for every name in
    ``LAYERS``; consumers size their heads from them instead of hard-coding ResNet-50 numbers.
    """

    channels: dict[str, int]
    strides: dict[str, int]

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_layer: tuple[int, int, int, int],
        base_width: int,
        dilated: bool,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        self.channels, self.strides = {}, {}
        self._c_in, self._dilation, stride_so_far = base_width, 1, 4
        # torchvision's replace_stride_with_dilation=[False, True, True] when dilated.
        dilate = (False, False, dilated, dilated)
        for i, (name, n_blocks) in enumerate(zip(LAYERS, blocks_per_layer, strict=True)):
            stride = 1 if i == 0 else 2
            layer = self._make_layer(block, base_width * 2**i, n_blocks, stride, dilate[i])
            self.add_module(name, layer)
            if not dilate[i]:
                stride_so_far *= stride
            self.channels[name] = self._c_in
            self.strides[name] = stride_so_far

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        width: int,
        n_blocks: int,
        stride: int,
        dilate: bool,
    ) -> nn.Sequential:
        # Same rule as torchvision's ResNet._make_layer: a dilated stage trades its stride for
        # dilation, and its first block still uses the previous dilation.
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        c_out = width * block.expansion
        downsample = None
        if stride != 1 or self._c_in != c_out:
            downsample = nn.Sequential(
                nn.Conv2d(self._c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )
        layers = [block(self._c_in, width, stride, previous_dilation, downsample)]
        self._c_in = c_out
        layers += [block(c_out, width, 1, self._dilation) for _ in range(1, n_blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Return ``{"layer1": ..., "layer4": ...}`` for an image batch ``(N, 3, H, W)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name in LAYERS:
            x = getattr(self, name)(x)
            out[name] = x
        return out


def resnet50(dilated: bool = False) -> Backbone:
    """torchvision-compatible ResNet-50 without ``fc``; ``dilated`` gives output stride 8."""
    return Backbone(Bottleneck, (3, 4, 6, 3), base_width=64, dilated=dilated)


def small_resnet(width: int = 32, dilated: bool = True) -> Backbone:
    """A 4-stage BasicBlock ResNet (one block per stage), ~1.2 M parameters at width 32.

    Meant for episodic training from scratch on a CPU; stages have width, 2w, 4w, 8w channels.
    """
    return Backbone(BasicBlock, (1, 1, 1, 1), base_width=width, dilated=dilated)


def build_backbone(backbone: str | Backbone) -> Backbone:
    """``"small_resnet"`` (default for from-scratch training), ``"resnet50"`` or an instance.

    Named backbones are dilated (output stride 8), which dense prediction needs.
    """
    if isinstance(backbone, Backbone):
        return backbone
    if backbone == "small_resnet":
        return small_resnet(dilated=True)
    if backbone == "resnet50":
        return resnet50(dilated=True)
    raise ValueError(f"unknown backbone {backbone!r} (small_resnet, resnet50 or a Backbone)")


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did with each key (names are the backbone's, after stripping)."""

    prefix: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every backbone tensor was loaded and nothing unknown was left over."""
        return not (self.missing or self.unexpected or self.mismatched)


def _unwrap(obj: object) -> Mapping[str, Tensor]:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")


def _detect_prefix(keys: list[str]) -> str:
    if any(k.startswith(_MOCO_PREFIX) for k in keys):
        return _MOCO_PREFIX
    if keys and all(k.startswith(_DDP_PREFIX) for k in keys):
        return _DDP_PREFIX
    return ""


def load_checkpoint(
    backbone: Backbone,
    path: str | Path,
    *,
    strict: bool = True,
    prefix: str | None = None,
) -> LoadReport:
    """Load backbone weights from a torchvision, MoCo v2 or DDP-wrapped checkpoint.

    The state dict is unwrapped from ``"state_dict"``/``"model"``; ``prefix`` (auto-detected when
    None: ``module.encoder_q.`` for MoCo v2, else ``module.`` if every key has it) is stripped and
    keys outside it (MoCo's ``encoder_k``, ``queue``) are ignored, as are ``fc.*`` heads. BatchNorm
    ``num_batches_tracked`` counters absent from old checkpoints are left at their default and
    listed in ``defaulted``. With ``strict`` any missing, unexpected or shape-mismatched key raises
    ``ValueError``; without it the matching tensors are loaded and the rest is reported.
    """
    raw = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    keys = [k for k, v in raw.items() if isinstance(v, Tensor)]
    if prefix is None:
        prefix = _detect_prefix(keys)
    report = LoadReport(prefix=prefix)
    report.ignored += [k for k, v in raw.items() if not isinstance(v, Tensor)]  # e.g. "epoch"

    expected = backbone.state_dict()
    to_load: dict[str, Tensor] = {}
    seen: set[str] = set()
    for key in keys:
        if not key.startswith(prefix):
            report.ignored.append(key)
            continue
        name = key[len(prefix) :]
        seen.add(name)
        if name.startswith(_IGNORED_HEADS):
            report.ignored.append(key)
        elif name not in expected:
            report.unexpected.append(name)
        elif raw[key].shape != expected[name].shape:
            report.mismatched.append(
                f"{name}: checkpoint {tuple(raw[key].shape)} vs model {tuple(expected[name].shape)}"
            )
        else:
            to_load[name] = raw[key]
    for name in expected:
        if name in seen:
            continue
        if name.endswith("num_batches_tracked"):
            report.defaulted.append(name)
        else:
            report.missing.append(name)

    if strict and not report.ok:
        problems = [f"missing: {k}" for k in report.missing]
        problems += [f"unexpected: {k}" for k in report.unexpected]
        problems += [f"shape mismatch: {k}" for k in report.mismatched]
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"checkpoint {path} does not fit the backbone (prefix {prefix!r}):\n  {shown}{more}"
        )
    backbone.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    return report
