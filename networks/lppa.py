"""The prompt-conditioned dual-decoder U-Net of FedLPPA (Lin et al., IEEE TMI 2024).

Registered as ``unet_lppa``. The network of the authors' published FedLPPA run (``UNet_UniV5``
of llmir/FedLPPA, which its test command names), at ``base_channels = 16`` layer for layer:

- ``encoder``: the U-Net encoder; bottleneck ``x4`` (B, 16b, h, w), ``h = H / 16``.
- ``prompts``: the learnable prompt maps, each (h, w): ``distribution`` holds one *data
  distribution prompt* per site (K, h, w), ``universal`` the *universal knowledge prompt*
  (1, h, w). The *annotation sparsity prompt* is not learnt: three constant maps, one-hot in
  the site's label kind (scribble, block, point; a noisy scribble counts as a scribble, a box
  as a block, a full mask as none).
- ``fusion`` (TDF, tri-prompt dual-attention fusion): ``[x4, distribution_k, universal,
  sparsity]`` through conv3x3 (-> 8b), BN, LeakyReLU, Dropout(0.5), conv3x3 (-> 4b), BN,
  LeakyReLU, then spatial + channel affinity attention. In training it runs once per site
  code k (the prompt term of FedLPPA compares the own site's fused map with the others').
- ``decoder``: four up blocks (conv1x1, bilinear x2, concat, conv block) on ``[x4, fused_own]`` (20b channels) and ``prototype``, a
  per-pixel MLP (20b -> 8b -> 4b -> b, BN and LeakyReLU between) averaged over the map, which
  scales the full-resolution feature channel-wise before ``out_conv``.
- ``aux_decoder``: a second decoder with its own head on the same input (the pseudo-label
  branch; the server aggregates it per site by prompt similarity).

``forward`` returns the main decoder's :class:`~networks.outputs.SegOutput`; training uses
:meth:`LPPAUNet.forward_train`, which also returns the auxiliary logits and every site's fused
map. In eval mode ``forward`` fuses only the own site's prompt (the others do not reach the
output, and BatchNorm then uses its running statistics).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .outputs import SegOutput
from .registry import NetworkInfo, register_network
import torch.nn.functional as F

from .unet import (DEFAULT_DROPOUT, SIZE_MULTIPLE, ConvBlock, SiteCoded, UNetDecoder,
                   UNetEncoder, check_input_size)

#: Label kinds of the annotation sparsity prompt, in channel order.
SPARSITY_KINDS = ("scribble", "block", "point")
#: A site's label form -> its sparsity kind (forms not listed, e.g. full masks, have none).
FORM_KIND = {"scribble": "scribble", "scribble_noisy": "scribble", "block": "block",
             "box": "block", "point": "point", "keypoint": "point"}
ATTENTIONS = ("dual", "sab", "cab")


class SpatialAffinity(nn.Module):
    """Spatial affinity attention: ``x + gamma * V A^T``, A = softmax over positions of
    query (1x3 conv) x key (3x1 conv) products; gamma starts at 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(channels // 8, 1)
        self.query = nn.Sequential(nn.Conv2d(channels, inner, (1, 3), padding=(0, 1)),
                                   nn.BatchNorm2d(inner), nn.ReLU(inplace=True))
        self.key = nn.Sequential(nn.Conv2d(channels, inner, (3, 1), padding=(1, 0)),
                                 nn.BatchNorm2d(inner), nn.ReLU(inplace=True))
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, hw, c')
        k = self.key(x).flatten(2)  # (B, c', hw)
        affinity = torch.softmax(q @ k, dim=-1)  # (B, hw, hw)
        v = self.value(x).flatten(2)  # (B, C, hw)
        return self.gamma * (v @ affinity.transpose(1, 2)).view(b, c, h, w) + x


class ChannelAffinity(nn.Module):
    """Channel affinity attention: ``x + gamma * A X``, A = softmax of (row max - X X^T)
    over channels; gamma starts at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        flat = x.flatten(2)  # (B, C, hw)
        gram = flat @ flat.transpose(1, 2)  # (B, C, C)
        affinity = torch.softmax(gram.amax(dim=-1, keepdim=True) - gram, dim=-1)
        return self.gamma * (affinity @ flat).view(b, c, h, w) + x


class DualAffinity(nn.Module):
    """Spatial + channel affinity attention (their sum)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.sab = SpatialAffinity(channels)
        self.cab = ChannelAffinity()

    def forward(self, x: Tensor) -> Tensor:
        return self.sab(x) + self.cab(x)


class PromptFusion(nn.Module):
    """TDF: bottleneck features and the three prompts -> a fused map of ``out_channels``."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 attention: str) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(mid_channels), nn.LeakyReLU(), nn.Dropout(0.5),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels), nn.LeakyReLU())
        self.attention = {"dual": lambda: DualAffinity(out_channels),
                          "sab": lambda: SpatialAffinity(out_channels),
                          "cab": ChannelAffinity}[attention]()

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(self.conv(x))


class PrototypeMLP(nn.Module):
    """Per-pixel MLP (Linear, BN, LeakyReLU(0.01) per hidden layer, then Linear), averaged
    over the map: (B, C_in, h, w) -> (B, C_out, 1, 1)."""

    def __init__(self, in_channels: int, hidden: Sequence[int], out_channels: int) -> None:
        super().__init__()
        sizes = [in_channels, *hidden]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm2d(b) for b in hidden)
        self.act = nn.LeakyReLU(0.01)
        self.out = nn.Linear(sizes[-1], out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for linear, norm in zip(self.linears, self.norms):
            x = self.act(norm(linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)))
        x = self.out(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x.mean(dim=(2, 3), keepdim=True)


class BilinearUpBlock(nn.Module):
    """conv1x1 (to the skip's channels), bilinear x2 (corners aligned), concat with the skip,
    :class:`~networks.unet.ConvBlock` (the reference decoder's up block)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, skip_channels, kernel_size=1)
        self.conv = ConvBlock(2 * skip_channels, out_channels, dropout=0.0)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = F.interpolate(self.reduce(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, up], dim=1))


class PromptedDecoder(nn.Module):
    """The task decoder: up blocks, then the prototype gate on the full-resolution feature."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.up = UNetDecoder(channels, block=BilinearUpBlock)
        self.prototype = PrototypeMLP(channels[4], (channels[3], channels[2]), channels[0])

    def forward(self, bottleneck: Tensor, skips: Sequence[Tensor]) -> List[Tensor]:
        d1, d2, d3, d4 = self.up(bottleneck, skips)
        return [d1, d2, d3, d4 * self.prototype(bottleneck)]


class AuxDecoder(nn.Module):
    """The pseudo-label branch: a plain U-Net decoder with its own head."""

    def __init__(self, channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.up = UNetDecoder(channels, block=BilinearUpBlock)
        self.out_conv = nn.Conv2d(channels[0], num_classes, kernel_size=3, padding=1)

    def forward(self, bottleneck: Tensor, skips: Sequence[Tensor]) -> Tensor:
        return self.out_conv(self.up(bottleneck, skips)[-1])


class SitePrompts(nn.Module):
    """The learnt prompts: ``distribution`` (K, h, w) and ``universal`` (1, h, w), drawn
    uniformly in [0, 1) as in the reference."""

    def __init__(self, num_sites: int, size: int) -> None:
        super().__init__()
        self.distribution = nn.Parameter(torch.rand(num_sites, size, size))
        self.universal = nn.Parameter(torch.rand(1, size, size))


@dataclass
class LPPAOutput:
    """What :meth:`LPPAUNet.forward_train` returns.

    Attributes
    ----------
    seg : SegOutput
        The main decoder's prediction (``seg.logits`` (B, classes, H, W)).
    aux_logits : Tensor
        The auxiliary decoder's logits, (B, classes, H, W).
    fused : tuple of Tensor
        The fused bottleneck map under every site's distribution prompt, each (B, 4b, h, w);
        the own site's is ``fused[site]``.
    site : int
        The site code used.
    """

    seg: SegOutput
    aux_logits: Tensor
    fused: Tuple[Tensor, ...]
    site: int


class LPPAUNet(SiteCoded, nn.Module):
    """FedLPPA's network (see the module docstring).

    Parameters
    ----------
    in_chns, num_classes : int
        Input channels and classes.
    base_channels : int
        b: the levels have ``b * (1, 2, 4, 8, 16)`` channels (16 in the reference); at least 2.
    img_size : int
        Input height and width the prompts are sized for (``img_size / 16``); inputs of
        another size are refused.
    num_sites, site : int
        K prompts, and the own site code (``forward``'s default).
    label_form : str
        The site's weak label form (sets the sparsity prompt); '' or a full mask: none.
    label_prompt : bool
        Feed the sparsity prompt (the reference's ``--label_prompt 1``).
    attention : {"dual", "sab", "cab"}
        Affinity attention of the fusion (spatial + channel, spatial only, channel only).
    """

    def __init__(self, in_chns: int, num_classes: int, base_channels: int = 16,
                 img_size: int = 256, num_sites: int = 1, site: int = 0, label_form: str = "",
                 label_prompt: bool = True, attention: str = "dual",
                 dropout: Optional[Sequence[float]] = DEFAULT_DROPOUT) -> None:
        super().__init__()
        if base_channels < 2:
            raise ValueError(f"base_channels must be >= 2 for unet_lppa, got {base_channels}")
        if img_size < SIZE_MULTIPLE or img_size % SIZE_MULTIPLE:
            raise ValueError(f"unet_lppa: img_size must be a positive multiple of "
                             f"{SIZE_MULTIPLE} (the prompts are img_size / 16 wide), got {img_size}")
        if num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {num_sites}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if label_form and label_form not in FORM_KIND and label_form != "mask":
            raise ValueError(f"label_form {label_form!r}: expected one of "
                             f"{', '.join(sorted(FORM_KIND))} or mask")
        c = [base_channels * m for m in (1, 2, 4, 8, 16)]
        self.in_chns, self.num_classes, self.num_sites = in_chns, num_classes, num_sites
        self.img_size = img_size
        self.size_multiple = SIZE_MULTIPLE
        self.label_prompt = bool(label_prompt)
        self.label_kind = FORM_KIND.get(label_form, "")
        self.encoder = UNetEncoder(in_chns, c, tuple(dropout) if dropout else (0.0,) * 5)
        self.prompts = SitePrompts(num_sites, img_size // SIZE_MULTIPLE)
        prompt_channels = 2 + (len(SPARSITY_KINDS) if self.label_prompt else 0)
        self.fusion = PromptFusion(c[4] + prompt_channels, c[3], c[2], attention)
        fused_levels = c[:4] + [c[4] + c[2]]
        self.decoder = PromptedDecoder(fused_levels)
        self.out_conv = nn.Conv2d(c[0], num_classes, kernel_size=3, padding=1)
        self.aux_decoder = AuxDecoder(fused_levels, num_classes)
        self.site = site

    def sparsity_prompt(self, like: Tensor) -> Tensor:
        """(3, h, w): ones in the channel of the site's label kind, zeros elsewhere."""
        maps = torch.zeros((len(SPARSITY_KINDS),) + tuple(like.shape[-2:]),
                           dtype=like.dtype, device=like.device)
        if self.label_kind:
            maps[SPARSITY_KINDS.index(self.label_kind)] = 1.0
        return maps

    def fuse(self, bottleneck: Tensor, code: int) -> Tensor:
        """The fused map of ``bottleneck`` (B, 16b, h, w) under site code ``code``'s prompt."""
        n = bottleneck.shape[0]
        maps = [self.prompts.distribution[code:code + 1], self.prompts.universal]
        if self.label_prompt:
            maps.append(self.sparsity_prompt(bottleneck))
        prompt = torch.cat(maps, dim=0).to(bottleneck.dtype)
        return self.fusion(torch.cat([bottleneck, prompt.expand(n, -1, -1, -1)], dim=1))

    def _check(self, x: Tensor) -> None:
        check_input_size(x, self.size_multiple)
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"unet_lppa was built for {self.img_size}x{self.img_size} inputs "
                             f"(its prompts are {self.img_size // SIZE_MULTIPLE} wide), got "
                             f"{tuple(x.shape[-2:])}; set img_size")

    def _main(self, skips: Sequence[Tensor], joined: Tensor, bottleneck: Tensor) -> SegOutput:
        d4 = self.decoder(joined, skips)[-1]
        return SegOutput(logits=self.out_conv(d4), features=bottleneck, decoder_features=d4)

    def forward_train(self, x: Tensor, site: Optional[int] = None) -> LPPAOutput:
        """Both decoders, and the fused map under every site code (all K fusions run, as in
        the reference, so BatchNorm sees each of them)."""
        self._check(x)
        code = self.site if site is None else int(site)
        *skips, bottleneck = self.encoder(x)
        fused = tuple(self.fuse(bottleneck, k) for k in range(self.num_sites))
        joined = torch.cat([bottleneck, fused[code]], dim=1)
        return LPPAOutput(seg=self._main(skips, joined, bottleneck),
                          aux_logits=self.aux_decoder(joined, skips), fused=fused, site=code)

    def forward(self, x: Tensor, site: Optional[int] = None) -> SegOutput:
        """The main decoder's prediction for ``x`` (B, in_chns, img_size, img_size)."""
        if self.training:
            return self.forward_train(x, site).seg
        self._check(x)
        code = self.site if site is None else int(site)
        *skips, bottleneck = self.encoder(x)
        joined = torch.cat([bottleneck, self.fuse(bottleneck, code)], dim=1)
        return self._main(skips, joined, bottleneck)


@register_network("unet_lppa", info=NetworkInfo(size_multiple=SIZE_MULTIPLE, site_prompts=True))
def unet_lppa(in_chns: int, num_classes: int, base_channels: int = 16, img_size: int = 256,
              num_sites: int = 1, site: int = 0, label_form: str = "",
              label_prompt: bool = True, attention: str = "dual") -> LPPAUNet:
    """FedLPPA's prompt-conditioned dual-decoder U-Net."""
    return LPPAUNet(in_chns, num_classes, base_channels=base_channels, img_size=img_size,
                    num_sites=num_sites, site=site, label_form=label_form,
                    label_prompt=label_prompt, attention=attention)
