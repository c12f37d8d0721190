"""2D U-Net of WSL4MIS / PyMIC and its FedICRA variants.

Registered names:

- ``unet``: plain U-Net.
- ``unet_multihead``: U-Net + three auxiliary heads (1/4, 1/2, full resolution) that feed the
  high-level affinities of the multiscale tree energy loss.
- ``unet_lc``: U-Net + personalised channel selection (PCS) after the deepest encoder block.
- ``unet_lc_multihead``: both (the FedICRA network).

Top-level submodules name the parameter groups used by the federated strategies:
``encoder``, ``pcs`` (lc variants), ``decoder``, ``out_conv``, ``aux_heads`` (multihead).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from .outputs import SegOutput
from .pcs import PersonalisedChannelSelection
from .registry import NetworkInfo, register_network

DEFAULT_DROPOUT: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
#: Input height and width must be multiples of this (four 2x max-pools).
SIZE_MULTIPLE = 16


def check_input_size(x: Tensor, multiple: int) -> None:
    """Raise ``ValueError`` unless ``x`` is (B, C, H, W) with H and W multiples of ``multiple``.

    Inputs are rejected rather than padded so that logits always align with the label map.
    """
    if x.dim() != 4:
        raise ValueError(f"input must have shape (B, C, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"input size {h}x{w} is not supported: height and width must be divisible by "
            f"{multiple}; resize or pad the images"
        )


class ConvBlock(nn.Sequential):
    """(conv3x3, BN, LeakyReLU, dropout, conv3x3, BN, LeakyReLU)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
        )


class DownBlock(nn.Sequential):
    """2x max-pool followed by a :class:`ConvBlock`."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__(nn.MaxPool2d(2), ConvBlock(in_channels, out_channels, dropout))


class UpBlock(nn.Module):
    """Transposed conv x2 (to the skip's channels), concat with the skip, :class:`ConvBlock`."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, skip_channels, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * skip_channels, out_channels, dropout=0.0)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNetEncoder(nn.Module):
    """Five conv blocks; returns the features of every level, finest first."""

    def __init__(self, in_chns: int, channels: Sequence[int], dropout: Sequence[float]) -> None:
        super().__init__()
        self.in_conv = ConvBlock(in_chns, channels[0], dropout[0])
        self.down1 = DownBlock(channels[0], channels[1], dropout[1])
        self.down2 = DownBlock(channels[1], channels[2], dropout[2])
        self.down3 = DownBlock(channels[2], channels[3], dropout[3])
        self.down4 = DownBlock(channels[3], channels[4], dropout[4])

    def forward(self, x: Tensor) -> List[Tensor]:
        x0 = self.in_conv(x)
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        x3 = self.down3(x2)
        x4 = self.down4(x3)
        return [x0, x1, x2, x3, x4]


class UNetDecoder(nn.Module):
    """Four up blocks (``block(in, skip, out)``, default :class:`UpBlock`); returns the
    decoder features at 1/8, 1/4, 1/2 and full resolution."""

    def __init__(self, channels: Sequence[int], block: Type[nn.Module] = UpBlock) -> None:
        super().__init__()
        self.up1 = block(channels[4], channels[3], channels[3])
        self.up2 = block(channels[3], channels[2], channels[2])
        self.up3 = block(channels[2], channels[1], channels[1])
        self.up4 = block(channels[1], channels[0], channels[0])

    def forward(self, bottleneck: Tensor, skips: Sequence[Tensor]) -> List[Tensor]:
        x0, x1, x2, x3 = skips
        d1 = self.up1(bottleneck, x3)
        d2 = self.up2(d1, x2)
        d3 = self.up3(d2, x1)
        d4 = self.up4(d3, x0)
        return [d1, d2, d3, d4]


class AuxHead(nn.Sequential):
    """conv3x3(c -> aux_channels), BN, ReLU, Dropout2d(0.1), conv1x1(-> classes, no bias)."""

    def __init__(self, in_channels: int, num_classes: int, aux_channels: int = 512) -> None:
        super().__init__(
            nn.Conv2d(in_channels, aux_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(aux_channels),
            nn.ReLU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(aux_channels, num_classes, kernel_size=1, bias=False),
        )


class SiteCoded:
    """Mixin of networks built for one site of ``num_sites``: ``site``, the own site code
    used by ``forward``, checked on assignment (it may be reassigned at any time)."""

    num_sites: int

    @property
    def site(self) -> int:
        """Own site index, the site code used by ``forward``."""
        return self._site

    @site.setter
    def site(self, value: int) -> None:
        value = int(value)
        if not 0 <= value < self.num_sites:
            raise ValueError(f"site must be in [0, {self.num_sites - 1}], got {value}")
        self._site = value


class UNet(SiteCoded, nn.Module):
    """U-Net with optional personalised channel selection and auxiliary heads.

    Parameters
    ----------
    in_chns, num_classes:
        Input channels and output classes.
    base_channels:
        Channels of the first level; the levels have ``base * (1, 2, 4, 8, 16)``.
    dropout:
        Dropout probability of each encoder level (finest first); ``None`` disables dropout.
    personalised:
        Add PCS after the deepest encoder block (``unet_lc*``).
    multihead:
        Add three auxiliary heads on the decoder features at 1/4, 1/2 and full resolution.
    aux_channels:
        Hidden width of the auxiliary heads.
    num_sites, site:
        Number of sites K and the own site index used by ``forward``; ``site`` may be
        reassigned at any time (e.g. to evaluate under another site code). Accepted but unused
        without PCS so that every network can be built with the same options.
    pcs_reduction:
        Reduction ratio of the PCS gate MLP.

    Notes
    -----
    Input height and width must be multiples of 16; other sizes raise ``ValueError``.
    """

    def __init__(
        self,
        in_chns: int,
        num_classes: int,
        base_channels: int = 16,
        dropout: Optional[Sequence[float]] = DEFAULT_DROPOUT,
        personalised: bool = False,
        multihead: bool = False,
        aux_channels: int = 512,
        num_sites: int = 1,
        site: int = 0,
        pcs_reduction: int = 16,
    ) -> None:
        super().__init__()
        if in_chns < 1 or num_classes < 1 or base_channels < 1:
            raise ValueError(
                f"in_chns, num_classes and base_channels must be >= 1, got {in_chns}, "
                f"{num_classes}, {base_channels}"
            )
        if num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {num_sites}")
        dropout = tuple(dropout) if dropout is not None else (0.0,) * 5
        if len(dropout) != 5 or any(not 0.0 <= p < 1.0 for p in dropout):
            raise ValueError(f"dropout must be 5 probabilities in [0, 1), got {dropout}")
        channels = [base_channels * m for m in (1, 2, 4, 8, 16)]
        self.in_chns = in_chns
        self.num_classes = num_classes
        self.num_sites = num_sites
        self.channels = tuple(channels)
        self.size_multiple = SIZE_MULTIPLE
        self.encoder = UNetEncoder(in_chns, channels, dropout)
        self.pcs = (
            PersonalisedChannelSelection(channels[4], num_sites, pcs_reduction)
            if personalised
            else None
        )
        self.decoder = UNetDecoder(channels)
        self.out_conv = nn.Conv2d(channels[0], num_classes, kernel_size=3, padding=1)
        self.aux_heads = (
            nn.ModuleList(
                AuxHead(c, num_classes, aux_channels) for c in (channels[2], channels[1], channels[0])
            )
            if multihead
            else None
        )
        self.site = site

    @property
    def personalised(self) -> bool:
        return self.pcs is not None

    def site_gates(self, features: Tensor, site: int) -> Tensor:
        """Gate (B, C, 1, 1) that site code ``site`` gives to bottleneck ``features``.

        Touches no BatchNorm statistics (the PCS module has none).
        """
        if self.pcs is None:
            raise ValueError("site_gates needs a network with channel selection (unet_lc*)")
        return self.pcs.gate(features, site)

    def forward(self, x: Tensor, site: Optional[int] = None) -> SegOutput:
        """Segment ``x`` (B, in_chns, H, W); ``site`` overrides :attr:`site` for this call."""
        check_input_size(x, self.size_multiple)
        *skips, bottleneck = self.encoder(x)
        gates = None
        features = bottleneck
        if self.pcs is not None:
            bottleneck, gates = self.pcs(bottleneck, self.site if site is None else site)
        d1, d2, d3, d4 = self.decoder(bottleneck, skips)
        logits = self.out_conv(d4)
        aux: Tuple[Tensor, ...] = ()
        if self.aux_heads is not None:
            aux = tuple(head(f) for head, f in zip(self.aux_heads, (d2, d3, d4)))
        return SegOutput(
            logits=logits, aux_logits=aux, gates=gates, features=features, decoder_features=d4
        )


@register_network("unet", info=NetworkInfo(size_multiple=SIZE_MULTIPLE))
def unet(in_chns: int, num_classes: int, **options) -> UNet:
    """Plain U-Net."""
    return UNet(in_chns, num_classes, personalised=False, multihead=False, **options)


@register_network("unet_multihead", info=NetworkInfo(size_multiple=SIZE_MULTIPLE, aux_heads=True))
def unet_multihead(in_chns: int, num_classes: int, **options) -> UNet:
    """U-Net with three auxiliary heads (coarse to fine)."""
    return UNet(in_chns, num_classes, personalised=False, multihead=True, **options)


@register_network("unet_lc", info=NetworkInfo(size_multiple=SIZE_MULTIPLE, site_gates=True))
def unet_lc(in_chns: int, num_classes: int, **options) -> UNet:
    """U-Net with personalised channel selection; options ``num_sites`` and ``site``."""
    return UNet(in_chns, num_classes, personalised=True, multihead=False, **options)


@register_network("unet_lc_multihead", info=NetworkInfo(size_multiple=SIZE_MULTIPLE,
                                                         site_gates=True, aux_heads=True))
def unet_lc_multihead(in_chns: int, num_classes: int, **options) -> UNet:
    """FedICRA network: PCS and three auxiliary heads; options ``num_sites`` and ``site``."""
    return UNet(in_chns, num_classes, personalised=True, multihead=True, **options)
