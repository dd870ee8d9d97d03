"""Per-level discriminators: small stacks of strided convolutions ending in one score channel."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from gankd_ray.config import DISC_OUTPUTS, DiscriminatorConfig

_LEAKY_SLOPE = 0.2  # DCGAN's discriminator activation


class SpatialInstanceNorm2d(nn.InstanceNorm2d):
    """Affine instance norm that, on 1x1 maps, applies only its affine part: ``x * weight + bias``.

    Normalising a single spatial element would zero it (and PyTorch refuses to in training), yet
    the deepest SSD levels shrink to 1x1. Keeping the affine part there keeps every parameter in
    the graph, which DDP requires of each backward.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] * x.shape[-2] == 1:
            return x * self.weight[:, None, None] + self.bias[:, None, None] if self.affine else x
        return super().forward(x)


class LevelDiscriminator(nn.Module):
    """A critic for one feature level.

    ``depth`` blocks of ``Conv3x3(stride 2, padding 1) -> norm -> LeakyReLU(0.2)`` of ``width``
    channels, then a 1x1 conv to one score channel. With padding 1 a stride-2 conv maps 1x1 to 1x1
    and 2x2 to 1x1, so striding stops by itself on tiny maps and any depth works at every level.

    Args:
        in_channels: channels of the level's maps (the teacher's, since students are adapted).
        depth: number of strided blocks.
        width: channels of every block.
        norm: ``none``, ``batch``, ``instance`` (affine, 1x1 maps passed through) or ``spectral``
            (``torch.nn.utils.parametrizations.spectral_norm`` on every conv, no norm layer).
        output: ``global`` (one score per image: the mean of the score map), ``patch`` (the map) or
            ``strided`` (the paper's: as many strided blocks as take ``input_size`` down to 1x1, at
            least ``depth``; the 1x1 map's one value is the score).
        input_size: ``(H, W)`` of the level's maps; required for ``strided``.

    Shapes:
        ``forward(x: Tensor[B, C, H, W]) -> Tensor[B, P]`` with ``P = 1`` (global, strided) or
        ``P = h * w`` (patch, ``h = ceil(H / 2**depth)``).
    """

    def __init__(
        self,
        in_channels: int,
        depth: int,
        width: int,
        norm: str,
        output: str,
        input_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if output not in DISC_OUTPUTS:
            raise ValueError(f"unknown discriminator output {output!r}")
        if output == "strided":
            if input_size is None:
                raise ValueError("a strided discriminator needs the level's input_size")
            depth = max(depth, halvings_to_one(max(input_size)))
        self.output = output
        self.depth = depth
        blocks: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            blocks.extend(_strided_block(channels, width, norm))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.score = _conv(channels, 1, kernel_size=1, stride=1, bias=True, spectral=norm == "spectral")
        # With batch norm one sample's score depends on the rest of the batch, so callers score
        # teacher and student maps in separate calls (as DCGAN does); otherwise one call on both.
        self.mixes_batch = norm == "batch"

    def forward(self, x: Tensor) -> Tensor:
        scores = self.score(self.blocks(x))  # [B, 1, h, w]
        if self.output == "global":
            return scores.mean(dim=(2, 3))  # [B, 1]
        if self.output == "strided" and scores.shape[-1] * scores.shape[-2] != 1:
            raise ValueError(
                f"strided discriminator of depth {self.depth} left a {tuple(scores.shape[-2:])} score map: "
                "its input is larger than the level size it was built for"
            )
        return scores.flatten(1)  # [B, h * w]


def halvings_to_one(size: int) -> int:
    """How many stride-2 steps (``n -> ceil(n / 2)``) take ``size`` pixels down to 1."""
    steps = 0
    while size > 1:
        size = -(-size // 2)
        steps += 1
    return steps


def build_discriminators(
    levels: Sequence[str],
    channels: Mapping[str, int],
    cfg: DiscriminatorConfig,
    sizes: Mapping[str, Sequence[int]] | None = None,
) -> nn.ModuleDict:
    """One :class:`LevelDiscriminator` per level, keyed by level name.

    Args:
        levels: distilled level names, e.g. ``["level0", "level3"]``.
        channels: input channels per level (the teacher's ``level_channels``).
        cfg: depth, width, norm and output shared by all levels.
        sizes: ``(h, w)`` of each level's maps (the teacher's ``feature_shapes``); ``strided`` needs them.
    """
    sizes = sizes or {}
    return nn.ModuleDict(
        {
            level: LevelDiscriminator(channels[level], cfg.depth, cfg.width, cfg.norm, cfg.output, sizes.get(level))
            for level in levels
        }
    )


def _strided_block(in_channels: int, out_channels: int, norm: str) -> list[nn.Module]:
    # A bias before a normalising layer is cancelled by it.
    has_norm_layer = norm in ("batch", "instance")
    conv = _conv(
        in_channels, out_channels, kernel_size=3, stride=2, bias=not has_norm_layer, spectral=norm == "spectral"
    )
    layers: list[nn.Module] = [conv]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(out_channels))
    elif norm == "instance":
        layers.append(SpatialInstanceNorm2d(out_channels, affine=True))
    elif norm not in ("none", "spectral"):
        raise ValueError(f"unknown discriminator norm {norm!r}")
    layers.append(nn.LeakyReLU(_LEAKY_SLOPE))
    return layers


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int, bias: bool, spectral: bool) -> nn.Module:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
    return spectral_norm(conv) if spectral else conv
