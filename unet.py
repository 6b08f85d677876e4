"""The networks: EDM's two image UNets, layer for layer (DDPM++ `SongUNet` and ADM `DhariwalUNet`, Karras et al.
2022, NVlabs/edm training/networks.py), and a residual MLP for 2-D points.

All map `(x_in, c_noise, labels) -> F`, the raw network output that `common.EDMDenoiser` turns into a denoiser
`D(x; sigma, c) = c_skip * x + c_out * F(c_in * x, c_noise, c)` (Karras et al. 2022, Table 1). None of them knows
about sigma_data or the preconditioning: that lives in one place, common.py. `labels` are class indices (B,) (or
None); the UNets turn them into the one-hot vectors EDM's label embedding takes.

The UNets have EDM's modules, names, shapes and initialisation, so that the state dict of NVIDIA's pretrained EDM
networks loads into them one-to-one (common.load_edm_pickle: EDM's `model.` prefix is this project's `net.`):
  - DDPM++ (`SongUNet`): positional embedding of c_noise (EDM's `endpoint=True` frequencies, sin and cos halves
    swapped), label embedding (one-hot scaled by sqrt(classes)) added, a 2-layer SiLU MLP; encoder: a 3x3 conv, then
    per resolution a downsampling block (with a 1x1 projection on its skip: `resample_proj`) and `num_blocks`
    residual blocks, self-attention (one head) on every encoder block at a resolution in `attn_resolutions`;
    decoder: at the lowest resolution an attention block and a plain block, then per resolution an upsampling block
    (above the lowest) and `num_blocks + 1` blocks on [x, skip] concatenations, attention on the last of them at an
    attention resolution; output GroupNorm, SiLU, 3x3 conv. Residual sums are scaled by sqrt(1/2); the embedding is
    added before the second GroupNorm; xavier_uniform initialisation, 1e-5-scaled on the convolutions that end a
    residual branch.
  - ADM (`DhariwalUNet`, EDM's ImageNet-64 network): the same block with an adaptive scale and shift from the
    embedding, heads of 64 channels, attention on every block at an attention resolution, no sin/cos swap, the label
    embedding added after the MLP; kaiming_uniform initialisation, zero on the branch-ending convolutions.
Dropout is an nn.Dropout in each block (as EDM's functional dropout), so common.set_dropout can change it.

`forward(..., return_features=True)` also returns a list of intermediate feature maps: the encoder's output at
each resolution (after that resolution's last block), the lowest resolution last (for the MLP: the hidden state
after each block). DMD2 puts its GAN classifier on the last of them, the encoder's output before the decoder (what
the DMD2 code's `return_bottleneck` returns), and ADD puts its discriminator heads on all of the frozen teacher's;
`features(...)` computes them with the encoder alone.

Presets (parameter counts printed by `python unet.py`, and stated in README.md); the in-repo ones are DDPM++
networks sized to train from scratch, the `edm-*` ones EDM's published networks (for `--teacher edm`):
  tiny            DDPM++ 16 ch   [1,2]      1 block            tests only
  small           DDPM++ 32 ch   [1,2,2]    1 block            synthetic images on CPU
  cifar10         DDPM++ 96 ch   [1,2,2]    2 blocks, attn 16  32x32
  imagenet64      DDPM++ 96 ch   [1,2,2,2]  2 blocks, attn 16  64x64 (an ADM at this size would be a third larger
                                                               and train slower; 64x64 DDPM++ is what EDM uses for
                                                               FFHQ and AFHQ)
  edm-cifar10     DDPM++ 128 ch  [2,2,2]    4 blocks, attn 16, dropout 0.13, augment labels 9   (EDM CIFAR-10)
  edm-imagenet64  ADM 192 ch     [1,2,3,4]  3 blocks, attn 32/16/8, dropout 0.1                 (EDM ImageNet-64)
  mlp             residual MLP, 128 hidden x 4 blocks, for toy2d
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The layout of the UNets: part of the teacher cache key, so that a teacher trained with an earlier layout is never
# loaded into these networks (version 2: EDM's layer-for-layer layout).
UNET_LAYOUT_VERSION = 2


# ----------------------------------------------------------------------------------------------------------------
# EDM's layers: initialisation modes, Linear, Conv2d with resampling, GroupNorm
# ----------------------------------------------------------------------------------------------------------------

def weight_init(shape, mode, fan_in, fan_out):
    """EDM's initialisations: xavier / kaiming, uniform / normal, from the fans."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    """y = x W^T + b with EDM's initialisation (init_weight, init_bias scale the initial values)."""

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        return x + self.bias.to(x.dtype) if self.bias is not None else x


class Conv2d(nn.Module):
    """A kernel x kernel convolution ("same" padding), optionally after 2x up- or downsampling with the separable
    filter `resample_filter` ([1, 1]: nearest up, 2x2 average down), held as a buffer as in EDM. kernel = 0 is
    resampling alone."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        assert not (up and down)
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) \
            if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum() ** 2  # (1, 1, k, k), sums to 1
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H', W')
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.up:  # each pixel spread over 2x2 (the filter times 4 keeps the mean)
            x = F.conv_transpose2d(x, (f * 4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                   padding=f_pad)
        if self.down:  # 2x2 average, stride 2
            x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
        if w is not None:
            x = F.conv2d(x, w, padding=w.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with min(32, C / 4) groups, as EDM."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


# ----------------------------------------------------------------------------------------------------------------
# The UNet block and the noise embedding
# ----------------------------------------------------------------------------------------------------------------

class UNetBlock(nn.Module):
    """EDM's residual block (DDPM++ and ADM), with optional 2x resampling and self-attention:
        h = conv0(SiLU(GN(x)));  h = SiLU(GN(h + A emb))  or, adaptive,  SiLU(GN(h) (1 + scale) + shift);
        x = (conv1(dropout(h)) + skip(x)) * skip_scale;   then  x = (proj(attention(GN(x))) + x) * skip_scale.
    skip is a 1x1 conv when the channels change or (resample_proj) the block resamples, else resampling alone."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0.0, skip_scale=1.0, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = init or {}
        init_zero = init_zero or dict(init_weight=0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.skip_scale, self.adaptive_scale = skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter,
                               **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):  # x (B, C_in, H, W), emb (B, E) -> (B, C_out, H', W')
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)  # (B, C_out or 2 C_out, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(self.drop(x))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            B, C, H, W = x.shape
            c = C // self.num_heads
            # EDM's channel layout of qkv: (heads, channels per head, q|k|v)
            q, k, v = self.qkv(self.norm2(x)).reshape(B, self.num_heads, c, 3, H * W).unbind(3)  # (B, h, c, HW)
            # softmax(q^T k / sqrt(c)) v in fp32 under autocast too, as EDM's AttentionOp computes its weights
            with torch.autocast(x.device.type, enabled=False):
                a = F.scaled_dot_product_attention(q.transpose(2, 3).float(), k.transpose(2, 3).float(),
                                                   v.transpose(2, 3).float()).to(x.dtype)  # (B, h, HW, c)
            x = (self.proj(a.transpose(2, 3).reshape(B, C, H, W)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """The sinusoidal embedding of the scalar c_noise = ln(sigma)/4: [cos(c_noise f_i), sin(c_noise f_i)] with
    f_i = (1/max_positions)^(i / (n/2 - endpoint)), i < n/2 (EDM: endpoint=True for DDPM++, False for ADM)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, c_noise):  # (B,) -> (B, num_channels)
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=c_noise.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        angles = torch.outer(c_noise.float(), freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def _one_hot(labels, num_classes):
    """Class indices (B,) -> one-hot float (B, K): the class vectors EDM's label embedding takes."""
    if labels is None:
        raise ValueError("this network is class-conditional: pass labels")
    # F.one_hot would check the labels' range on the host (a sync per call on CUDA); a comparison does not
    return (labels.long()[:, None] == torch.arange(num_classes, device=labels.device)).float()


class _UNetBase(nn.Module):
    """What both UNets share: the encoder / decoder walk over EDM's ModuleDicts, and the feature maps."""

    def _encode(self, x, emb):
        """Encoder: (h, skips for the decoder, features: each resolution's last block output, the lowest last)."""
        skips, features = [], []
        for name, block in self.enc.items():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
            if name in self.feature_blocks:
                features.append(x)  # (B, mc * mult, H / 2^level, W / 2^level)
        return x, skips, features

    def _decode(self, x, skips, emb):
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return x

    def features(self, x, c_noise, labels=None):
        """The feature maps of forward(..., return_features=True) from the encoder alone (the decoder, skipped here,
        is most of the network's cost)."""
        return self._encode(x, self.embed(c_noise, labels))[2]

    def _build_encoder_decoder(self, img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                               attn_resolutions, block, init, first_conv, decoder_attention):
        """EDM's encoder and decoder ModuleDicts (self.enc, self.dec), as both of its UNets lay them out. The two
        differ in the first conv's width (DDPM++: model_channels; ADM: model_channels * channel_mult[0]) and in
        where the decoder attends at an attention resolution (DDPM++: its last block of the level, "last"; ADM:
        every block, "every"). Returns the decoder's output channels."""
        # Encoder: per resolution, a 3x3 conv (the first) or a downsampling block, then num_blocks blocks.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, first_conv
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for b in self.enc.values()]

        # Decoder: two blocks at the lowest resolution (the first attends) or an upsampling block, then
        # num_blocks + 1 blocks, each taking one encoder output as a skip connection.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = res in attn_resolutions and (decoder_attention == "every" or idx == num_blocks)
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        return cout

    def _no_augmentation(self, emb):
        """EDM's networks add map_augment(augment labels) to the embedding when trained with its AugmentPipe. Runs
        here use no augmentation: labels 0, which adds exactly 0 (the layer has no bias) and keeps the layer in the
        graph, so that DistributedDataParallel finds every parameter used."""
        if self.map_augment is None:
            return emb
        return emb + self.map_augment(emb.new_zeros(emb.shape[0], self.map_augment.in_features))

    def _feature_blocks(self, channel_mult, num_blocks):
        res = [self.resolution >> level for level in range(len(channel_mult))]
        return {f"{r}x{r}_block{num_blocks - 1}" for r in res}


class SongUNet(_UNetBase):
    """EDM's DDPM++ UNet (Song et al. 2021's architecture as EDM implements it; embedding_type 'positional',
    encoder and decoder 'standard', resample_filter [1, 1]). forward(x, c_noise, labels=None,
    return_features=False) -> F (B, C, H, W) [, features]."""

    def __init__(self, img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), dropout=0.10, label_dropout=0.0, channel_mult_noise=1,
                 resample_filter=(1, 1), embedding_type="positional", encoder_type="standard",
                 decoder_type="standard"):
        if (embedding_type, encoder_type, decoder_type) != ("positional", "standard", "standard"):
            raise ValueError(f"only DDPM++ (embedding 'positional', encoder and decoder 'standard') is built here, not "
                             f"{embedding_type} / {encoder_type} / {decoder_type}")
        super().__init__()
        self.resolution, self.in_channels, self.num_classes = img_resolution, in_channels, label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init,
                     init_zero=init_zero, init_attn=init_attn)

        # Mapping: c_noise (and the label, the augmentation labels) -> the embedding every block adds.
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        cout = self._build_encoder_decoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                                           attn_resolutions, block, init, first_conv=model_channels,
                                           decoder_attention="last")
        res = img_resolution
        self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
        self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)
        self.feature_blocks = self._feature_blocks(channel_mult, num_blocks)
        self.feature_channels = [model_channels * m for m in channel_mult]

    def embed(self, c_noise, labels=None):
        emb = self.map_noise(c_noise)  # (B, noise_channels): [cos | sin]
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # swap to [sin | cos], as EDM
        if self.map_label is not None:
            onehot = _one_hot(labels, self.num_classes)
            if self.training and self.label_dropout:
                onehot = onehot * (torch.rand(onehot.shape[0], 1, device=onehot.device) >= self.label_dropout)
            emb = emb + self.map_label(onehot * math.sqrt(self.map_label.in_features))
        emb = self._no_augmentation(emb)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))  # (B, emb_channels)

    def forward(self, x, c_noise, labels=None, return_features=False):
        emb = self.embed(c_noise, labels)
        h, skips, features = self._encode(x, emb)
        aux = None
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                out = block(h)
            elif name.endswith("aux_conv"):
                aux = block(F.silu(out))
            else:
                if h.shape[1] != block.in_channels:
                    h = torch.cat([h, skips.pop()], dim=1)
                h = block(h, emb)
        return (aux, features) if return_features else aux


class DhariwalUNet(_UNetBase):
    """EDM's ADM UNet (Dhariwal & Nichol 2021's architecture as EDM implements it), EDM's ImageNet-64 network.
    forward(x, c_noise, labels=None, return_features=False) -> F (B, C, H, W) [, features]."""

    def __init__(self, img_resolution=64, in_channels=3, out_channels=3, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0.0):
        super().__init__()
        self.resolution, self.in_channels, self.num_classes = img_resolution, in_channels, label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                init_weight=math.sqrt(label_dim)) if label_dim else None

        cout = self._build_encoder_decoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                                           attn_resolutions, block, init, first_conv=model_channels * channel_mult[0],
                                           decoder_attention="every")
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)
        self.feature_blocks = self._feature_blocks(channel_mult, num_blocks)
        self.feature_channels = [model_channels * m for m in channel_mult]

    def embed(self, c_noise, labels=None):
        emb = F.silu(self.map_layer0(self._no_augmentation(self.map_noise(c_noise))))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            onehot = _one_hot(labels, self.num_classes)
            if self.training and self.label_dropout:
                onehot = onehot * (torch.rand(onehot.shape[0], 1, device=onehot.device) >= self.label_dropout)
            emb = emb + self.map_label(onehot)
        return F.silu(emb)  # (B, emb_channels)

    def forward(self, x, c_noise, labels=None, return_features=False):
        emb = self.embed(c_noise, labels)
        h, skips, features = self._encode(x, emb)
        out = self.out_conv(F.silu(self.out_norm(self._decode(h, skips, emb))))
        return (out, features) if return_features else out


# ----------------------------------------------------------------------------------------------------------------
# The 2-D network
# ----------------------------------------------------------------------------------------------------------------

class SinusoidalEmbedding(nn.Module):
    """[cos(c_noise f_i), sin(c_noise f_i)], f_i = (1/10000)^(i / (dim/2)): the toy MLP's embedding of c_noise."""

    def __init__(self, dim, max_positions=10000):
        super().__init__()
        self.dim, self.max_positions = dim, max_positions

    def forward(self, c_noise):  # (B,) -> (B, dim)
        half = self.dim // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
        angles = c_noise.float()[:, None] * freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class NoiseLabelEmbedding(nn.Module):
    """emb = MLP(sinusoidal(c_noise) + label_embed(c)); the class label is *added* to the noise embedding."""

    def __init__(self, base_dim, emb_dim, num_classes=0):
        super().__init__()
        self.pos = SinusoidalEmbedding(base_dim)
        self.label = nn.Embedding(num_classes, base_dim) if num_classes > 0 else None
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU())

    def forward(self, c_noise, labels=None):  # (B,), (B,) int -> (B, emb_dim)
        e = self.pos(c_noise)
        if self.label is not None:
            if labels is None:
                raise ValueError("this network is class-conditional: pass labels")
            e = e + self.label(labels)
        return self.mlp(e)


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
    # EDM's published networks (training/networks.py configs of edm-cifar10-32x32-*-vp and edm-imagenet-64x64-cond-adm)
    "edm-cifar10": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                        dropout=0.13, augment_dim=9),
    "edm-imagenet64": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                           attn_resolutions=(32, 16, 8), dropout=0.1),
    # toy2d: the residual MLP; 'mlp-wide' has 2x the width (4x the parameters), to test whether capacity limits a
    # student or its fake score (every copy of the teacher, the student and the fake score, has the teacher's size)
    "mlp": dict(model_type="MLPNet", hidden=128, num_blocks=4, dropout=0.0),
    "mlp-wide": dict(model_type="MLPNet", hidden=256, num_blocks=4, dropout=0.0),
}
UNETS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}  # the architectures of EDM's pickles
NETWORKS = {**UNETS, "MLPNet": MLPNet}


def is_point_preset(preset):
    """True for the MLP presets of 2-D points (toy2d), False for the image UNets."""
    return PRESETS[preset].get("model_type") == "MLPNet"


def network_spec(preset, shape, num_classes=0, **overrides):
    """(class name in NETWORKS, its init arguments) of the network a preset builds for data of `shape` ((D,) for
    points, (C, H, W) for images): what build_network calls, and what a generator.pt records to be rebuilt from.
    `overrides` replace preset arguments (e.g. an EDM pickle's recorded augment_dim)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown network preset {preset!r}; choose from {sorted(PRESETS)}")
    kwargs = {**PRESETS[preset], **overrides}
    name = kwargs.pop("model_type", "SongUNet")
    if name == "MLPNet":
        if len(shape) != 1:
            raise ValueError(f"the {preset!r} preset is for 2-D points; use a UNet preset for images")
        return name, dict(dim=shape[0], num_classes=num_classes, **kwargs)
    if len(shape) != 3:
        raise ValueError(f"preset {preset!r} is a UNet for images; use 'mlp' for points")
    C, H, W = shape
    levels = len(kwargs["channel_mult"])
    if H != W or H % (2 ** (levels - 1)):
        raise ValueError(f"resolution {H}x{W} must be square and divisible by {2 ** (levels - 1)} for {preset!r}")
    return name, dict(img_resolution=H, in_channels=C, out_channels=C, label_dim=num_classes, **kwargs)


def build_network(preset, shape, num_classes=0, **overrides):
    """Network for data of `shape` from a preset name (network_spec, then the class)."""
    name, kwargs = network_spec(preset, shape, num_classes, **overrides)
    return NETWORKS[name](**kwargs)


def layout_version(preset):
    """The network layout a preset builds (part of the teacher cache key): 1 for the MLPs, UNET_LAYOUT_VERSION else."""
    return 1 if is_point_preset(preset) else UNET_LAYOUT_VERSION


def count_params(net):
    return sum(p.numel() for p in net.parameters())


if __name__ == "__main__":
    for name, shape, k in [("mlp", (2,), 0), ("mlp-wide", (2,), 0), ("tiny", (3, 8, 8), 10), ("small", (3, 16, 16), 10),
                           ("cifar10", (3, 32, 32), 10), ("imagenet64", (3, 64, 64), 1000),
                           ("edm-cifar10", (3, 32, 32), 10), ("edm-imagenet64", (3, 64, 64), 1000)]:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            net = build_network(name, shape, k)
        print(f"{name:>14}  shape {str(shape):>12}  classes {k:>4}  params {count_params(net) / 1e6:8.3f}M")
