"""U-Net forward dynamics model (LAPO's "world model"): predicts o[t+1] from o[t-1], o[t] and the
quantised latent action, which enters twice: broadcast over the input image, and as the whole
skip connection at the 1x1 bottleneck."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualLayer(nn.Module):
    """x + conv(relu(conv(relu(x)))) with a half-width hidden layer."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, hidden, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class BroadcastConv(nn.Conv2d):
    """3x3 conv (stride 1, zero padding 1) over cat([x, a broadcast to every pixel]), computed
    without building the broadcast map.

    Same weights and the same function as the plain conv on the concatenation (the official
    code's layer), but the latent-action part costs O(B * out * cond * 9) instead of a full
    convolution over `cond` extra input channels at full resolution, which dominated the first
    layer (128 of its 134 input channels in the paper model). A constant map convolved with zero
    padding only depends on which kernel taps fall outside the image: 9 cases (4 corners,
    4 edges, interior), exactly the 9 pixels of a 3x3 all-ones image.
    """

    def __init__(self, in_channels: int, cond_channels: int, out_channels: int):
        super().__init__(in_channels + cond_channels, out_channels, kernel_size=3, padding=1)
        self.x_channels = in_channels

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w_x, w_a = self.weight[:, : self.x_channels], self.weight[:, self.x_channels :]
        out = F.conv2d(x, w_x, self.bias, padding=1)
        o, c = w_a.shape[:2]
        ones = torch.ones(1, 1, 3, 3, dtype=w_a.dtype, device=w_a.device)
        taps = F.conv2d(ones, w_a.reshape(o * c, 1, 3, 3), padding=1).view(o, c, 3, 3)
        per_case = torch.einsum("bc,ocij->boij", a.to(taps.dtype), taps).to(out.dtype)  # (B, O, 3, 3)
        h, w = out.shape[-2:]
        if h < 2 or w < 2:
            raise ValueError(f"BroadcastConv needs at least 2x2 pixels, got {h}x{w}")
        # Spread the 3x3 cases over the image by slicing and expanding, not by gathering with an
        # index tensor: the index_put in the gather's backward crashed Inductor's CPU kernels
        # (heap corruption in the compiled backward of the paper model), and a sum over an
        # expanded view is the backward every backend gets right.
        per_row = _spread(per_case, h, dim=2)  # (B, O, H, 3)
        return out + _spread(per_row, w, dim=3)


def _spread(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """A size-3 dim (first, interior, last) -> size n: [first, interior x (n - 2), last]."""
    first, mid, last = t.narrow(dim, 0, 1), t.narrow(dim, 1, 1), t.narrow(dim, 2, 1)
    size = list(t.shape)
    size[dim] = n - 2
    return torch.cat([first, mid.expand(size), last], dim=dim)


class WholeInputConv2d(nn.Conv2d):
    """A Conv2d whose kernel covers its whole (unpadded) input, as the U-Net's 2x2 -> 1x1
    bottleneck does, computed as the matrix product it is; any other input takes the conv.

    Same weights and function as the conv. The reason is torch.compile on GPUs: a 1x1 map has
    no definite memory format (channels-last and contiguous strides both fit), and the stride
    that Inductor predicts for the convolution backward next to it differs from what cuDNN
    returns ("expected size 384==384, stride 4==1 at dim=1"). A matmul has one layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.kernel_size or self.padding != (0, 0) or self.groups != 1:
            return super().forward(x)
        return F.linear(x.flatten(1), self.weight.flatten(1), self.bias)[:, :, None, None]


class PatchConvTranspose2d(nn.ConvTranspose2d):
    """A ConvTranspose2d with kernel = stride applied to a 1x1 map (the U-Net's first up block):
    each input vector becomes one kernel-sized patch, a matrix product. See WholeInputConv2d."""

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:  # type: ignore[override]
        if (tuple(x.shape[-2:]) != (1, 1) or self.kernel_size != self.stride or self.padding != (0, 0)
                or self.groups != 1 or output_size is not None):
            return super().forward(x, output_size)
        _, c_out, kh, kw = self.weight.shape
        bias = None if self.bias is None else self.bias.repeat_interleave(kh * kw)
        out = F.linear(x.flatten(1), self.weight.flatten(1).t(), bias)
        return out.view(-1, c_out, kh, kw).contiguous(memory_format=torch.channels_last)


def make_norm(kind: str, channels: int, carries_latent: bool = False) -> nn.Module:
    """BatchNorm as in the official U-Net, or GroupNorm with the same affine parameters.

    BatchNorm normalises by each worker's own batch, so under data parallelism on CPU (where
    SyncBatchNorm does not run) N workers do not compute what one worker computes on the global
    batch; GroupNorm has no batch dependence, so any number of workers trains the same model.

    ``carries_latent`` marks the two norms right after the latent action enters (the broadcast
    input conv and the first up block over the 1x1 latent skip). The latent reaches those
    features mostly as a per-sample, per-channel offset, the very thing a per-channel GroupNorm
    (one channel per group: instance norm, which gcd(channels, 8) gives at widths <= 8)
    subtracts. Measured at init, random frames x 8 random codebook codes, share of the feature
    variance that comes from the latent, old ``cpu`` preset (base 4): 0.59 into the input norm,
    0.035 out of it (0.008 after 20 training steps), 0.04 in the prediction; BatchNorm keeps 0.56.
    One group over all channels keeps the offsets' differences between channels: 0.51 out of the
    input norm and 0.36-0.49 in the prediction (base 4-8). On random-policy Procgen frames
    (CoinRun, StarPilot; 8 frames x 8 codes) the old preset went 0.84 -> 0.20 across the input
    norm and 0.10-0.12 in the prediction; the new one 0.81 -> 0.79 and 0.55-0.58. The other
    norms see no latent offset and keep gcd(channels, 8) groups.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(1 if carries_latent else math.gcd(channels, 8), channels)
    raise ValueError(f"world-model norm must be 'batch' or 'group', got {kind!r}")


class DownBlock(nn.Module):
    """conv 3x3 -> batch norm -> residual -> maxpool 2 -> relu; halves the spatial size.

    With `cond_channels`, the conv also sees a vector broadcast over the image (BroadcastConv).
    """

    def __init__(self, in_channels: int, out_channels: int, cond_channels: int = 0, norm: str = "batch"):
        super().__init__()
        if cond_channels:
            self.conv: nn.Conv2d = BroadcastConv(in_channels, cond_channels, out_channels)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = make_norm(norm, out_channels, carries_latent=bool(cond_channels))
        self.res = ResidualLayer(out_channels, out_channels // 2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x) if cond is None else self.conv(x, cond)
        return F.relu(F.max_pool2d(self.res(self.norm(x)), 2))


class UpBlock(nn.Module):
    """transposed conv 2x2/2 -> batch norm -> residual -> relu; doubles the spatial size."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch", carries_latent: bool = False):
        super().__init__()
        self.conv = PatchConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.norm = make_norm(norm, out_channels, carries_latent)
        self.res = ResidualLayer(out_channels, out_channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.res(self.norm(self.conv(x))))


class WorldModel(nn.Module):
    """(B, in_channels, S, S) context + (B, action_dim) latent -> (B, out_channels, S, S) in (-0.5, 0.5).

    For S = 64 and base width b this is the official network: five down blocks (b .. 16b channels,
    64 -> 2 pixels), a 2x2 convolution to a 1x1 bottleneck of 32b channels, and six up blocks
    (32b .. b, back to 64 pixels) with U-Net skips; the deepest skip is the latent action itself.
    """

    def __init__(self, in_channels: int, out_channels: int, action_dim: int, frame_size: int, base_channels: int,
                 norm: str = "batch"):
        super().__init__()
        levels = int(math.log2(frame_size)) - 1
        if frame_size < 4 or 2 ** (levels + 1) != frame_size:
            raise ValueError(f"the U-Net needs a power-of-two frame size >= 4, got {frame_size}")
        b = base_channels
        down_widths = [b * 2**i for i in range(levels)]  # b, 2b, ..., 16b at S=64

        # The first block sees the latent action broadcast over the frame.
        self.down = nn.ModuleList([DownBlock(in_channels, down_widths[0], cond_channels=action_dim, norm=norm)])
        prev = down_widths[0]
        for w in down_widths[1:]:
            self.down.append(DownBlock(prev, w, norm=norm))
            prev = w
        # 2x2 -> 1x1: the bottleneck sees the whole frame.
        self.bottleneck = WholeInputConv2d(prev, 2 * prev, kernel_size=2)

        self.up = nn.ModuleList()
        x_ch, skip_ch = 2 * prev, action_dim
        for w in reversed(down_widths):
            self.up.append(UpBlock(x_ch + skip_ch, w, norm=norm, carries_latent=not self.up))
            x_ch, skip_ch = w, w
        self.up.append(UpBlock(b + b, b, norm=norm))  # last skip is the first down block's output

        # The raw context frames are concatenated once more before the output head, so the model
        # only has to learn what changes between frames.
        self.head = nn.Sequential(
            nn.Conv2d(b + in_channels, b, kernel_size=3, padding=1),
            ResidualLayer(b, b // 2),
            nn.ReLU(),
            nn.Conv2d(b, out_channels, kernel_size=1),
        )

    def forward(self, context: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = self.down[0](context, action)
        skips = [x]
        for block in self.down[1:]:
            x = block(x)
            skips.append(x)
        x = self.bottleneck(x)
        skips.append(action[:, :, None, None].to(x.dtype))  # the latent action is the 1x1 skip
        for block in self.up:
            x = block(torch.cat([x, skips.pop()], dim=1))
        return torch.tanh(self.head(torch.cat([x, context], dim=1))) / 2
