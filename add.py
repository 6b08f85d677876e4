"""Adversarial Diffusion Distillation (ADD; Sauer, Lorenz, Blattmann, Rombach; 2023;
arXiv:2311.17042), the method behind SDXL-Turbo. There is no official training code.

Idea. The student G_theta starts as a copy of the teacher D_phi and learns to turn a noisy *real*
image into a clean one in a single network evaluation. Its input is x_s = x0 + sigma_s eps, sigma_s
one of four student noise levels, the top one pure noise (so that sampling can start from noise).
Two losses act on its output x_g:
  * adversarial: a discriminator (a frozen feature network F and small trainable heads D_k on
    several of its layers, hinge loss, R1) tells x_g from real images: sharp samples, on the data;
  * distillation: re-noise x_g to a teacher level sigma_t, take the teacher's x0-prediction there
    as a stop-gradient target and pull x_g to it: score distillation (identity 8 below).
        L_G = L_adv^G(x_g) + lambda L_distill(x_g),   lambda = 2.5.
The student samples in 1 to 4 steps: denoise pure noise, re-noise to the next level, denoise.

Paper -> code (EDM form x_t = x0 + sigma eps, README.md "The maths, checked")
  Sec 3.1  T_student = {1000, 750, 500, 250}, zero terminal SNR  -> STUDENT_T, student_levels
           x_s = alpha_s x0 + sigma_s eps from a real x0        -> train_iteration (the input)
  Sec 3.2  frozen feature network F, trainable heads D_k         -> teacher_features, Head
           projection on text (here: class) and on c_img(x0)    -> Head.forward, image_embedding
           L_adv^G = -E[sum_k D_k(F_k(x_g))]                     -> hinge_g_loss
           L_D = E[sum_k max(0, 1 - D_k(F_k(x0))) + max(0, 1 + D_k(F_k(x_g)))] + R1 on F_k(x0)
                                                                 -> hinge_d_loss, r1_penalty
  Sec 3.3  L_distill = c(t) d(x_g, sg(D_phi(x_g + sigma_t eps'))) -> add_distill_loss, loss_sigma
           c(t) = alpha_t ("exponential") or SDS's weighting     -> distill_weighting, --weighting
  Eq 1     L = L_adv^G + lambda L_distill, lambda = 2.5           -> --distill-weight, student_loss
  Fig 2    1-4 step sampling: denoise, re-noise, denoise         -> student_sigmas, common.generate

Noise levels. SDXL is a discrete VP model, "scaled linear": sqrt(beta_t) linear from sqrt(8.5e-4)
to sqrt(1.2e-2) over t = 1..1000, abar_t = prod_{i<=t} (1 - beta_i); t has the EDM level
sigma(t) = sqrt((1 - abar_t) / abar_t) (vp_sigmas):
      t        1000          750      500      250
      sigma    14.61 -> 80   4.082    1.613    0.6932
The top level is pure noise: x_s = 80 eps, no x0 in it, the sampler's start sigma_max z. The
teacher's level is t ~ U{1..1000} of the same schedule, sigma_t in [0.03, 14.6] (loss_sigma).

Identity 8 (the weightings). With x_t = x_g + sigma eps', eps_phi = (x_t - D_phi(x_t)) / sigma:
x_g - D_phi(x_t) = sigma (eps_phi - eps'), hence
    grad_theta c ||x_g - sg(D_phi(x_t))||^2 = 2 c sigma (eps_phi - eps') dx_g/dtheta,
the SDS gradient (DreamFusion) with weight w = 2 c sigma.
  --weighting exp   c = alpha = 1 / sqrt(1 + sigma^2)   (the paper's "exponential")
  --weighting sds   c = sigma / (2 (1 + sigma^2)): SDS with w = 1 - abar = sigma^2 / (1 + sigma^2)

Deliberate deviations (an offline, small, pixel-space version; StyleGAN-T's code: autonomousvision/
stylegan-t)
  - F is the frozen teacher's encoder, not DINOv2 ViT-S (as LADD), on inputs noised to sigma_d,
    ln sigma_d ~ N(--disc-p-mean, --disc-p-std^2): no download, trained on this data, no bias
    shared with FID's ImageNet features (Kynkaanniemi et al. 2023). toy2d: the MLP's hidden states.
  - c_img: the teacher's lowest-res map of x0 at sigma_min, averaged; off on toy2d
    (assets/results.md#add-on-toy2d). The heads also see the level s (--disc-level).
  - L_distill is a per-pixel mean; add_distill_loss sums, as identity 8 needs.
  - Hinge: a sum of per-head means; StyleGAN-T takes one mean over all heads' logits
    (training/loss.py:98,104; networks/discriminator.py:171).
  - R1 = gamma/2 E||grad_F D(F(x0))||^2, D = sum_k mean_locations D_k, every iteration: per head
    1/N_k^2 of R1 on the summed logits (assets/results.md#adds-r1).
  - --adv-weight 0: distillation only; --distill-weight 0: adversarial only.
  - Adam(0, 0.99) for both; cifar10 / imagenet64: the paper's lr 1e-5, untuned, gamma 1.
  - scaled_dot_product_attention for EDM's AttentionOp (edm networks.py:113): ~4e-7 relative.
  - toy2d: 2400 iterations, only the student's lr decayed (assets/results.md#add-toy-defaults);
    synthetic: the heads' lr 3e-3 (assets/results.md#add-synthetic-defaults).

Pitfalls
  - R1 differentiates w.r.t. the heads' inputs, not their parameters (a public reimplementation
    got this wrong); its double backward fails under torch.compile: the heads get DDP only.
  - A c_img the heads can match exactly (as in 2-D) pulls the student to the blurry E[x0 | x_s].

Shared pieces (common.py / unet.py): start_method, real_batches, minimize, generate,
student_sampler, ema_update, Bookkeeping, evaluate (FID), save_generator, export_samples, bench;
EDMDenoiser.features.

Commands
    python add.py                                            # toy2d on the CPU, a few minutes
    python add.py --distill-weight 0 --out-dir runs/toy2d-add-adv   # adversarial loss only
    python add.py --dataset synthetic --resolution 16        # small conditional images, CPU
    python add.py --dataset cifar10 --data-dir data          # one GPU
    torchrun --nproc_per_node=8 add.py --dataset imagenet64 --data-dir data/imagenet64
"""

import argparse
import copy
import math
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import unet

# ==================================================================================================
# LOSSES (pure functions of tensors; test_toy.py checks them against closed forms)
# ==================================================================================================

def distill_weighting(sigma, weighting="exp"):
    """c(sigma) of the distillation loss. exp: alpha = 1 / sqrt(1 + sigma^2) (the VP alpha of an EDM
    sigma). sds: sigma / (2 (1 + sigma^2)), by identity 8 (w = 2 c sigma) SDS's w = 1 - abar."""
    if weighting == "exp":
        return 1 / (1 + sigma ** 2).sqrt()
    if weighting == "sds":
        return sigma / (2 * (1 + sigma ** 2))
    raise ValueError(f"unknown weighting {weighting!r} (exp or sds)")


def add_distill_loss(x_g, target, sigma, weighting="exp"):
    """ADD's distillation loss per sample (B,), summed over pixels: c(sigma) ||x_g - sg(target)||^2,
    target = D_phi(x_g + sigma eps'; sigma), the teacher's x0-prediction; sigma a float or (B,)."""
    sigma = torch.as_tensor(sigma, dtype=x_g.dtype, device=x_g.device).expand(x_g.shape[0])
    # c(sigma) ||x_g - sg(D_phi(x_t))||^2; its gradient is 2 c sigma (eps_phi - eps') dx_g/dtheta
    sq = (x_g - target.detach()).pow(2).flatten(1).sum(1)  # (B,)
    return distill_weighting(sigma, weighting) * sq


def _at_least_fp32(x):
    """bf16 / fp16 tensors (under autocast) to float32 for the loss sums; float32 / 64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _per_sample(logits):
    """The heads' logits, a list of (B, N_k) -> (B,): each head's mean over locations, summed."""
    return sum(_at_least_fp32(l).reshape(l.shape[0], -1).mean(1) for l in logits)


def hinge_d_loss(real_logits, fake_logits):
    """The discriminator's hinge loss per sample (B,), the heads' logits given as lists:
        L_D = sum_k mean_locations [max(0, 1 - D_k(real)) + max(0, 1 + D_k(fake))]."""
    # max(0, 1 - D(x0)) + max(0, 1 + D(x_g))
    return _per_sample([F.relu(1 - r) for r in real_logits]) + _per_sample([F.relu(1 + f)
                                                                            for f in fake_logits])


def hinge_g_loss(fake_logits):
    """The generator's hinge loss per sample (B,): L_adv^G = -sum_k mean_locations D_k(fake)."""
    return -_per_sample(fake_logits)


def r1_penalty(real_logits, features):
    """R1 per sample (B,): ||grad_F D(F)||^2 of D(F) = sum_k mean_locations D_k(F_k), the scalar
    hinge_d_loss sees, w.r.t. each head's *input* F_k (a list that requires grad; the samples are
    independent: the batch sum's gradient is each sample's own). create_graph: its gradient reaches
    the heads' parameters through the second derivative (what makes them smooth)."""
    d = _per_sample(real_logits)  # (B,): D(F(x0))
    grads = torch.autograd.grad(d.sum(), features, create_graph=True)
    # R1 = sum_k ||dD / dF_k||^2
    return sum(_at_least_fp32(g).pow(2).flatten(1).sum(1) for g in grads)  # (B,)


# ==================================================================================================
# NOISE LEVELS
# ==================================================================================================

STUDENT_T = (1000, 750, 500, 250)  # the paper's student timesteps (1-based, of 1000)


def vp_sigmas(beta_start=0.00085, beta_end=0.012, T=1000):
    """EDM sigma of every timestep t = 1..T of SDXL's "scaled linear" VP schedule (sqrt(beta)
    linear): sigma(t) = sqrt((1 - abar_t) / abar_t), abar_t = prod_{i<=t} (1 - beta_i). (T,) F64."""
    beta = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - beta, 0)
    return ((1 - abar) / abar).sqrt()


def student_levels():
    """The four student levels, high to low: sigma(t) for t in STUDENT_T, the top one set to
    sigma_max = 80 (pure noise, zero terminal SNR): float64 [80, 4.082, 1.613, 0.6932]."""
    s = vp_sigmas()[[t - 1 for t in STUDENT_T]]
    s[0] = common.SIGMA_MAX
    return s


def sampling_levels(steps, num_levels=len(STUDENT_T)):
    """Indices into student_levels() visited by a `steps`-step sampler, evenly spaced from the top:
    1 -> [0], 2 -> [0, 2], 3 -> [0, 1, 3], 4 -> [0, 1, 2, 3]."""
    return [int(round(i * num_levels / steps)) for i in range(steps)]


def student_sigmas(args, steps=None):
    """The input noise levels of the `steps`-step sampler (default --steps) for common.generate: the
    visited student levels. 1 step: [80]; 2: [80, 1.613]; 4: [80, 4.082, 1.613, 0.6932]."""
    levels = student_levels()
    return [float(levels[k]) for k in sampling_levels(args.steps if steps is None else steps)]


def loss_sigma(n, args, device):
    """n noise levels of the distillation loss (n,) float32: the teacher's level t ~ U{1..1000} of
    the same VP schedule, sigma_t = sigma(t) in [0.029, 14.6]."""
    table = common.constant(vp_sigmas, device)  # (1000,)
    return table[torch.randint(len(table), (n,), device=device)]


def disc_sigma(n, args, device):
    """n noise levels (n,) of the heads' inputs: ln sigma_d ~ N(--disc-p-mean, --disc-p-std^2)."""
    return (torch.randn(n, device=device) * args.disc_p_std + args.disc_p_mean).exp()


# ==================================================================================================
# NETWORKS (the student is a copy of the teacher's EDMDenoiser; the discriminator heads are new)
# ==================================================================================================

def teacher_features(feature_net, x, sigma, labels=None):
    """F, the frozen feature network: the teacher's encoder maps at x and sigma, the lowest
    resolution last (the toy MLP: its hidden states), by EDMDenoiser.features. Gradients reach x."""
    return common.unwrap(feature_net).features(x, sigma, labels)


@torch.no_grad()
def image_embedding(feature_net, x0, labels=None):
    """c_img (B, C): the frozen teacher's lowest-resolution feature map of the clean x0 (sigma =
    0.002), averaged over its locations."""
    h = teacher_features(feature_net, x0, common.SIGMA_MIN, labels)[-1]
    return h.float().flatten(2).mean(2) if h.ndim == 4 else h.float()


class Head(nn.Module):
    """A discriminator head D_k on feature level F_k: a small body h = body(F_k) (conv 3x3 ->
    GroupNorm -> SiLU -> conv 3x3 -> SiLU for maps; the MLP equivalent for vectors), then
    per-location logits with projection conditioning:
        D_k = out(h) + <h, embed(c) + W c_img + embed(s)> / sqrt(dim)."""

    def __init__(self, channels, dim, spatial, num_classes=0, img_dim=0, num_levels=0):
        super().__init__()
        self.dim, self.spatial = dim, spatial
        if spatial:
            self.body = nn.Sequential(nn.Conv2d(channels, dim, 3, padding=1),
                                      nn.GroupNorm(min(32, dim // 4), dim), nn.SiLU(),
                                      nn.Conv2d(dim, dim, 3, padding=1), nn.SiLU())
            self.out = nn.Conv2d(dim, 1, 1)
        else:
            self.body = nn.Sequential(nn.Linear(channels, dim), nn.LayerNorm(dim), nn.SiLU(),
                                      nn.Linear(dim, dim), nn.SiLU())
            self.out = nn.Linear(dim, 1)
        self.label_embed = nn.Embedding(num_classes, dim) if num_classes else None
        # no bias: a zeroed c_img (a student input without signal) then adds exactly nothing
        self.img_embed = nn.Linear(img_dim, dim, bias=False) if img_dim else None
        self.level_embed = nn.Embedding(num_levels, dim) if num_levels else None

    def forward(self, feat, labels=None, c_img=None, level=None):  # -> (B, H*W) or (B, 1)
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
    forward(features, labels, c_img, level) -> per-location logits (B, N_k), one per head."""

    def __init__(self, feature_channels, dim, spatial, num_classes=0, img_dim=0, num_levels=0):
        super().__init__()
        self.heads = nn.ModuleList([Head(c, dim, spatial, num_classes, img_dim, num_levels)
                                    for c in feature_channels])

    def forward(self, features, labels=None, c_img=None, level=None):
        return [head(f, labels, c_img, level) for head, f in zip(self.heads, features)]


def build_discriminator(args, info, teacher_net):
    """Heads sized to the teacher's feature levels, conditioned as the flags say."""
    channels = list(common.unwrap(teacher_net).net.feature_channels)
    return Discriminator(channels, args.disc_dim, spatial=len(info.shape) == 3,
                         num_classes=info.label_dim, img_dim=channels[-1] if args.img_cond else 0,
                         num_levels=len(STUDENT_T) if args.disc_level else 0)


def build_networks(args, info, teacher_net, device):
    """generator (theta, the student) and ema (the student that is evaluated and saved): copies of
    the teacher's network without dropout (SDXL has none); disc: the discriminator heads;
    feature_net: the frozen teacher network whose encoder is F."""
    def copy_of_teacher():
        return common.set_dropout(copy.deepcopy(teacher_net), 0.0).to(device)

    return SimpleNamespace(generator=copy_of_teacher(), ema=copy_of_teacher(),
                           disc=build_discriminator(args, info, teacher_net).to(device),
                           feature_net=teacher_net)


# ==================================================================================================
# ONE TRAINING ITERATION
# ==================================================================================================

def train_iteration(args, info, dist, teacher, nets, opt_g, opt_d, batches):
    """An ADD iteration on one real batch: a student update on L_adv^G + lambda L_distill, then an
    update of the discriminator heads on the hinge loss + gamma/2 R1. Each draws its noise for this
    rank's batch; common.minimize then steps on its per-sample loss (zero_grad, backward, step),
    handing it the network it trains first. Returns the losses to log."""
    device, pixels = dist.device, math.prod(info.shape)  # L_distill is a per-pixel mean
    x0, labels = next(batches)  # (B, *shape) real data in [-1, 1]
    labels, B, adv = labels if info.cond else None, len(x0), args.adv_weight > 0

    # ---- the student's input: a real x0 noised to a level s ~ U{0..3}, the top one pure noise ----
    level = torch.randint(len(STUDENT_T), (B,), device=device)  # (B,)
    sigma_s = common.constant(student_levels, device)[level]  # (B,)
    signal = (level > 0).float()  # 0 at the top level: zero terminal SNR, no x0 in the input
    # x_s = x0 + sigma_s eps  (x_s = sigma_max eps at the top level)
    x_s = common.column(signal, x0) * x0 + common.column(sigma_s, x0) * torch.randn_like(x0)
    c_img = None if not (adv and args.img_cond) else \
        image_embedding(nets.feature_net, x0, labels) * signal[:, None]  # of x0, where seen in x_s
    cond = dict(labels=labels, c_img=c_img, level=level if args.disc_level else None)

    # ---- 1. Student G: adversarial + distillation loss; teacher, F and heads frozen ----
    samples = []  # the student's x_g, kept for the heads' update
    def student_loss(generator, x_s, sigma_s, labels, c_img, level, sigma_d=None, eps_d=None,
                     sigma_t=None, eps_t=None):  # one round's rows
        x_g = generator(x_s, sigma_s, labels)  # (b, *shape), carries the gradient to theta
        samples.append(x_g.detach())
        loss = {"loss_g": 0.0}
        if adv:  # L_adv^G = -sum_k D_k(F_k(x_g + sigma_d eps)), through the frozen F and heads
            x_d = x_g + common.column(sigma_d, x_g) * eps_d
            features = teacher_features(nets.feature_net, x_d, sigma_d, labels)
            loss["loss_adv"] = hinge_g_loss(nets.disc(features, labels, c_img, level))
        if sigma_t is not None:  # L_distill = c(sigma_t) ||x_g - sg(D_phi(x_t))||^2, per pixel
            x_t = x_g.detach() + common.column(sigma_t, x_g) * eps_t  # x_t = x_g + sigma_t eps'
            with torch.no_grad():
                target = teacher(x_t, sigma_t, labels)  # D_phi(x_t)
            loss["loss_distill"] = add_distill_loss(x_g, target, sigma_t, args.weighting) / pixels
        # L_G = L_adv^G + lambda L_distill
        loss["loss_g"] = (args.adv_weight * loss.get("loss_adv", 0.0)
                          + args.distill_weight * loss.get("loss_distill", 0.0))
        return loss

    # the heads' sigma_d and eps; the teacher's t ~ U{1..1000} (sigma_t in [0.029, 14.6]) and eps'
    draws = dict(x_s=x_s, sigma_s=sigma_s, **cond)
    if adv:
        draws |= dict(sigma_d=disc_sigma(B, args, device), eps_d=torch.randn_like(x0))
    if args.distill_weight > 0:
        draws |= dict(sigma_t=loss_sigma(B, args, device), eps_t=torch.randn_like(x0))
    logs = common.minimize(opt_g, student_loss, **draws)
    if not adv:
        return logs

    # ---- 2. Heads: hinge loss on noised real x0 against noised x_g, + gamma/2 R1 ----
    def heads_loss(disc, x0, x_g, labels, c_img, level, sigma_d, eps_d):  # one round's rows
        twice = lambda v: None if v is None else torch.cat([v, v])  # for the real and fake halves
        x_d, sigma_d = torch.cat([x0, x_g]), sigma_d.T.flatten()  # (2b, *shape), real first
        x_d = x_d + common.column(sigma_d, x_d) * eps_d.transpose(0, 1).flatten(0, 1)
        with torch.no_grad():
            features = teacher_features(nets.feature_net, x_d, sigma_d, twice(labels))
        b = len(x0)  # the real halves become leaves that require grad: R1 differentiates by them
        real = [f[:b].detach().requires_grad_(True) for f in features]
        logits = disc([torch.cat([r, f[b:]]) for r, f in zip(real, features)], twice(labels),
                      twice(c_img), twice(level))  # a (2b, N_k) per head
        logits_real, logits_fake = [l[:b] for l in logits], [l[b:] for l in logits]
        # L_D = sum_k max(0, 1 - D_k(F_k(x0))) + max(0, 1 + D_k(F_k(x_g)))
        loss = {"loss_heads": 0.0, "loss_d": hinge_d_loss(logits_real, logits_fake)}
        if args.r1_weight > 0:  # R1 = ||grad_F D(F(x0))||^2, D = sum_k mean_locations D_k
            loss["r1"] = r1_penalty(logits_real, real)
        loss["loss_heads"] = loss["loss_d"] + args.r1_weight / 2 * loss.get("r1", 0.0)
        # the mean logits D(F) of real and generated samples: how far apart the heads hold them
        loss["logit_real"], loss["logit_fake"] = _per_sample(logits_real), _per_sample(logits_fake)
        return loss

    sigma_d = disc_sigma(2 * B, args, device).view(2, B).T  # (B, 2): real, generated
    eps_d = torch.randn(2, *x0.shape, device=device).transpose(0, 1)
    return logs | common.minimize(opt_d, heads_loss, x0=x0, x_g=torch.cat(samples), **cond,
                                  sigma_d=sigma_d, eps_d=eps_d)


# ==================================================================================================
# ARGUMENTS
# ==================================================================================================

METHOD = "add"

# Per-dataset defaults of this method (argparse dests; the shared ones are common.DATASET_DEFAULTS):
# toy2d: 2400 iterations, only the student's lr decayed (assets/results.md#add-toy-defaults);
# synthetic: the heads' lr 3e-3, a run that finishes on a CPU (results.md#add-synthetic-defaults);
# cifar10: the paper's lr 1e-5 (no official code), untuned; gamma 1 (assets/results.md#adds-r1);
# imagenet64: as cifar10, over 200k iterations.
METHOD_DEFAULTS = {
    "toy2d": dict(iters=2400, batch=128, lr_g=3e-4, lr_d=1e-3, ema=5.0, r1_weight=2e-3,
                  disc_p_mean=-2.0, disc_dim=64, img_cond=False, eval_every=600, lr_decay="cosine",
                  disc_lr_decay=False),
    "synthetic": dict(iters=300, batch=32, lr_g=5e-5, lr_d=3e-3, ema=0.5, r1_weight=1.0,
                      disc_p_mean=-2.5, disc_dim=32, img_cond=True, eval_every=150,
                      disc_lr_decay=True),
    "cifar10": dict(iters=100000, batch=256, lr_g=1e-5, lr_d=1e-5, ema=500.0, r1_weight=1.0,
                    disc_p_mean=-1.2, disc_dim=128, img_cond=True, disc_lr_decay=True),
    "imagenet64": dict(iters=200000, batch=256, lr_g=1e-5, lr_d=1e-5, ema=500.0, r1_weight=1.0,
                       disc_p_mean=-1.2, disc_dim=128, img_cond=True, disc_lr_decay=True),
}


def parse_args(argv=None):
    p = common.base_parser("ADD: adversarial diffusion distillation of an EDM teacher into a 1-4 "
                           "step student.", method=METHOD)
    g = p.add_argument_group("add")
    g.add_argument("--lr-g", type=common.POSITIVE, default=None,
                   help="student (generator) Adam learning rate (betas 0, 0.99)")
    g.add_argument("--lr-d", type=common.POSITIVE, default=None,
                   help="discriminator heads' Adam learning rate (betas 0, 0.99)")
    g.add_argument("--ema", type=common.NONNEGATIVE, default=None,
                   help="student EMA half-life in kimg (0.05 ramp-up; 0: none)")
    g.add_argument("--steps", type=int, default=1, choices=(1, 2, 3, 4),
                   help="sampling steps of the student when evaluated (training covers all 4)")
    g.add_argument("--distill-weight", type=common.NONNEGATIVE, default=2.5,
                   help="lambda in L = L_adv + lambda L_distill (paper 2.5; 0: adversarial only)")
    g.add_argument("--adv-weight", type=common.NONNEGATIVE, default=1.0,
                   help="weight of the adversarial loss (paper 1; 0: distillation only, no heads)")
    g.add_argument("--weighting", default="exp", choices=("exp", "sds"),
                   help="c(sigma) of the distillation loss: exp = 1/sqrt(1+sigma^2), "
                        "sds = sigma/(2(1+sigma^2))")
    g.add_argument("--r1-weight", type=common.NONNEGATIVE, default=None,
                   help="gamma of the R1 penalty gamma/2 E||grad_F D(F(x0))||^2 on the heads' "
                        "inputs (0: off)")
    g.add_argument("--disc-p-mean", type=common.FINITE, default=None,
                   help="mean of ln sigma_d, the noise level of the discriminator's inputs")
    g.add_argument("--disc-p-std", type=common.POSITIVE, default=1.0,
                   help="standard deviation of ln sigma_d")
    g.add_argument("--disc-dim", default=None, help="width of each discriminator head",
                   type=common.checked(int, lambda v: v >= 4, ">= 4", 4096, "a width"))
    g.add_argument("--img-cond", action=argparse.BooleanOptionalAction, default=None,
                   help="condition the heads on an image embedding of x0 (below the top level)")
    g.add_argument("--disc-level", action=argparse.BooleanOptionalAction, default=True,
                   help="condition the heads on the student level s (a deviation; the docstring)")
    g.add_argument("--disc-lr-decay", action=argparse.BooleanOptionalAction, default=None,
                   help="apply --lr-decay to the heads' lr too; with --no-disc-lr-decay only the "
                        "student's lr decays")
    args = common.parse_args(p, METHOD_DEFAULTS, argv)
    if args.distill_weight == 0 and args.adv_weight == 0:
        p.error("--distill-weight 0 with --adv-weight 0 leaves nothing to train")
    return args


def learning_rates(args, step):
    """The learning rates of iteration `step`, decided here only: --lr-decay for the student, and
    for the discriminator heads unless --no-disc-lr-decay. Returns (lr_g, lr_d)."""
    decay_d = args.lr_decay if args.disc_lr_decay else "none"
    return (common.learning_rate(args.lr_g, step, args.iters, args.lr_decay),
            common.learning_rate(args.lr_d, step, args.iters, decay_d))


# ==================================================================================================
# MAIN
# ==================================================================================================

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    dist, info, run, teacher, teacher_net = common.start_method(args)
    device = dist.device

    # The method's networks and optimizers: the student G (a copy of the teacher) and the heads.
    nets = build_networks(args, info, teacher_net, device)
    common.init_generator(args, nets.generator, nets.ema)  # --init-generator: a saved generator
    opt_g = common.optimizer([nets.generator], args, dist, lr=args.lr_g, betas=(0.0, 0.99))
    # R1's double backward fails under torch.compile: the (small) heads get DDP only
    opt_d = common.optimizer([nets.disc], args, dist, compile=False, lr=args.lr_d,
                             betas=(0.0, 0.99))
    trained = {"generator": nets.generator, "disc": nets.disc}
    objects = {**trained, "ema": nets.ema, "opt_g": opt_g, "opt_d": opt_d}  # a checkpoint's content
    teacher = common.frozen(teacher, args)  # compiled with --compile
    batches = common.real_batches(args, info, dist)  # ADD trains on real images (the inputs)

    def sampler(steps=None):  # the EMA student's samples
        return common.student_sampler(nets.ema, student_sigmas(args, steps), args, device)

    if args.bench:  # time iterations and samplers, print one JSON line, write nothing
        iteration = lambda step: train_iteration(args, info, dist, teacher, nets, opt_g, opt_d,
                                                 batches)
        return common.bench(args, info, dist, iteration, sampler(), teacher, teacher_net, trained,
                            nets.ema, student_nfe=len(student_sigmas(args)))
    start = run.resume(objects)
    if args.export:  # --resume --export N: the EMA student's samples as files
        meta = common.generator_meta(args, info, student_sigmas(args))
        return common.export_samples(args, nets.ema, meta, dist)
    # The teacher's 35-NFE samples from the evaluation latents: metrics, the pictures' left half.
    teacher_metrics, x_teacher, nfe = common.teacher_reference(args, info, teacher, run)
    common.describe(dist, METHOD, trained, student_sigmas(args), args.iters)

    def evaluate(done, steps=args.steps):
        return common.evaluate(args, info, sampler(steps), dist, run=run, step=done,
                               tag=f"{METHOD}-{steps}step", reference=x_teacher)[0]

    with common.Bookkeeping(args, run, objects, evaluate, start, desc=METHOD,
                            optimizers=[opt_g, opt_d]) as book:
        for step in range(start, args.iters):
            lr_g, lr_d = learning_rates(args, step)
            opt_g.set_lr(lr_g)
            opt_d.set_lr(lr_d)
            losses = train_iteration(args, info, dist, teacher, nets, opt_g, opt_d, batches)
            common.ema_update(nets.ema, nets.generator, args.ema, args.batch,
                              nimg=(step + 1) * args.batch, rampup_ratio=0.05)  # --ema 0: a copy
            book.end_iteration(step, losses)  # log, evaluate, checkpoint, signals, --max-skips

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
                run.log({"iter": args.iters,
                         **{f"eval_{steps}step/{k}": v for k, v in result["steps"][steps].items()}})
    result["steps"] = dict(sorted(result["steps"].items()))
    if dist.is_main:
        for steps, m in result["steps"].items():
            if m:
                print(f"{METHOD} {steps}-step: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
        print(f"{METHOD}: done in {result['wall_s']} s; generator in {run.dir / 'generator.pt'}")
    return result


if __name__ == "__main__":
    common.run_main(main)
