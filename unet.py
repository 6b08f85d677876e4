"""The networks: a small EDM "DDPM++"-style UNet for images and a residual MLP for 2-D points.

Both map `(x_in, c_noise, labels) -> F`, the raw network output that `common.EDMDenoiser` turns into a denoiser
`D(x; sigma, c) = c_skip * x + c_out * F(c_in * x, c_noise, c)` (Karras et al. 2022, Table 1). Neither knows
about sigma_data or the preconditioning: that lives in one place, common.py.

`forward(..., return_features=True)` also returns a list of intermediate feature maps: the encoder's output at
each resolution, the lowest resolution last (for the MLP: the hidden state after each block). DMD2 puts its GAN
classifier on the last of them, the encoder's output before the decoder (what the DMD2 code's `return_bottleneck`
returns), and ADD puts its discriminator heads on all of the frozen teacher's; `features(...)` computes them with
the encoder alone.

The UNet follows the SongUNet / DDPM++ layout of NVlabs/edm in a compact form:
  positional embedding of c_noise (+ class embedding) -> 2-layer MLP -> per-block scale/shift is *added*;
  encoder: conv 3x3, then per resolution `num_blocks` residual blocks (GroupNorm, SiLU, conv 3x3, dropout),
           self-attention at the resolutions in `attn_resolutions`, a downsampling residual block between levels;
  bottleneck: block + attention + block;
  decoder: per resolution `num_blocks + 1` blocks on [x, skip] concatenations, an upsampling block between levels;
  output: GroupNorm, SiLU, zero-initialised conv 3x3.
Residual sums are scaled by 1/sqrt(2) as in DDPM++. Attention uses `F.scaled_dot_product_attention` (flash /
memory-efficient kernels on GPU). All reshapes are `reshape`, so `channels_last` inputs work.

Presets (parameter counts printed by `python unet.py`, and stated in README.md):
  tiny      16 ch  [1,2]      1 block   tests only
  small     32 ch  [1,2,2]    1 block   synthetic images on CPU
  cifar10   96 ch  [1,2,2]    2 blocks  32x32, attention at 16x16
  imagenet64 96 ch [1,2,2,2]  2 blocks  64x64, attention at 16x16
  mlp       residual MLP, 128 hidden x 4 blocks, for toy2d
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------

class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the scalar c_noise = ln(sigma)/4 (DDPM++ uses this form)."""

    def __init__(self, dim, max_positions=10000):
        super().__init__()
        self.dim, self.max_positions = dim, max_positions

    def forward(self, c_noise):  # (B,) -> (B, dim)
        half = self.dim // 2
        freqs = torch.arange(half, dtype=torch.float32, device=c_noise.device) / half
        freqs = (1 / self.max_positions) ** freqs
        # c_noise is O(1); EDM feeds it unscaled into the same embedding.
        angles = c_noise.float()[:, None] * freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class NoiseLabelEmbedding(nn.Module):
    """emb = MLP(pos(c_noise) + label_embed(c)); the class label is *added* to the noise embedding (EDM)."""

    def __init__(self, base_dim, emb_dim, num_classes=0):
        super().__init__()
        self.pos = PositionalEmbedding(base_dim)
        self.label = nn.Embedding(num_classes, base_dim) if num_classes > 0 else None
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU())

    def forward(self, c_noise, labels=None):  # (B,), (B,) int -> (B, emb_dim)
        e = self.pos(c_noise)
        if self.label is not None:
            if labels is None:
                raise ValueError("this network is class-conditional: pass labels")
            e = e + self.label(labels)
        return self.mlp(e)


# ----------------------------------------------------------------------------------------------------------------
# UNet blocks
# ----------------------------------------------------------------------------------------------------------------

def _norm(ch):
    return nn.GroupNorm(num_groups=min(32, ch // 4), num_channels=ch, eps=1e-6)


class ResBlock(nn.Module):
    """DDPM++ residual block: x -> GN -> SiLU -> [resample] -> conv -> (+emb) -> GN -> SiLU -> dropout -> conv,
    plus a (resampled, 1x1-projected when needed) skip; the sum is scaled by 1/sqrt(2)."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout=0.0, resample=None, attention=False):
        super().__init__()
        self.resample = resample  # None | "down" | "up"
        self.norm0, self.conv0 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.affine = nn.Linear(emb_dim, out_ch)
        self.norm1, self.conv1 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.attn = SelfAttention(out_ch) if attention else None

    def _resample(self, x):
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x, emb):  # x (B, Cin, H, W), emb (B, E) -> (B, Cout, H', W')
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        h = h + self.affine(emb)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        skip = self._resample(x)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (h + skip) * (1 / math.sqrt(2))
        if self.attn is not None:
            x = self.attn(x)
        return x


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, scaled by 1/sqrt(2)."""

    def __init__(self, ch, head_dim=64):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)  # each (B, heads, HW, C/heads)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        a = a.permute(0, 1, 3, 2).reshape(B, C, H, W)
        return (x + self.proj(a)) * (1 / math.sqrt(2))


# ----------------------------------------------------------------------------------------------------------------
# The UNet
# ----------------------------------------------------------------------------------------------------------------

class SongUNet(nn.Module):
    """Compact DDPM++ UNet. forward(x, c_noise, labels=None, return_features=False) -> F (B, C, H, W)
    [, features: the encoder's output at each resolution, the lowest resolution last]."""

    def __init__(self, resolution=32, in_channels=3, num_classes=0, model_channels=96, channel_mult=(1, 2, 2),
                 num_blocks=2, attn_resolutions=(16,), dropout=0.1):
        super().__init__()
        self.resolution, self.in_channels, self.num_classes = resolution, in_channels, num_classes
        emb_dim = 4 * model_channels
        self.embed = NoiseLabelEmbedding(model_channels, emb_dim, num_classes)
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        # Encoder: remember the channel count of every skip connection.
        self.enc = nn.ModuleList()
        skips, ch, res = [model_channels], model_channels, resolution
        self.feature_levels = []  # index in self.enc after which a feature map is collected
        for level, mult in enumerate(channel_mult):
            if level > 0:
                self.enc.append(ResBlock(ch, ch, emb_dim, dropout, resample="down"))
                res //= 2
                skips.append(ch)
            for _ in range(num_blocks):
                out = model_channels * mult
                self.enc.append(ResBlock(ch, out, emb_dim, dropout, attention=res in attn_resolutions))
                ch = out
                skips.append(ch)
            self.feature_levels.append(len(self.enc) - 1)

        self.feature_channels = [model_channels * m for m in channel_mult]

        # Bottleneck: block + attention + block at the lowest resolution.
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout, attention=True),
                                  ResBlock(ch, ch, emb_dim, dropout)])

        # Decoder: num_blocks + 1 blocks per level consume the skips in reverse order.
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                out = model_channels * mult
                self.dec.append(ResBlock(ch + skips.pop(), out, emb_dim, dropout, attention=res in attn_resolutions))
                ch = out
            if level > 0:
                self.dec.append(ResBlock(ch, ch, emb_dim, dropout, resample="up"))
                res *= 2
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _encode(self, x, emb):
        """Encoder: returns (h, skips for the decoder, feature maps: each level's output, the lowest resolution last)."""
        h = self.conv_in(x)
        skips, features = [h], []
        for i, block in enumerate(self.enc):
            h = block(h, emb)
            skips.append(h)
            if i in self.feature_levels:
                features.append(h)  # (B, mc * mult, H / 2^level, W / 2^level)
        return h, skips, features

    def features(self, x, c_noise, labels=None):
        """The feature maps of forward(..., return_features=True) from the encoder alone (the bottleneck and the
        decoder, skipped here, are most of the network's cost)."""
        return self._encode(x, self.embed(c_noise, labels))[2]

    def forward(self, x, c_noise, labels=None, return_features=False):
        emb = self.embed(c_noise, labels)  # (B, 4*mc)
        h, skips, features = self._encode(x, emb)
        for block in self.mid:
            h = block(h, emb)
        for block in self.dec:
            if block.resample != "up":
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return (out, features) if return_features else out


# ----------------------------------------------------------------------------------------------------------------
# The 2-D network
# ----------------------------------------------------------------------------------------------------------------

class MLPNet(nn.Module):
    """Residual MLP for 2-D points: h <- h + W2 SiLU(W1 SiLU(LN(h)) + A emb), zero-initialised output layer.
    forward(x, c_noise, labels=None, return_features=False) -> F (B, D) [, hidden state after each block]."""

    def __init__(self, dim=2, num_classes=0, hidden=256, num_blocks=4, dropout=0.0):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.embed = NoiseLabelEmbedding(64, hidden, num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList()
        for _ in range(num_blocks):
            self.blocks.append(nn.ModuleDict(dict(
                norm=nn.LayerNorm(hidden), fc1=nn.Linear(hidden, hidden), emb=nn.Linear(hidden, hidden),
                fc2=nn.Linear(hidden, hidden), drop=nn.Dropout(dropout))))
        self.feature_channels = [hidden] * num_blocks
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, c_noise, labels=None, return_features=False):
        emb = self.embed(c_noise, labels)  # (B, hidden)
        h, features = self.inp(x), []
        for b in self.blocks:
            r = F.silu(b["fc1"](F.silu(b["norm"](h))) + b["emb"](emb))
            h = h + b["fc2"](b["drop"](r))
            features.append(h)
        out = self.out(h)
        return (out, features) if return_features else out

    def features(self, x, c_noise, labels=None):
        """The hidden state after every block (as forward(..., return_features=True) returns them)."""
        return self.forward(x, c_noise, labels, return_features=True)[1]


# ----------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------

PRESETS = {
    "tiny": dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0),
    "small": dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0),
    "cifar10": dict(model_channels=96, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16,), dropout=0.13),
    "imagenet64": dict(model_channels=96, channel_mult=(1, 2, 2, 2), num_blocks=2, attn_resolutions=(16,),
                       dropout=0.1),
    "mlp": dict(hidden=128, num_blocks=4, dropout=0.0),
}


def build_network(preset, shape, num_classes=0):
    """Network for data of `shape` ((D,) for points, (C, H, W) for images) from a preset name."""
    if preset not in PRESETS:
        raise ValueError(f"unknown network preset {preset!r}; choose from {sorted(PRESETS)}")
    if preset == "mlp":
        if len(shape) != 1:
            raise ValueError("the 'mlp' preset is for 2-D points; use a UNet preset for images")
        return MLPNet(dim=shape[0], num_classes=num_classes, **PRESETS[preset])
    if len(shape) != 3:
        raise ValueError(f"preset {preset!r} is a UNet for images; use 'mlp' for points")
    C, H, W = shape
    levels = len(PRESETS[preset]["channel_mult"])
    if H != W or H % (2 ** (levels - 1)):
        raise ValueError(f"resolution {H}x{W} must be square and divisible by {2 ** (levels - 1)} for {preset!r}")
    return SongUNet(resolution=H, in_channels=C, num_classes=num_classes, **PRESETS[preset])


def count_params(net):
    return sum(p.numel() for p in net.parameters())


if __name__ == "__main__":
    for name, shape, k in [("mlp", (2,), 0), ("tiny", (3, 8, 8), 10), ("small", (3, 16, 16), 10),
                           ("cifar10", (3, 32, 32), 10), ("imagenet64", (3, 64, 64), 1000)]:
        net = build_network(name, shape, k)
        print(f"{name:>10}  shape {str(shape):>12}  classes {k:>4}  params {count_params(net) / 1e6:7.2f}M")
