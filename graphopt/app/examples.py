"""Built-in example models for demos, tests and benchmarks.

Each factory returns ``(model.eval(), example_inputs)``. Construction is deterministic (a fixed
seed, the global RNG left as it was) and batch-norm layers get random running statistics and
affine parameters: a freshly built BN is an identity, which would let a wrong fusion pass go
unnoticed.

``resnet18`` and ``mobilenet_v2`` follow torchvision's architectures layer for layer, with the
same module names, so torchvision state dicts load into them; they take 1x3x224x224 inputs.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from graphopt.errors import ModelLoadError

Example = tuple[nn.Module, tuple[torch.Tensor, ...]]


def _build(seed: int, make: Callable[[], nn.Module], *input_shape: int) -> Example:
    """Build under a fixed seed without disturbing the caller's RNG; randomize BN; eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        randomize_batch_norms(model)
        example = torch.randn(*input_shape)
    return model.eval(), (example,)


def randomize_batch_norms(model: nn.Module) -> None:
    """Give every BN layer non-trivial statistics and affine parameters (uses the global RNG)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.track_running_stats:
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


# -- small models -------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, ReLU, residual add (projected when the shape changes).

    Mirrors torchvision's ``BasicBlock``, including one ``nn.ReLU(inplace=True)`` used twice.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 16, 3), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor``, never more than 10% down (as torchvision)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNActivation(nn.Sequential):
    """Conv, BN, ReLU6 in a Sequential (torchvision's ``Conv2dNormActivation``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(*_conv_bn(cin, cout, kernel, stride, groups), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection, residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNActivation(cin, hidden, kernel=1))
        layers += [ConvBNActivation(hidden, hidden, stride=stride, groups=hidden), *_conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class SmallMobileNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            ConvBNActivation(3, 16, stride=2),
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            ConvBNActivation(24, 64, kernel=1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class SeparableCNN(nn.Module):
    """Depthwise-separable CNN: a conv stem, depthwise 3x3 + pointwise 1x1 blocks (each conv-BN-ReLU6),
    global average pooling and a linear head."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        layers: list[nn.Module] = [ConvBNActivation(3, widths[0], stride=2)]
        for cin, cout in zip(widths, widths[1:]):
            layers += [ConvBNActivation(cin, cin, groups=cin), ConvBNActivation(cin, cout, kernel=1)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def spread_channel_ranges(model: nn.Module, decades: float = 4.0) -> None:
    """Give each BN layer per-channel output scales spread log-uniformly over ``decades`` decades
    around 1 (1e-2..1e2 for 4), with running statistics and shifts to match: the channels of one
    tensor then differ in range by that much, as in trained networks whose BN scales drift apart.
    Uses the global RNG."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                scale = 10.0 ** (decades * (torch.rand(n) - 0.5))
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.copy_(scale * m.running_var.add(m.eps).sqrt())
                m.bias.copy_(scale * torch.empty(n).uniform_(-0.5, 1.0))


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (64, 128, 64, 10)):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers += [nn.ReLU(), nn.Dropout(0.1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block with hand-written softmax attention (traceable by fx)."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens = x.shape[0], x.shape[1]
        qkv = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim)), dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)
        x = x + self.proj(mixed)
        return x + self.mlp(self.norm2(x))


# -- torchvision architectures ----------------------------------------------------------------


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` (BasicBlock, [2, 2, 2, 2]), same module names and init."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        blocks = nn.Sequential(BasicBlock(self.inplanes, planes, stride), BasicBlock(planes, planes))
        self.inplanes = planes
        return blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MobileNetV2(nn.Module):
    """torchvision's ``mobilenet_v2`` (width 1.0), same module names and init."""

    # expansion t, channels c, repeats n, first stride s
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        channels, last = _make_divisible(32), _make_divisible(1280)
        features: list[nn.Module] = [ConvBNActivation(3, channels, stride=2)]
        for t, c, n, s in self.SETTINGS:
            out = _make_divisible(c)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(ConvBNActivation(channels, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# -- factories and registry -------------------------------------------------------------------


def resnet_cnn(seed: int = 0) -> Example:
    return _build(seed, SmallResNet, 2, 3, 32, 32)


def mobilenet_cnn(seed: int = 0) -> Example:
    return _build(seed, SmallMobileNet, 2, 3, 32, 32)


def mlp(seed: int = 0) -> Example:
    return _build(seed, MLP, 4, 64)


def transformer_block(seed: int = 0) -> Example:
    return _build(seed, EncoderBlock, 2, 8, 32)


def wide_range_cnn(seed: int = 0) -> Example:
    """:class:`SeparableCNN` whose per-channel ranges span four decades (see
    :func:`spread_channel_ranges`), 2x3x32x32. A hard case for calibration: one per-tensor range
    must serve channels 1e4 apart, and the linear head reads pooled ReLU6 outputs."""
    def make() -> nn.Module:
        model = SeparableCNN()
        spread_channel_ranges(model)
        return model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        example = torch.randn(2, 3, 32, 32)
    return model.eval(), (example,)


def normal_batches(example: torch.Tensor, count: int, *, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor]]:
    """``count`` seeded batches of standard normal inputs shaped like ``example`` (``batch`` rows
    each), as ``calibration_data``; the global RNG is left as it was."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((batch, *example.shape[1:]), generator=g, dtype=example.dtype),) for _ in range(count)]


def resnet18(seed: int = 0) -> Example:
    return _build(seed, ResNet18, 1, 3, 224, 224)


def mobilenet_v2(seed: int = 0) -> Example:
    return _build(seed, MobileNetV2, 1, 3, 224, 224)


@dataclass(frozen=True)
class ExampleModel:
    """A registry entry: the factory (``seed -> (model, example_inputs)``) and what it builds."""

    factory: Callable[..., Example]
    description: str

    def __call__(self, seed: int = 0) -> Example:
        return self.factory(seed)


EXAMPLES: dict[str, ExampleModel] = {
    "resnet_cnn": ExampleModel(resnet_cnn, "small residual CNN (conv-BN-ReLU, 2 basic blocks), 2x3x32x32"),
    "mobilenet_cnn": ExampleModel(mobilenet_cnn, "small MobileNetV2-style CNN (inverted residuals, depthwise, ReLU6), 2x3x32x32"),
    "mlp": ExampleModel(mlp, "3-layer perceptron with ReLU and dropout, 4x64"),
    "transformer_block": ExampleModel(transformer_block, "pre-norm encoder block, 4-head softmax attention, 2x8x32"),
    "resnet18": ExampleModel(resnet18, "torchvision ResNet-18 architecture, 1x3x224x224"),
    "mobilenet_v2": ExampleModel(mobilenet_v2, "torchvision MobileNetV2 architecture, 1x3x224x224"),
}


def get_example(name: str, seed: int = 0) -> Example:
    """Build the example model ``name``: ``(model in eval mode, example_inputs)``."""
    entry = EXAMPLES.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, EXAMPLES, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelLoadError(f"no built-in example named {name!r}; {hint}available: {', '.join(EXAMPLES)}.")
    return entry(seed)
