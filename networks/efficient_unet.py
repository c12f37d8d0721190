"""U-Net with an EfficientNet encoder (``efficient_unet``), as ``Effi_UNet`` of WSL4MIS.

The encoder is ``efficientnet_pytorch.EfficientNet.from_name`` (random initialisation, nothing
is downloaded) without its classification head; optional weights come from a local file.
Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .outputs import SegOutput
from .registry import NetworkInfo, register_network
from .unet import check_input_size

#: Input height and width must be multiples of this (five stride-2 stages).
EFFICIENT_SIZE_MULTIPLE = 32
_HEAD_MODULES = ("_conv_head", "_bn1", "_avg_pooling", "_dropout", "_fc")


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class EfficientDecoderBlock(nn.Module):
    """Nearest x2 upsampling, optional skip concat, two (conv3x3, BN, ReLU)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = _conv_bn_relu(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Optional[Tensor]) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class EfficientUNetDecoder(nn.Module):
    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int]) -> None:
        super().__init__()
        # encoder_channels: strides 2, 4, 8, 16, 32; the stride-32 map is the decoder input.
        skips = list(encoder_channels[:-1])[::-1] + [0]
        ins = [encoder_channels[-1]] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            EfficientDecoderBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels)
        )

    def forward(self, bottleneck: Tensor, skips: Sequence[Tensor]) -> Tensor:
        x = bottleneck
        skips = list(skips)[::-1] + [None]
        for block, skip in zip(self.blocks, skips):
            x = block(x, skip)
        return x


def _block_stride(block: nn.Module) -> int:
    stride = block._block_args.stride
    return int(stride[0] if isinstance(stride, (list, tuple)) else stride)


def _load_encoder_weights(net: nn.Module, weights_path: str, in_chns: int) -> None:
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"EfficientNet weights file not found: {weights_path}")
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    stem = state.get("_conv_stem.weight")
    if stem is not None and stem.shape[1] != in_chns:
        if in_chns == 1:
            # Grey-scale input: a single filter summing the RGB ones sees the same response.
            state["_conv_stem.weight"] = stem.sum(dim=1, keepdim=True)
        else:
            raise ValueError(
                f"weights in {weights_path} expect {stem.shape[1]} input channels, got {in_chns}"
            )
    missing, _ = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("_fc.")]
    if missing:
        raise ValueError(f"weights in {weights_path} lack {len(missing)} keys, e.g. {missing[:3]}")


class EfficientUNet(nn.Module):
    """U-Net decoder on an EfficientNet encoder.

    Parameters
    ----------
    in_chns, num_classes:
        Input channels and output classes.
    encoder_name:
        EfficientNet variant, ``'efficientnet-b0'`` ... ``'efficientnet-b7'``.
    weights_path:
        Optional local file with an ``efficientnet_pytorch`` state dict (e.g. ImageNet weights);
        a 3-channel stem is summed to one channel for grey-scale input. ``None``: random init.
    decoder_channels:
        Channels of the five decoder blocks (strides 16, 8, 4, 2, 1).
    num_sites, site:
        Accepted so that every network can be built with the same options; unused.

    Notes
    -----
    Input height and width must be multiples of 32; other sizes raise ``ValueError``.
    ``SegOutput.features`` is the stride-32 encoder output.
    """

    def __init__(
        self,
        in_chns: int,
        num_classes: int,
        encoder_name: str = "efficientnet-b3",
        weights_path: Optional[str] = None,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        num_sites: int = 1,
        site: int = 0,
    ) -> None:
        super().__init__()
        from efficientnet_pytorch import EfficientNet

        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels must have 5 entries, got {decoder_channels}")
        net = EfficientNet.from_name(encoder_name, in_channels=in_chns)
        if weights_path is not None:
            _load_encoder_weights(net, weights_path, in_chns)
        for name in _HEAD_MODULES:
            delattr(net, name)
        self.encoder = net
        # Endpoints: the last block before each stride-2 block, and the last block.
        blocks = list(net._blocks)
        ends = [i - 1 for i, b in enumerate(blocks) if _block_stride(b) > 1] + [len(blocks) - 1]
        self._endpoints: Tuple[int, ...] = tuple(ends)
        channels = [
            net._bn0.num_features if i < 0 else blocks[i]._block_args.output_filters for i in ends
        ]
        if len(channels) != 5:
            raise ValueError(f"{encoder_name} does not have five stride-2 stages")
        self.in_chns = in_chns
        self.num_classes = num_classes
        self.num_sites = num_sites
        self.site = site
        self.size_multiple = EFFICIENT_SIZE_MULTIPLE
        self.decoder = EfficientUNetDecoder(channels, decoder_channels)
        self.out_conv = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=3, padding=1)
        for m in self.decoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")

    def _encode(self, x: Tensor) -> List[Tensor]:
        net = self.encoder
        x = net._swish(net._bn0(net._conv_stem(x)))
        feats = [x] if self._endpoints[0] < 0 else []
        rate = net._global_params.drop_connect_rate
        n = len(net._blocks)
        for idx, block in enumerate(net._blocks):
            x = block(x, drop_connect_rate=rate * idx / n if rate else rate)
            if idx in self._endpoints:
                feats.append(x)
        return feats

    def forward(self, x: Tensor, site: Optional[int] = None) -> SegOutput:
        """Segment ``x`` (B, in_chns, H, W); ``site`` is ignored (no personalisation)."""
        check_input_size(x, self.size_multiple)
        *skips, bottleneck = self._encode(x)
        dec = self.decoder(bottleneck, skips)
        return SegOutput(logits=self.out_conv(dec), features=bottleneck, decoder_features=dec)


@register_network("efficient_unet", info=NetworkInfo(size_multiple=EFFICIENT_SIZE_MULTIPLE))
def efficient_unet(in_chns: int, num_classes: int, **options) -> EfficientUNet:
    """U-Net with an EfficientNet encoder (default ``efficientnet-b3``, random init)."""
    return EfficientUNet(in_chns, num_classes, **options)
