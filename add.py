"""Adversarial Diffusion Distillation (ADD; Sauer, Lorenz, Blattmann, Rombach; 2023; arXiv:2311.17042), the method
behind SDXL-Turbo. There is no official training code.

Idea. The student G_theta starts as a copy of the teacher D_phi and learns to turn a noisy *real* image into a clean
one in a single network evaluation. Its input is x_s = x0 + sigma_s eps, sigma_s one of four student noise levels,
the top one pure noise (so that sampling can start from noise). Two losses act on its output x_g:
  * adversarial: a discriminator (a frozen feature network F + small trainable heads D_k on several of its layers,
    hinge loss, R1 penalty) tells x_g from real images; it makes one-step samples sharp and keeps them on the data;
  * distillation: re-noise x_g to a teacher level sigma_t, take the teacher's x0-prediction there as a stop-gradient
    target and pull x_g towards it: score distillation (identity 8 below), the teacher's knowledge in the student.
        L_G = L_adv^G(x_g) + lambda L_distill(x_g),   lambda = 2.5.
At inference the student samples in 1 to 4 steps: denoise pure noise, re-noise to the next student level, denoise.

Paper -> code (EDM form x_t = x0 + sigma eps, README.md "The maths, checked")
  Sec 3.1  T_student = {1000, 750, 500, 250}, zero terminal SNR  -> STUDENT_T, student_levels, sampling_levels
           x_s = alpha_s x0 + sigma_s eps from a real x0        -> train_iteration ("student input")
  Sec 3.2  frozen feature network F, trainable heads D_k         -> nets.feature_net, Head, Discriminator
           projection on text (here: class) and on c_img of x0  -> Head.forward, image_embedding
           L_adv^G = -E[sum_k D_k(F_k(x_g))]                     -> hinge_g_loss
           L_D = E[sum_k max(0, 1 - D_k(F_k(x0))) + max(0, 1 + D_k(F_k(x_g)))] + R1 on the heads' inputs F_k(x0)
                                                                 -> hinge_d_loss, r1_penalty
  Sec 3.3  L_distill = c(t) d(x_g, sg(D_phi(x_g + sigma_t eps')))  -> add_distill_loss, loss_sigma(n, args, device)
           c(t) = alpha_t ("exponential") or the SDS weighting    -> distill_weighting, --weighting {exp,sds}
  Eq 1     L = L_adv^G + lambda L_distill, lambda = 2.5           -> --distill-weight, train_iteration
  Fig 2    1-4 step sampling: denoise, re-noise, denoise         -> student_sigmas(args, steps=None), common.generate
  the loop: for step in range(start, args.iters): learning_rates -> train_iteration -> common.ema_update
            -> book.end_iteration (common.Bookkeeping: log, evaluate, checkpoint, signals, skip-stop)  -> main

Noise levels. SDXL is a discrete-time VP model, "scaled linear": sqrt(beta_t) linear from sqrt(8.5e-4) to
sqrt(1.2e-2) over t = 1..1000, abar_t = prod_{i<=t} (1 - beta_i); t maps to the EDM level sigma(t) =
sqrt((1 - abar_t) / abar_t) (vp_sigmas, student_levels):
      t        1000          750      500      250
      sigma    14.61 -> 80   4.082    1.613    0.6932
The top level is pure noise (zero terminal SNR): x_s = 80 eps, no x0 in it, exactly the sampler's start sigma_max z.
The teacher's level is t ~ U{1..1000} of the same schedule, sigma_t in [0.03, 14.6] (loss_sigma).

Identity 8 (the weightings). With d = squared distance, x_t = x_g + sigma eps', eps_phi = (x_t - D_phi(x_t)) / sigma:
x_g - D_phi(x_t) = sigma (eps_phi - eps'), hence
    grad_theta c ||x_g - sg(D_phi(x_t))||^2 = 2 c sigma (eps_phi - eps') dx_g/dtheta,
the SDS gradient (DreamFusion) with weight w = 2 c sigma.
  --weighting exp   c = alpha = 1 / sqrt(1 + sigma^2)   (the paper's "exponential": higher noise counts less)
  --weighting sds   c = sigma / (2 (1 + sigma^2)): SDS with DreamFusion's w = 1 - abar = sigma^2 / (1 + sigma^2)

Deliberate deviations (an offline, small-scale, pixel-space version; StyleGAN-T's code: autonomousvision/stylegan-t)
  - F (teacher_features) is the frozen teacher's encoder, not DINOv2 ViT-S, as in LADD, on inputs noised to sigma_d,
    ln sigma_d ~ N(--disc-p-mean, --disc-p-std^2): no download, trained on this data, and no bias shared with FID's
    ImageNet features (Kynkaanniemi et al. 2023).
  - toy2d: the same discriminator on the MLP teacher's hidden states, with MLP heads (R1 on the heads' inputs too).
  - c_img: the teacher's lowest-res map of x0 at sigma_min, averaged; off on toy2d (assets/results.md#add-on-toy2d).
  - Heads also see the student level s (--disc-level): levels cannot trade errors (assets/results.md#add-on-toy2d).
  - L_distill is divided by the data dimensions (a per-pixel mean); add_distill_loss sums, as identity 8 needs.
  - Hinge: a sum of per-head means; StyleGAN-T takes one mean over all heads' locations (its training/loss.py:98,104,
    on the logits concatenated in networks/discriminator.py:171).
  - R1 = gamma/2 E||grad_F D(F(x0))||^2, D = sum_k mean_locations D_k, every iteration (assets/results.md#adds-r1).
  - Per head that R1 is 1/N_k^2 of R1 on the summed logits (N_k locations), so gamma 1 equals the paper's gamma R1
    (no 1/2) at gamma = 1/(2 N_k^2): 5e-7 for a 32x32 map, 1e-4 for 8x8 (reading its D_k as a head's summed logits).
  - --adv-weight (1 in the paper) gives "distillation only" at 0; "adversarial only" is --distill-weight 0.
  - Adam(0, 0.99) for both; cifar10 / imagenet64: the paper's lr 1e-5, untuned, gamma 1 (assets/results.md#adds-r1).
  - scaled_dot_product_attention for EDM's AttentionOp (NVlabs/edm training/networks.py:113): within ~4e-7 relative.
  - toy2d: 2400 iterations, only the student's lr decayed (assets/results.md#add-toy-defaults); synthetic:
    the discriminator's lr 3e-3 (assets/results.md#add-synthetic-defaults, #where-the-fd-comes-from).

Pitfalls
  - R1 differentiates w.r.t. the heads' inputs, not their parameters (a public reimplementation got this wrong).
  - R1's double backward fails under torch.compile: the heads get DDP only, never --compile.
  - A c_img the heads can match exactly (as in 2-D) pulls the student to the blurry E[x0 | x_s]: use --no-img-cond.
  - Hinge losses near their balance say little about progress: watch the evaluation metrics.

Shared pieces (common.py / unet.py): start_method (processes, data, run folder, teacher), real_batches, generate /
student_sampler, AmpOptimizer, ema_update, Bookkeeping, evaluate (FID), save_generator, export_samples, bench;
EDMDenoiser.features.

Commands
    python add.py                                            # toy2d on CPU, a few minutes
    python add.py --distill-weight 0 --out-dir runs/toy2d-add-adv      # ablation: adversarial loss only
    python add.py --dataset synthetic --resolution 16        # small class-conditional images on CPU
    python add.py --dataset cifar10 --data-dir data          # one GPU
    torchrun --nproc_per_node=8 add.py --dataset imagenet64 --data-dir data/imagenet64
    python add.py --dataset cifar10 --resume --steps 4 --export 50000 --export-dir samples   # 4-step samples
"""

import argparse
import copy
import functools
import math
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import unet

# ================================================================================================================
# LOSSES (pure functions of tensors; test_toy.py checks them against closed forms)
# ================================================================================================================

def distill_weighting(sigma, weighting="exp"):
    """c(sigma) of the distillation loss. exp: alpha = 1/sqrt(1 + sigma^2) (the VP alpha of an EDM sigma).
    sds: sigma / (2 (1 + sigma^2)), which by identity 8 (w = 2 c sigma) gives the SDS gradient with w = 1 - abar."""
    if weighting == "exp":
        return 1 / (1 + sigma ** 2).sqrt()
    if weighting == "sds":
        return sigma / (2 * (1 + sigma ** 2))
    raise ValueError(f"unknown weighting {weighting!r} (exp or sds)")


def add_distill_loss(x_g, d_teacher, sigma, weighting="exp"):
    """ADD's distillation loss per sample (B,), summed over non-batch dimensions:
        L_distill = c(sigma) || x_g - sg(D_phi(x_g + sigma eps'; sigma)) ||^2,
    d_teacher = the teacher's x0-prediction on the re-noised student sample; sigma a float or (B,)."""
    sigma = torch.as_tensor(sigma, dtype=x_g.dtype, device=x_g.device).expand(x_g.shape[0])  # (B,)
    # c(sigma) ||x_g - sg(D_phi(x_t))||^2; its gradient is 2 c sigma (eps_phi - eps') dx_g/dtheta (identity 8)
    sq = (x_g - d_teacher.detach()).pow(2).flatten(1).sum(1)  # (B,)
    return distill_weighting(sigma, weighting) * sq


def _at_least_fp32(x):
    """bf16 / fp16 tensors (under autocast) to float32 for the loss sums; float32 / float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _per_sample(logits):
    """Logits of one head (B, ...) or a list of heads -> (B,): mean over each head's locations, summed over heads."""
    if torch.is_tensor(logits):
        logits = [logits]
    return sum(_at_least_fp32(l).reshape(l.shape[0], -1).mean(1) for l in logits)


def hinge_d_loss(real_logits, fake_logits):
    """Discriminator hinge loss per sample (B,); logits of one head (B, ...) or a list of heads:
        L_D = sum_k mean_locations [max(0, 1 - D_k(real)) + max(0, 1 + D_k(fake))]."""
    if torch.is_tensor(real_logits):
        real_logits, fake_logits = [real_logits], [fake_logits]
    # max(0, 1 - D(x0)) + max(0, 1 + D(x_g))
    return _per_sample([F.relu(1 - r) for r in real_logits]) + _per_sample([F.relu(1 + f) for f in fake_logits])


def hinge_g_loss(fake_logits):
    """Generator hinge loss per sample (B,): L_adv^G = -sum_k mean_locations D_k(fake)."""
    return -_per_sample(fake_logits)


def r1_penalty(real_logits, features):
    """R1 per sample (B,): ||grad_F D(F)||^2 with D(F) = sum_k mean_locations D_k(F_k), the per-sample scalar that
    hinge_d_loss sees, differentiated w.r.t. every head's *input* F_k (one tensor or a list; they must require grad).
    The discriminator loss adds gamma/2 times its batch mean. create_graph=True, so the penalty's gradient reaches
    the head parameters (through the second derivative), which is what trains them to be smooth."""
    features = [features] if torch.is_tensor(features) else list(features)
    d = _per_sample(real_logits)  # (B,): D(F(x0))
    # samples are independent, so the gradient of the batch sum is each sample's own gradient
    grads = torch.autograd.grad(d.sum(), features, create_graph=True)
    # R1 = sum_k ||dD / dF_k||^2
    return sum(_at_least_fp32(g).pow(2).flatten(1).sum(1) for g in grads)  # (B,)


# ================================================================================================================
# NOISE LEVELS
# ================================================================================================================

STUDENT_T = (1000, 750, 500, 250)  # the paper's student timesteps (1-based, of 1000)


def vp_sigmas(beta_start=0.00085, beta_end=0.012, T=1000):
    """EDM sigma of every timestep t = 1..T of SDXL's "scaled linear" VP schedule (sqrt(beta) linear):
    sigma(t) = sqrt((1 - abar_t) / abar_t), abar_t = prod_{i<=t} (1 - beta_i). (T,) float64; entry t-1 is t."""
    beta = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - beta, 0)
    return ((1 - abar) / abar).sqrt()


def student_levels():
    """The four student levels the student trains on, high to low: sigma(t) for t in STUDENT_T with the top one set
    to sigma_max = 80 (pure noise, zero terminal SNR): float64 [80, 4.082, 1.613, 0.6932]."""
    table = vp_sigmas()
    s = torch.stack([table[t - 1] for t in STUDENT_T])
    s[0] = common.SIGMA_MAX
    return s


@functools.lru_cache(maxsize=None)
def on_device(table, device):
    """table() (vp_sigmas, student_levels) as float32 on `device`, made once per device: a copy from the host every
    iteration would be a sync on CUDA."""
    return table().to(device=device, dtype=torch.float32)


def sampling_levels(steps, num_levels=len(STUDENT_T)):
    """Indices into student_levels() visited by a `steps`-step sampler, evenly spaced from the top:
    1 -> [0], 2 -> [0, 2], 3 -> [0, 1, 3], 4 -> [0, 1, 2, 3] (t = 1000 | 1000, 500 | 1000, 750, 250 | all)."""
    return [int(round(i * num_levels / steps)) for i in range(steps)]


def student_sigmas(args, steps=None):
    """The input noise levels of the `steps`-step sampler (default --steps) for common.generate: the visited student
    levels, the top one pure noise. 1 step: [80]; 2: [80, 1.613]; 4: [80, 4.082, 1.613, 0.6932]."""
    levels = student_levels()
    return [float(levels[k]) for k in sampling_levels(args.steps if steps is None else steps)]


def loss_sigma(n, args, device):
    """n noise levels of the distillation loss: the teacher's level t ~ U{1..1000} of the same VP schedule,
    sigma_t = sigma(t) in [0.029, 14.6]. (n,) float32"""
    table = on_device(vp_sigmas, device)  # (1000,) float32, made once per device
    return table[torch.randint(len(table), (n,), device=device)]


def disc_sigma(n, args, device):
    """n noise levels of the discriminator's (real and generated) inputs x + sigma_d eps:
    ln sigma_d ~ N(--disc-p-mean, --disc-p-std^2). (n,)"""
    return (torch.randn(n, device=device) * args.disc_p_std + args.disc_p_mean).exp()


# ================================================================================================================
# NETWORKS (the student is a copy of the teacher's EDMDenoiser; the discriminator heads are new)
# ================================================================================================================

def teacher_features(teacher_net, x, sigma, labels=None):
    """The frozen feature network F: the teacher's encoder feature maps (every resolution, the lowest last; for the
    toy MLP, the hidden state after every block) at input x and noise level sigma, from the UNet's encoder alone
    (EDMDenoiser.features). Gradients flow back to x."""
    return common.unwrap(teacher_net).features(x, sigma, labels)


@torch.no_grad()
def image_embedding(teacher_net, x0, labels=None):
    """c_img: the frozen teacher's lowest-resolution feature map of the clean x0 (sigma = 0.002), spatially
    averaged: (B, C)."""
    h = teacher_features(teacher_net, x0, common.SIGMA_MIN, labels)[-1]
    return h.float().flatten(2).mean(2) if h.ndim == 4 else h.float()


class Head(nn.Module):
    """One discriminator head D_k on feature level F_k: a small body h = body(F_k) (conv 3x3 -> GroupNorm -> SiLU ->
    conv 3x3 -> SiLU for maps, the MLP equivalent for vectors), then per-location logits with projection conditioning:
        D_k = out(h) + <h, embed(c)>/sqrt(dim) + <h, W c_img>/sqrt(dim) + <h, embed(s)>/sqrt(dim)."""

    def __init__(self, channels, dim, spatial, num_classes=0, img_dim=0, num_levels=0):
        super().__init__()
        self.dim, self.spatial = dim, spatial
        if spatial:
            self.body = nn.Sequential(nn.Conv2d(channels, dim, 3, padding=1), nn.GroupNorm(min(32, dim // 4), dim),
                                      nn.SiLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.SiLU())
            self.out = nn.Conv2d(dim, 1, 1)
        else:
            self.body = nn.Sequential(nn.Linear(channels, dim), nn.LayerNorm(dim), nn.SiLU(), nn.Linear(dim, dim),
                                      nn.SiLU())
            self.out = nn.Linear(dim, 1)
        self.label_embed = nn.Embedding(num_classes, dim) if num_classes else None
        # no bias: a zeroed c_img (student input without signal) then adds exactly nothing
        self.img_embed = nn.Linear(img_dim, dim, bias=False) if img_dim else None
        self.level_embed = nn.Embedding(num_levels, dim) if num_levels else None

    def forward(self, feat, labels=None, c_img=None, level=None):  # (B, C, H, W) | (B, C) -> (B, H*W) | (B, 1)
        h = self.body(feat)  # (B, dim, H, W) or (B, dim)
        logit = self.out(h).flatten(1)  # (B, N)
        h = h.flatten(2) if self.spatial else h[:, :, None]  # (B, dim, N)
        cond = torch.zeros_like(h[:, :, 0])  # (B, dim): the sum of the projection embeddings
        if self.label_embed is not None and labels is not None:
            cond = cond + self.label_embed(labels)
        if self.img_embed is not None and c_img is not None:
            cond = cond + self.img_embed(c_img.to(self.img_embed.weight.dtype))
        if self.level_embed is not None and level is not None:
            cond = cond + self.level_embed(level)
        # projection discriminator: logit += <h, e(c) + W c_img + e(s)> / sqrt(dim)
        return logit + (h * cond[:, :, None]).sum(1) / math.sqrt(self.dim)


class Discriminator(nn.Module):
    """The trainable part of the discriminator: one Head per feature level of the frozen teacher.
    forward(features, labels, c_img, level) -> list of per-location logits (B, N_k), one per head."""

    def __init__(self, feature_channels, dim, spatial, num_classes=0, img_dim=0, num_levels=0):
        super().__init__()
        self.heads = nn.ModuleList([Head(c, dim, spatial, num_classes, img_dim, num_levels)
                                    for c in feature_channels])

    def forward(self, features, labels=None, c_img=None, level=None):
        return [head(f, labels, c_img, level) for head, f in zip(self.heads, features)]


def build_discriminator(args, info, teacher_net):
    """Heads sized to the teacher's feature levels, conditioned as the flags say."""
    channels = list(common.unwrap(teacher_net).net.feature_channels)
    return Discriminator(channels, args.disc_dim, spatial=len(info.shape) == 3, num_classes=info.label_dim,
                         img_dim=channels[-1] if args.img_cond else 0,
                         num_levels=len(STUDENT_T) if args.disc_level else 0)


def build_networks(args, info, teacher_net, device):
    """generator (theta, the student) and ema (the student that is evaluated and saved): copies of the teacher's
    network, the student kept in eval mode (no dropout, as SDXL has none); disc: the discriminator heads on the
    features of feature_net, the frozen teacher network itself."""
    def copy_of_teacher():
        return copy.deepcopy(teacher_net).to(device)

    return SimpleNamespace(generator=copy_of_teacher().requires_grad_(True),
                           ema=copy_of_teacher().eval().requires_grad_(False),
                           disc=build_discriminator(args, info, teacher_net).to(device), feature_net=teacher_net)


# ================================================================================================================
# ONE TRAINING ITERATION
# ================================================================================================================

def _twice(v):
    """The conditions of a real/generated pair, stacked like torch.cat([x0, x_g]); None stays None."""
    return None if v is None else torch.cat([v, v])


def train_iteration(args, info, dist, teacher, nets, opt_g, opt_d, step, batches):
    """One ADD iteration: a student update on L_adv^G + lambda L_distill, then a discriminator update on the hinge
    loss + gamma/2 R1, both on the same real batch. `nets` holds the networks of build_networks and their (DDP /
    compiled) wrappers generator_t / disc_t, used where that network's own parameters are trained, and feature_net,
    the frozen teacher network whose encoder is F; `batches` yields real data. Returns the losses to log."""
    device = dist.device
    pixels = math.prod(info.shape)  # the distillation term is averaged over pixels (see the docstring)
    x0, labels = next(batches)  # (B, *shape) real data in [-1, 1]
    labels = labels if info.cond else None
    B = x0.shape[0]
    sigmas = on_device(student_levels, device)  # (4,) float32
    use_disc = args.adv_weight > 0
    disc, teacher_net = common.unwrap(nets.disc), nets.feature_net
    out = {}

    # ---- student input: a real x0 noised to a level s ~ U{0..3}; the top level (s = 0) is pure noise ----
    level = torch.randint(len(sigmas), (B,), device=device)  # (B,)
    sigma_s = sigmas[level]  # (B,)
    signal = (level > 0).float()  # 0 at the top level: zero terminal SNR, no x0 in the input
    # x_s = x0 + sigma_s eps   (x_s = sigma_max eps at the top level)
    x_s = common.column(signal, x0) * x0 + common.column(sigma_s, x0) * torch.randn_like(x0)
    c_img = None
    if use_disc and args.img_cond:
        # c_img of x0, only where the student saw some of x0 (sigma_s below the top)
        c_img = image_embedding(teacher_net, x0, labels) * signal[:, None]  # (B, C_img)
    d_level = level if args.disc_level else None

    # ---- 1. student G: adversarial + distillation loss; teacher, feature net and heads frozen ----
    common.requires_grad(disc, False)
    # the whole batch's draws before its rounds: the discriminator's sigma_d and eps, the teacher's level t ~
    # U{1..1000} (sigma_t = sigma(t) of the VP schedule, in [0.029, 14.6]) and eps'
    if use_disc:
        sigma_d, eps_d = disc_sigma(B, args, device), torch.randn_like(x0)
    if args.distill_weight > 0:
        sigma_t, eps_t = loss_sigma(B, args, device), torch.randn_like(x0)  # (B,), (B, *shape)
    x_gs, loss_adv, loss_distill, loss_g = [], 0.0, 0.0, 0.0
    opt_g.zero_grad()
    for rows, share in common.rounds(B, args.batch_gpu, nets.generator_t):  # --batch-gpu rows at a time
        labels_r, c_img_r, d_level_r = (common.pick(v, rows) for v in (labels, c_img, d_level))
        with common.autocast(args, device):
            x_g = nets.generator_t(x_s[rows], sigma_s[rows], labels_r).float()  # (b, *shape), grad to theta
            loss = torch.zeros((), device=device)
            if use_disc:
                x_d = x_g + common.column(sigma_d[rows], x_g) * eps_d[rows]
                fake_logits = disc(teacher_features(teacher_net, x_d, sigma_d[rows], labels_r), labels_r, c_img_r,
                                   d_level_r)
                # L_adv^G = -E[sum_k D_k(F_k(x_g))]
                loss_adv_r = hinge_g_loss(fake_logits).mean()
                loss = loss + args.adv_weight * loss_adv_r
                loss_adv = loss_adv + share * loss_adv_r.detach()
            if args.distill_weight > 0:
                # x_t = x_g + sigma_t eps'
                x_t = x_g.detach() + common.column(sigma_t[rows], x_g) * eps_t[rows]
                with torch.no_grad():
                    d_real = teacher(x_t, sigma_t[rows], labels_r)  # D_phi(x_t): the stop-gradient target
                # lambda L_distill, L_distill = c(sigma_t) ||x_g - sg(D_phi(x_t))||^2 / pixels
                loss_distill_r = add_distill_loss(x_g, d_real, sigma_t[rows], args.weighting).mean() / pixels
                loss = loss + args.distill_weight * loss_distill_r
                loss_distill = loss_distill + share * loss_distill_r.detach()
        opt_g.backward(loss * share)  # into theta, through the frozen heads and features, towards the teacher
        x_gs, loss_g = x_gs + [x_g.detach()], loss_g + share * loss.detach()
    opt_g.step()
    out["loss_g"] = loss_g
    if use_disc:
        out["loss_adv"] = loss_adv
    if args.distill_weight > 0:
        out["loss_distill"] = loss_distill
    if not use_disc:
        return out

    # ---- 2. discriminator heads: hinge loss on noised real x0 vs noised x_g, + gamma/2 R1 on the real features ----
    common.requires_grad(disc, True)
    x_g = torch.cat(x_gs)  # (B, *shape): the student's samples of step 1, detached
    # real and generated both noised: x + sigma_d eps, drawn for the whole batch, (2, B): real, then generated
    sigma_d, eps_d = disc_sigma(2 * B, args, device).view(2, B), torch.randn((2, *x0.shape), device=device)
    loss_d, r1, logit_real, logit_fake = 0.0, 0.0, 0.0, 0.0
    opt_d.zero_grad()
    for rows, share in common.rounds(B, args.batch_gpu, nets.disc_t):  # --batch-gpu rows at a time
        labels_r, c_img_r, d_level_r = (_twice(common.pick(v, rows)) for v in (labels, c_img, d_level))
        b = rows.stop - rows.start
        with common.autocast(args, device):
            x_both = torch.cat([x0[rows], x_g[rows]])  # (2b, *shape): real first, then generated
            sigma = sigma_d[:, rows].flatten()  # (2b,)
            x_d = x_both + common.column(sigma, x_both) * eps_d[:, rows].flatten(0, 1)
            with torch.no_grad():
                feats = teacher_features(teacher_net, x_d, sigma, labels_r)  # frozen F, no gradient
            # the real halves become leaves that require grad, so R1 can differentiate the logits w.r.t. them
            feats_real = [f[:b].detach().requires_grad_(True) for f in feats]
            feats_both = [torch.cat([r, f[b:]]) for r, f in zip(feats_real, feats)]
            logits = nets.disc_t(feats_both, labels_r, c_img_r, d_level_r)  # list of (2b, N_k)
            real_logits, fake_logits = [l[:b] for l in logits], [l[b:] for l in logits]
            # L_D = E[sum_k max(0, 1 - D_k(F_k(x0))) + max(0, 1 + D_k(F_k(x_g)))]
            loss_d_r = hinge_d_loss(real_logits, fake_logits).mean()
            loss = loss_d_r
            if args.r1_weight > 0:
                # + gamma/2 E[R1],  R1 = ||grad_F D(F(x0))||^2,  D = sum_k mean_locations D_k (the hinge's scalar)
                r1_r = r1_penalty(real_logits, feats_real).mean()
                loss = loss + args.r1_weight / 2 * r1_r
                r1 = r1 + share * r1_r.detach()
        opt_d.backward(loss * share)  # into the heads (R1's part through the second derivative)
        loss_d = loss_d + share * loss_d_r.detach()
        # mean logits D(F) on real and generated samples: how far apart the discriminator holds them
        logit_real = logit_real + share * _per_sample(real_logits).mean().detach()
        logit_fake = logit_fake + share * _per_sample(fake_logits).mean().detach()
    opt_d.step()
    out["loss_d"], out["logit_real"], out["logit_fake"] = loss_d, logit_real, logit_fake
    if args.r1_weight > 0:
        out["r1"] = r1
    return out


# ================================================================================================================
# ARGUMENTS
# ================================================================================================================

METHOD = "add"

# Per-dataset defaults of this method (argparse dests; the shared ones are common.DATASET_DEFAULTS):
# toy2d: toy-tuned: 2400 iterations, only the student's lr decayed (assets/results.md#add-toy-defaults)
# synthetic: toy-tuned, discriminator lr 3e-3, so that it finishes on a CPU (assets/results.md#add-synthetic-defaults)
# cifar10: the paper's lr 1e-5 (no official code), untuned; gamma 1 (assets/results.md#adds-r1); EMA, P_mean: EDM's
# imagenet64: as cifar10, over 200k iterations
METHOD_DEFAULTS = {
    "toy2d": dict(iters=2400, batch=128, lr_g=3e-4, lr_d=1e-3, ema=5.0, r1_weight=2e-3, disc_p_mean=-2.0,
                  disc_dim=64, img_cond=False, eval_every=600, lr_decay="cosine", disc_lr_decay=False),
    "synthetic": dict(iters=300, batch=32, lr_g=5e-5, lr_d=3e-3, ema=0.5, r1_weight=1.0, disc_p_mean=-2.5,
                      disc_dim=32, img_cond=True, eval_every=150, disc_lr_decay=True),
    "cifar10": dict(iters=100000, batch=256, lr_g=1e-5, lr_d=1e-5, ema=500.0, r1_weight=1.0, disc_p_mean=-1.2,
                    disc_dim=128, img_cond=True, disc_lr_decay=True),
    "imagenet64": dict(iters=200000, batch=256, lr_g=1e-5, lr_d=1e-5, ema=500.0, r1_weight=1.0, disc_p_mean=-1.2,
                       disc_dim=128, img_cond=True, disc_lr_decay=True),
}


def parse_args(argv=None):
    p = common.base_parser("ADD: adversarial diffusion distillation of an EDM teacher into a 1-4 step student.",
                           method=METHOD)
    g = p.add_argument_group("add")
    g.add_argument("--lr-g", type=float, default=None, help="student (generator) Adam learning rate (betas 0, 0.99)")
    g.add_argument("--lr-d", type=float, default=None, help="discriminator heads' Adam learning rate (betas 0, 0.99)")
    g.add_argument("--ema", type=float, default=None, help="student EMA half-life in kimg (0.05 ramp-up; 0: none)")
    g.add_argument("--steps", type=int, default=1, choices=(1, 2, 3, 4),
                   help="sampling steps of the student used in evaluation (training covers all four levels)")
    g.add_argument("--distill-weight", type=float, default=2.5,
                   help="lambda in L = L_adv + lambda L_distill (paper 2.5; 0: adversarial loss only)")
    g.add_argument("--adv-weight", type=float, default=1.0,
                   help="weight of the adversarial loss (paper 1; 0: distillation only, no discriminator)")
    g.add_argument("--weighting", default="exp", choices=("exp", "sds"),
                   help="c(sigma) of the distillation loss: exp = 1/sqrt(1+sigma^2), sds = sigma/(2(1+sigma^2))")
    g.add_argument("--r1-weight", type=float, default=None,
                   help="gamma of the R1 penalty gamma/2 E||grad_F D(F(x0))||^2 on the discriminator heads' inputs "
                        "(0: off)")
    g.add_argument("--disc-p-mean", type=float, default=None,
                   help="mean of ln sigma_d, the noise level of the discriminator's (real and fake) inputs")
    g.add_argument("--disc-p-std", type=float, default=1.0, help="standard deviation of ln sigma_d")
    g.add_argument("--disc-dim", type=int, default=None, help="width of each discriminator head")
    g.add_argument("--img-cond", action=argparse.BooleanOptionalAction, default=None,
                   help="condition the heads on an image embedding of x0 (when sigma_s is below the top level)")
    g.add_argument("--disc-level", action=argparse.BooleanOptionalAction, default=True,
                   help="condition the heads on the student level s (a deviation; see the docstring)")
    g.add_argument("--disc-lr-decay", action=argparse.BooleanOptionalAction, default=None,
                   help="apply --lr-decay to the discriminator heads' lr too; with --no-disc-lr-decay only the "
                        "student's lr decays")
    args = common.parse_args(p, METHOD_DEFAULTS, argv)
    for name in ("distill_weight", "adv_weight", "r1_weight", "ema"):
        if not 0 <= getattr(args, name) < math.inf:  # also rejects NaN
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0 (got {getattr(args, name)})")
    if not args.disc_p_std > 0:
        p.error(f"--disc-p-std must be a positive number (got {args.disc_p_std})")
    if args.distill_weight == 0 and args.adv_weight == 0:
        p.error("--distill-weight 0 with --adv-weight 0 leaves nothing to train")
    if args.disc_dim < 4 or not math.isfinite(args.disc_p_mean):
        p.error("--disc-dim must be >= 4 and --disc-p-mean finite")
    return args


def learning_rates(args, step):
    """The learning rates of iteration `step`, decided here only: --lr-decay for the student, and for the
    discriminator heads unless --no-disc-lr-decay. Returns (lr_g, lr_d)."""
    decay_d = args.lr_decay if args.disc_lr_decay else "none"
    return (common.learning_rate(args.lr_g, step, args.iters, args.lr_decay),
            common.learning_rate(args.lr_d, step, args.iters, decay_d))


# ================================================================================================================
# MAIN
# ================================================================================================================

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    dist, info, run, teacher, teacher_net = common.start_method(args)
    device = dist.device

    # The method's networks and optimizers: the student G (a copy of the teacher) and the discriminator heads.
    nets = build_networks(args, info, teacher_net, device)
    common.init_generator(args, nets.generator, nets.ema)  # --init-generator: a saved generator instead
    opt_g = common.AmpOptimizer(common.adam(nets.generator.parameters(), device, lr=args.lr_g,
                                            betas=(0.0, 0.99)), args, device)
    opt_d = common.AmpOptimizer(common.adam(nets.disc.parameters(), device, lr=args.lr_d,
                                            betas=(0.0, 0.99)), args, device)
    # R1's double backward fails under torch.compile ("aot_autograd does not currently support double backward"),
    # so the (small) heads get DDP only, never --compile.
    nets.generator_t, nets.disc_t = common.wrap(nets.generator, args, dist), common.wrap(nets.disc, args, dist,
                                                                                           compile=False)
    trained = {"generator": nets.generator, "disc": nets.disc}
    objects = {**trained, "ema": nets.ema, "opt_g": opt_g, "opt_d": opt_d}  # what a checkpoint holds
    batches = common.real_batches(args, info, dist)  # ADD trains on real images (the student's inputs)

    def sampler(steps=None):  # the EMA student's samples
        return common.student_sampler(nets.ema, student_sigmas(args, steps), args, device)

    teacher_t = common.frozen(teacher, args)  # its passes in an iteration, compiled with --compile
    if args.bench:  # time iterations and samplers, print one JSON line, write nothing
        return common.bench(args, info, dist, lambda step: train_iteration(args, info, dist, teacher_t, nets, opt_g,
                            opt_d, step, batches), sampler(), teacher, teacher_net, trained, nets.ema,
                            student_nfe=len(student_sigmas(args)))
    start = run.resume(objects)
    if args.export:  # --resume --export N: the EMA generator's samples as files (common.export_samples), no training
        return common.export_samples(args, nets.ema, common.generator_meta(args, info, student_sigmas(args)), dist)
    # The teacher's 35-NFE samples from the evaluation latents: reference metrics and the left half of every picture.
    teacher_metrics, x_teacher, nfe = common.teacher_reference(args, info, teacher, run)
    common.describe(dist, METHOD, trained, student_sigmas(args), args.iters)

    def evaluate(done, steps=args.steps):
        return common.evaluate(args, info, sampler(steps), dist, run=run, step=done, tag=f"{METHOD}-{steps}step",
                               reference=x_teacher)[0]

    with common.Bookkeeping(args, run, objects, evaluate, start, desc=METHOD, optimizers=[opt_g, opt_d]) as book:
        for step in range(start, args.iters):
            lr_g, lr_d = learning_rates(args, step)
            opt_g.set_lr(lr_g)
            opt_d.set_lr(lr_d)
            losses = train_iteration(args, info, dist, teacher_t, nets, opt_g, opt_d, step, batches)
            common.ema_update(nets.ema, nets.generator, args.ema, args.batch, nimg=(step + 1) * args.batch,
                              rampup_ratio=0.05)  # --ema 0: a plain copy of the generator
            book.end_iteration(step, losses)  # log, evaluate, checkpoint, SIGINT / SIGTERM, --max-skips

    common.save_generator(args, info, run, nets.ema, student_sigmas(args))
    result = {"teacher": teacher_metrics, "student": book.metrics, "teacher_nfe": nfe,
              "student_nfe": len(student_sigmas(args)), "params": unet.count_params(nets.generator),
              "wall_s": round(time.time() - t0, 1)}
    # ADD only: the same student sampled with 1..4 steps (training does not depend on --steps)
    result["steps"] = {args.steps: book.metrics}
    for steps in range(1, len(STUDENT_T) + 1):
        if steps != args.steps:
            result["steps"][steps] = evaluate(None, steps)
            if result["steps"][steps]:
                run.log({"iter": args.iters, **{f"eval_{steps}step/{k}": v for k, v in result["steps"][steps].items()}})
    result["steps"] = dict(sorted(result["steps"].items()))
    if dist.is_main:
        for steps, m in result["steps"].items():
            if m:
                print(f"{METHOD} {steps}-step: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
        print(f"{METHOD}: done in {result['wall_s']} s; generator saved to {run.dir / 'generator.pt'}")
    return result


if __name__ == "__main__":
    common.run_main(main)
