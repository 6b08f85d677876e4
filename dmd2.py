"""DMD2: Improved Distribution Matching Distillation for Fast Image Synthesis (Yin, Gharbi, Park, Zhang, Shechtman,
Durand, Freeman; NeurIPS 2024; arXiv:2405.14867; code: tianweiy/DMD2, main/edm/ for ImageNet-64).

Idea. A generator G_theta, a copy of the teacher, maps noise to images in one step (or a few). Distribution Matching
Distillation moves every sample x_g down the gradient of KL(p_fake,sigma || p_real,sigma), the KL between the noised
generator and data distributions. At x_t = x_g + sigma eps that gradient is a difference of two scores (identity 7,
README.md "The maths, checked"):
    grad_theta KL = E[(s_fake - s_real)(x_t) dx_t/dtheta],   s_fake - s_real = (D_psi(x_t) - D_phi(x_t)) / sigma^2:
the teacher D_phi gives the real score; a fake score D_psi, trained online with the EDM loss on detached generator
samples, gives the fake one. The authors' code replaces 1/sigma^2 by 1/w, w = stopgrad(mean |x_g - D_phi(x_t)|),
and feeds g = (D_psi(x_t) - D_phi(x_t)) / w to autograd as L = 0.5 ||x_g - stopgrad(x_g - g)||^2, so dL/dx_g = g.
DMD2 drops DMD's regression loss (and its dataset of teacher noise-image pairs): a two time-scale update rule
(several fake-score updates per generator update) keeps D_psi current; a GAN whose classifier is a small head on
D_psi's bottleneck, trained on noised real and generated images, lets the student beat its teacher; multi-step
generators are trained on their own intermediate outputs ("backward simulation").

Paper -> code
    DMD gradient g, per-sample normalised by mean |x_g - D_phi(x_t)|           -> dmd_loss, --loss-weight
    its sigma: index ~ U{20..980} (--dmd-range) of the 1000-point Karras grid  -> loss_sigma(n, args, device)
    fake score: EDM-weighted loss on detached samples, index ~ U{0..999}       -> train_iteration step 1, --fake-sigma
      (--fake-sigma grid, the authors'; lognormal: EDM's ln sigma ~ N(-1.2, 1.2^2); loss: loss_sigma)
    TTUR: 5 fake-score (+ classifier) updates per generator update             -> --fake-updates, train_iteration
    GAN classifier on D_psi's encoder output, real and fake noised on the grid -> Classifier, train_iteration step 1
    L_D = softplus(-D(real)) + softplus(D(fake)),  L_G = softplus(-D(fake))    -> gan_d_loss, gan_g_loss
    GAN weights 3e-3 (generator side), 1e-2 (fake-score side)                  -> --gan-weight-g, --gan-weight-f
    G(80 z; 80); a K-step generator with fixed input noise levels              -> student_sigmas, common.generate
    backward simulation: step k trained on the generator's own k-step input    -> backward_simulation
    AdamW(0.9, 0.999, wd 0.01), warm-up, grad-norm clip 10, no EMA             -> main, learning_rates, --grad-clip
    networks without dropout (main/edm/edm_network.py:11)                      -> build_networks
    the loop: for step in range(start, args.iters): learning_rates -> train_iteration -> common.ema_update
              -> book.end_iteration (common.Bookkeeping: log, evaluate, checkpoint, signals, skip-stop)  -> main

Deliberate deviations (tianweiy/DMD2, main/edm/ unless the path says otherwise)
    - --iters counts G updates; the authors' step counts fake updates (train_edm.py:235): their 200k steps = 40k here.
    - The fake updates run first, then G's; the authors' step starts with G's (train_edm.py:235-265, then 267-288).
    - Every fake update draws fresh samples; in a G step the authors' reuse G's pre-update batch (train_edm.py:274).
    - --warmup 500 counts fake updates; the authors' scheduler steps once per GPU, so 500/#GPUs (train_edm.py:110).
    - Losses are averaged over pixels, as the authors' (edm_guidance.py:111,159); dmd_loss returns per-sample sums.
    - GAN head: 2nd conv kernel = stride = S/2, GroupNorm min(32, C/4): 4x4 maps reach 1x1 (edm_guidance.py:47-56).
    - Multi-step sigmas: sigma_init, then Karras at u = (K-1)/(K+1), ..., 1/(K+1): ours, after SDXL's 999/749/499/249.
    - --fake-samples final: D_psi learns the K-step outputs; the authors' SDXL code, the chosen steps' (a mixture).
    - A NaN DMD gradient is not zeroed (the authors' nan_to_num, edm_guidance.py:108): AmpOptimizer skips the step.
    - AMP: bf16 autocast; the authors' network is fp16 (--use_fp16, experiments/imagenet/imagenet_gan_*scratch.sh:20).
    - --ema: an optional EMA of the generator (default 0, a plain copy; the paper uses none).
    - scaled_dot_product_attention for EDM's AttentionOp (NVlabs/edm training/networks.py:113): within ~4e-7 relative.
    - toy2d: MLP head, sigma_init 2.5 (1 step), only G's lr decays, no warm-up (assets/results.md#dmd2-toy-defaults).

Pitfalls
    - G(80 z) starts as the teacher's D(80 z; 80), the data mean for every z: the samples need some tens of
      iterations to spread out. Afterwards mode weights oscillate (D_psi lags G), more so with a larger --lr-g.
    - With --steps 2 the first step may stay collapsed and leave the work to the second; judge the final samples.
    - fp16 can diverge (the paper trains in bf16 for that reason); bf16 autocast is the default on CUDA.

Shared pieces (common.py / unet.py): start_method (processes, data, run folder, teacher), real_batches (the GAN's
data), edm_loss, karras_sigma, generate / student_sampler, AmpOptimizer, ema_update, Bookkeeping, evaluate (FID),
save_generator, export_samples, bench; EDMDenoiser.features (the encoder's feature maps).

Commands
    python dmd2.py                                           # toy2d on CPU, a few minutes
    python dmd2.py --gan-weight 0 --out-dir runs/toy2d-dmd2-ttur   # TTUR only (no GAN, no real data)
    python dmd2.py --steps 2 --out-dir runs/toy2d-dmd2-2step       # two-step generator, backward simulation
    python dmd2.py --dataset cifar10 --data-dir data         # one GPU
    torchrun --nproc_per_node=8 dmd2.py --dataset imagenet64 --data-dir data/imagenet64
    python dmd2.py --dataset imagenet64 --data-dir data/imagenet64 --resume --export 50000 --export-npz samples.npz
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

# ================================================================================================================
# LOSSES (pure functions of tensors; test_toy.py checks them against closed forms)
# ================================================================================================================

def dmd_loss(x_g, d_real, d_fake, weight=None):
    """Distribution matching loss per sample (B,), whose gradient w.r.t. x_g is exactly g:
        g = (D_fake(x_t) - D_real(x_t)) / w,   w = stopgrad(mean_CHW |x_g - D_real(x_t)|)  (weight=None)
        L = 0.5 * || x_g - stopgrad(x_g - g) ||^2   (summed over non-batch dimensions).
    With weight = sigma^2, g = s_fake(x_t) - s_real(x_t), the DMD gradient of KL(p_fake,sigma || p_real,sigma)."""
    with torch.no_grad():
        if weight is None:
            # w = mean_CHW |x_g - D_real|: the data-dependent normalisation of the authors' ImageNet code
            weight = (x_g - d_real).abs().flatten(1).mean(1)  # (B,)
        w = common.column(weight, x_g)
        # g = (D_fake - D_real) / w  (= s_fake - s_real when w = sigma^2); a sample with w = 0 (x_g equal to the
        # teacher's denoising of it) gets g = 0. The authors' code applies nan_to_num to g; here a NaN from either
        # network makes the loss NaN, so AmpOptimizer skips the step and --max-skips stops a run that keeps
        # producing them, instead of training on silently zeroed gradients.
        g = torch.where(w == 0, torch.zeros_like(d_fake), (d_fake - d_real) / w)
        target = x_g - g
    # L = 0.5 ||x_g - stopgrad(x_g - g)||^2, so dL/dx_g = g
    return 0.5 * ((x_g - target) ** 2).flatten(1).sum(1)


def gan_d_loss(real_logits, fake_logits):
    """Classifier's non-saturating logistic loss per sample:
        L_D = softplus(-D(x_real,t)) + softplus(D(x_fake,t)) = -log sigmoid(D(real)) - log(1 - sigmoid(D(fake)));
    its minimiser over all functions is the logit D*(x) = log p_real,t(x) - log p_fake,t(x)."""
    return F.softplus(-real_logits) + F.softplus(fake_logits)


def gan_g_loss(fake_logits):
    """Generator's non-saturating GAN loss per sample: L_G = softplus(-D(x_fake,t)) = -log sigmoid(D(x_fake,t))."""
    return F.softplus(-fake_logits)


# ================================================================================================================
# NOISE LEVELS
# ================================================================================================================

# The index range of the distribution matching gradient's noise level on the 1000-point Karras grid (common.GRID):
# [0.02, 0.98] of the grid (sigma ~0.003 .. ~72), the authors'.
DMD_MIN_INDEX, DMD_MAX_INDEX = 20, 980


def student_sigmas(args, steps=None):
    """The K = --steps input noise levels of the student for common.generate: sigma_init for the first step (pure
    noise), then the Karras grid at u = (K-1)/(K+1), ..., 1/(K+1) for the re-noised inputs. K=2: [80, 0.47];
    K=3: [80, 2.52, 0.17]; K=4: [80, 5.84, 0.97, 0.085]."""
    steps = args.steps if steps is None else steps
    u = torch.arange(steps - 1, 0, -1, dtype=torch.float64) / (steps + 1)
    return [float(args.sigma_init)] + common.karras_sigma(u).tolist()


def loss_sigma(n, args, device):
    """n noise levels of the distribution matching gradient: index i ~ U{LO..HI} of --dmd-range on the 1000-point
    Karras grid, sigma = karras_sigma(i / 999) (the authors' 20..980: sigma ~0.003 .. ~72). (n,)"""
    return common.grid_sigma(n, device, *args.dmd_range)


@torch.no_grad()
def backward_simulation(generator, z, labels, sigmas):
    """Training inputs of a K-step student: per sample k ~ U{0..K-1}, the generator's own input at step k, obtained
    by running it k steps from noise without gradient (x_0 = sigma_0 z, x_{j+1} = G(x_j; sigma_j) + sigma_{j+1} eps).
    Returns (x_in, sigma_in (B,))."""
    B = z.shape[0]
    x = sigmas[0] * z
    x_in, sigma_in = x.clone(), torch.full((B,), float(sigmas[0]), device=z.device)
    if len(sigmas) == 1:
        return x_in, sigma_in
    k = torch.randint(len(sigmas), (B,), device=z.device)
    for j in range(1, len(sigmas)):  # all K - 1 steps: stopping at max(k) would read k on the host (a sync)
        x = generator(x, sigmas[j - 1], labels) + sigmas[j] * torch.randn_like(x)
        pick = k == j  # (B,) the samples whose input is x_j; torch.where, not masked indexing (a sync on CUDA)
        x_in = torch.where(pick.reshape(-1, *([1] * (x.ndim - 1))), x, x_in)
        sigma_in = torch.where(pick, sigmas[j], sigma_in)
    return x_in, sigma_in


# ================================================================================================================
# NETWORKS (the generator and the fake score are copies of the teacher's EDMDenoiser; the GAN classifier is new)
# ================================================================================================================

class Classifier(nn.Module):
    """The GAN classifier head on the fake score network's encoder output (the last entry of its feature list, taken
    before the decoder, as the authors' `return_bottleneck`) -> one logit per sample. Images (B, C, S, S), as the
    authors' ImageNet head (DMD2 main/edm/edm_guidance.py:47-56, S = 8, C = 768):
        conv 4x4 stride 2 (S -> S/2) -> GroupNorm -> SiLU -> conv (S/2)x(S/2) stride S/2 (S/2 -> 1) -> GroupNorm
        -> SiLU -> conv 1x1 -> logit;
    at S = 8 the second conv is the authors' 4x4 stride 4. toy2d (B, hidden): Linear -> SiLU -> Linear. The class
    label reaches the logit through the class-conditional fake network that computes the features, as in the
    authors' code (no projection)."""

    def __init__(self, channels, spatial=None):
        super().__init__()
        if spatial is None:  # toy2d: a hidden-state vector
            layers = [nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1)]
        else:
            if spatial < 2 or spatial % 2:
                raise ValueError(f"the GAN head needs an even feature map side >= 2 (got {spatial})")
            groups = min(32, channels // 4)  # the authors' 32 groups from 128 channels up
            layers = [nn.Conv2d(channels, channels, 4, stride=2, padding=1),  # (B, C, S/2, S/2)
                      nn.GroupNorm(groups, channels), nn.SiLU(),
                      nn.Conv2d(channels, channels, spatial // 2, stride=spatial // 2),  # (B, C, 1, 1)
                      nn.GroupNorm(groups, channels), nn.SiLU(),
                      nn.Conv2d(channels, 1, 1), nn.Flatten()]  # (B, 1)
        self.layers = nn.Sequential(*layers)

    def forward(self, features):  # (B, C, S, S) or (B, C) -> (B,)
        return self.layers(features.float())[:, 0]


def build_classifier(fake, info):
    """A Classifier sized to the fake network's encoder output (the last entry of its feature list)."""
    net = common.unwrap(fake).net
    spatial = None
    if len(info.shape) == 3:  # the UNet halves the resolution once per level after the first
        spatial = info.shape[1] // 2 ** (len(net.feature_channels) - 1)
    return Classifier(net.feature_channels[-1], spatial)


def build_networks(args, info, teacher_net, device):
    """generator (theta), fake (psi) and ema (the generator that is evaluated and saved): copies of the teacher's
    network without dropout, as the authors' networks (dropout=0.0; the teacher keeps its own); head: the GAN
    classifier, a fresh head on psi's encoder output (None with --gan-weight 0)."""
    def copy_of_teacher():
        return common.set_dropout(copy.deepcopy(teacher_net), 0.0).to(device)

    fake = copy_of_teacher().requires_grad_(True)
    return SimpleNamespace(generator=copy_of_teacher().requires_grad_(True), fake=fake,
                           ema=copy_of_teacher().eval().requires_grad_(False),
                           head=build_classifier(fake, info).to(device) if args.gan_weight > 0 else None)


# ================================================================================================================
# ONE TRAINING ITERATION
# ================================================================================================================

def train_iteration(args, info, dist, teacher, nets, opt_g, opt_f, step, batches=None):
    """The two time-scale update rule: --fake-updates updates of the fake score D_psi (and the GAN classifier on its
    encoder output), then one generator update. `nets` holds the networks of build_networks and their (DDP /
    compiled) wrappers generator_t / fake_t / head_t, used where that network's own parameters are trained
    (nets.head is None without the GAN); `batches` yields real data for the GAN (None without it). The learning
    rates were set by main() (learning_rates: one per fake update, for the warm-up). Returns the losses to log."""
    device, batch = dist.device, args.batch // dist.world  # this rank's share of the batch
    shape = (batch, *info.shape)
    pixels = math.prod(info.shape)  # losses are averaged over pixels, as in the authors' code
    sigmas = student_sigmas(args)
    gan = nets.head is not None
    out = {}

    # ---- 1. Fake score psi (+ classifier): EDM loss on detached generator samples, GAN loss on noised real/fake ----
    nets.generator.eval()
    for net in (nets.fake, nets.head) if gan else (nets.fake,):
        common.requires_grad(net, True).train()
    for j in range(args.fake_updates):
        z = torch.randn(shape, device=device)
        labels = common.sample_labels(info, batch, device)  # the generator's labels (None if unconditional)
        with torch.no_grad(), common.autocast(args, device):
            if args.fake_samples == "final":  # the K-step sampler's outputs only
                x_g = common.generate(nets.generator, z, labels, sigmas).float()
            else:  # the outputs of randomly chosen steps, as the generator is trained on (a mixture over steps)
                x_in, sigma_in = backward_simulation(nets.generator, z, labels, sigmas)
                x_g = nets.generator(x_in, sigma_in, labels).float()  # (B, *shape), no gradient
        # this update's draws for the whole batch before its rounds: sigma per --fake-sigma (default: sigma =
        # grid[i], i ~ U{0..999}, the authors'), eps; for the GAN, real data and both halves' sigma and eps
        sigma_f, eps_f = common.fake_sigma(args, batch, device, loss_sigma), torch.randn_like(x_g)
        if gan:
            x0, real_labels = next(batches)  # real data: the only place DMD2 uses it
            # diffusion GAN: real and generated both noised, x + sigma eps with sigma = grid[i], i ~ U{0..999}
            sigma_d = common.grid_sigma(2 * batch, device).view(2, batch)  # (2, B): real, generated
            eps_d = torch.randn((2, *shape), device=device)
        loss_fake, loss_d, logits = 0.0, 0.0, []
        opt_f.zero_grad()
        for rows, share in common.rounds(batch, args.batch_gpu, nets.fake_t, nets.head_t):  # --batch-gpu rows
            labels_r = common.pick(labels, rows)
            with common.autocast(args, device):
                # lambda(sigma) || D_psi(x_g + sigma eps; sigma) - x_g ||^2
                loss = common.edm_loss(nets.fake_t, x_g[rows], labels_r, sigma_f[rows], eps_f[rows]).mean() / pixels
                loss_fake = loss_fake + share * loss.detach()
                if gan:
                    x_both = torch.cat([x0[rows], x_g[rows]])  # (2b, *shape): real first, then generated
                    labels_both = torch.cat([real_labels[rows], labels_r]) if info.cond else None
                    sigma = sigma_d[:, rows].flatten()  # (2b,)
                    x_t = x_both + common.column(sigma, x_both) * eps_d[:, rows].flatten(0, 1)
                    # the encoder of D_psi alone (its decoder plays no part in the GAN), as the authors'
                    # return_bottleneck
                    features = common.unwrap(nets.fake_t).features(x_t, sigma, labels_both)
                    logits_r = nets.head_t(features[-1]).view(2, -1)  # (2, b) from D_psi's encoder output
                    # L_D = softplus(-D(x_real,t)) + softplus(D(x_fake,t))
                    loss_d_r = gan_d_loss(logits_r[0], logits_r[1]).mean()
                    loss = loss + args.gan_weight * args.gan_weight_f * loss_d_r
                    loss_d, logits = loss_d + share * loss_d_r.detach(), logits + [logits_r.detach()]
            opt_f.backward(loss * share)
        opt_f.step()
    out["loss_fake"] = loss_fake
    if gan:
        out["loss_d"] = loss_d
        # the classifier's accuracy-like read-out: mean sigmoid on real and on generated samples
        p = torch.sigmoid(torch.cat(logits, 1)).mean(1)
        out["p_real"], out["p_fake"] = p[0], p[1]

    # ---- 2. Generator G: DMD gradient (+ GAN); teacher, fake and classifier frozen, gradients flow through x_t ----
    for net in (nets.fake, nets.head) if gan else (nets.fake,):
        common.requires_grad(net, False).eval()
    z = torch.randn(shape, device=device)  # fresh latents
    labels = common.sample_labels(info, batch, device)
    with torch.no_grad(), common.autocast(args, device):
        x_in, sigma_in = backward_simulation(nets.generator, z, labels, sigmas)  # step k's input, k ~ U{0..K-1}
    # the whole batch's draws before its rounds: x_t = x_g + sigma eps, sigma = grid[i], i ~ U{LO..HI} of
    # --dmd-range (the authors' 20..980: ~0.003 .. ~72); the GAN's sigma = grid[i], i ~ U{0..999}, and its eps
    sigma, eps = loss_sigma(batch, args, device), torch.randn(shape, device=device)
    if gan:
        sigma_adv, eps_adv = common.grid_sigma(batch, device), torch.randn(shape, device=device)
    nets.generator.train()
    loss_dmd, loss_adv, loss_g = 0.0, 0.0, 0.0
    opt_g.zero_grad()
    for rows, share in common.rounds(batch, args.batch_gpu, nets.generator_t):  # --batch-gpu rows at a time
        labels_r, sigma_r = common.pick(labels, rows), sigma[rows]
        with common.autocast(args, device):
            x_g = nets.generator_t(x_in[rows], sigma_in[rows], labels_r).float()  # (b, *shape), carries grad to theta
            x_t = x_g + common.column(sigma_r, x_g) * eps[rows]
            with torch.no_grad():
                d_real = teacher(x_t, sigma_r, labels_r)  # D_phi(x_t)
                d_fake = common.unwrap(nets.fake)(x_t, sigma_r, labels_r)  # D_psi(x_t)
            # dL/dx_g = g = (D_psi(x_t) - D_phi(x_t)) / mean_CHW |x_g - D_phi(x_t)|
            weight = sigma_r ** 2 if args.loss_weight == "sigma2" else None  # None: the authors' mean |x_g - D_phi|
            loss = dmd_loss(x_g, d_real, d_fake, weight).mean() / pixels
            loss_dmd = loss_dmd + share * loss.detach()
            if gan:
                x_t = x_g + common.column(sigma_adv[rows], x_g) * eps_adv[rows]
                features = common.unwrap(nets.fake).features(x_t, sigma_adv[rows], labels_r)  # psi frozen
                # L_G = softplus(-D(x_fake,t)), the non-saturating generator loss
                loss_adv_r = gan_g_loss(common.unwrap(nets.head)(features[-1])).mean()
                loss = loss + args.gan_weight * args.gan_weight_g * loss_adv_r
                loss_adv = loss_adv + share * loss_adv_r.detach()
        opt_g.backward(loss * share)  # through x_g into theta (the DMD gradient g, and the GAN through the classifier)
        loss_g = loss_g + share * loss.detach()
    opt_g.step()
    out["loss_dmd"] = loss_dmd
    if gan:
        out["loss_adv"] = loss_adv
    out["loss_g"] = loss_g
    return out


# ================================================================================================================
# ARGUMENTS
# ================================================================================================================

METHOD = "dmd2"

# Per-dataset defaults of this method (argparse dests; the shared ones are common.DATASET_DEFAULTS):
# toy2d: toy-tuned: lr_g 1.2e-3 decayed, the fake score's lr kept, no warm-up (assets/results.md#dmd2-toy-defaults)
# synthetic: toy-tuned lrs, no warm-up, a short run so that it finishes on a CPU (assets/results.md#synthetic-16x16)
# cifar10: the authors' ImageNet-64 settings: lr 2e-6, warm-up 500, no EMA; their 200k steps = 40k iterations here
# imagenet64: the same, batch 280 = 7 GPUs x 40 (DMD2 experiments/imagenet/imagenet_gan_*scratch.sh:5-7,10)
METHOD_DEFAULTS = {
    "toy2d": dict(iters=400, batch=256, lr_g=1.2e-3, lr_f=2e-3, ema=0.0, warmup=0, eval_every=100,
                  lr_decay="cosine", fake_lr_decay=False),
    "synthetic": dict(iters=50, batch=32, lr_g=1e-4, lr_f=2e-4, ema=0.0, warmup=0, eval_every=25,
                      fake_lr_decay=True),
    "cifar10": dict(iters=40000, batch=256, lr_g=2e-6, lr_f=2e-6, ema=0.0, warmup=500, fake_lr_decay=True),
    "imagenet64": dict(iters=40000, batch=280, lr_g=2e-6, lr_f=2e-6, ema=0.0, warmup=500, fake_lr_decay=True),
}


# The 1-step toy2d student's input noise level: G(z) = D_G(2.5 z; 2.5), as SiD's, instead of the authors' 80
# (assets/results.md#dmd2-toy-defaults).
TOY_SIGMA_INIT = 2.5


def parse_args(argv=None):
    p = common.base_parser("DMD2: Improved Distribution Matching Distillation (arXiv:2405.14867)", method=METHOD)
    g = p.add_argument_group("dmd2")
    g.add_argument("--lr-g", type=float, default=None,
                   help="generator AdamW learning rate (paper 2e-6)")
    g.add_argument("--lr-f", type=float, default=None,
                   help="fake score + GAN classifier AdamW learning rate (paper 2e-6)")
    g.add_argument("--ema", type=float, default=None,
                   help="half-life in kimg of the generator EMA that is evaluated and saved, capped at 5%% of the "
                        "images seen so far (0: no EMA, as the paper)")
    g.add_argument("--sigma-init", type=float, default=None,
                   help="noise level of the generator's input sigma_init * z (first step); default 80 (the "
                        "authors'), except 2.5 for a 1-step toy2d student (see the module docstring)")
    g.add_argument("--steps", type=int, default=1,
                   help="sampling steps of the student (1 to 4), trained with backward simulation")
    g.add_argument("--fake-updates", type=int, default=5,
                   help="two time-scale update rule: fake score / classifier updates per generator update")
    g.add_argument("--fake-samples", default="final", choices=("final", "steps"),
                   help="with --steps > 1, what the fake score learns: 'final' the K-step sampler's outputs; 'steps' "
                        "the outputs of the randomly chosen steps the generator is trained on (the authors' code; a "
                        "mixture over steps, which toy2d shows can split the modes between steps)")
    g.add_argument("--gan-weight", type=float, default=1.0,
                   help="scale of both GAN weights; 0 turns the GAN off (no classifier, no real data: TTUR-only)")
    g.add_argument("--gan-weight-g", type=float, default=3e-3,
                   help="weight of the generator's non-saturating GAN loss (paper 3e-3)")
    g.add_argument("--gan-weight-f", type=float, default=1e-2,
                   help="weight of the classifier's GAN loss on the fake score side (paper 1e-2)")
    g.add_argument("--warmup", type=int, default=None,
                   help="linear learning-rate warm-up of both optimisers from 0, counted in fake-score updates (the "
                        "authors' steps): the n-th fake update uses lr_f min(1, n / warmup), the generator update "
                        "that follows fake update n uses lr_g min(1, n / warmup)")
    g.add_argument("--dmd-range", type=int, nargs=2, default=[DMD_MIN_INDEX, DMD_MAX_INDEX], metavar=("LO", "HI"),
                   help="index range of the distribution matching gradient's noise level on the 1000-point Karras "
                        "grid (the authors' [0.02, 0.98] x 1000; 500 -> sigma ~2.5, 800 -> ~24)")
    g.add_argument("--loss-weight", default="mean-abs", choices=("mean-abs", "sigma2"),
                   help="the distribution matching gradient's per-sample divisor w: the authors' stopgrad(mean "
                        "|x_g - D_phi(x_t)|), or sigma^2 (then g = s_fake - s_real, the exact gradient of the KL)")
    g.add_argument("--fake-lr-decay", action=argparse.BooleanOptionalAction, default=None,
                   help="apply --lr-decay to the fake score's (and GAN classifier's) lr too; with --no-fake-lr-decay "
                        "only the generator's lr decays and the fake score keeps tracking the slowing generator at "
                        "its full lr")
    common.add_fake_sigma_flag(g, default="grid")
    g.add_argument("--grad-clip", type=float, default=10.0, help="gradient norm clipping of both optimisers")
    args = common.parse_args(p, METHOD_DEFAULTS, argv)
    if args.sigma_init is None:
        args.sigma_init = TOY_SIGMA_INIT if args.dataset == "toy2d" and args.steps == 1 else common.SIGMA_MAX
    if args.fake_updates < 1:
        p.error(f"--fake-updates must be >= 1 (got {args.fake_updates})")
    if not 0 <= args.dmd_range[0] <= args.dmd_range[1] <= common.GRID - 1:
        p.error(f"--dmd-range needs 0 <= LO <= HI <= {common.GRID - 1} (got {args.dmd_range[0]} {args.dmd_range[1]})")
    if not 1 <= args.steps <= 4:
        p.error(f"--steps must be 1, 2, 3 or 4 (got {args.steps})")
    if not common.SIGMA_MIN < args.sigma_init <= 1000:  # also rejects NaN
        p.error(f"--sigma-init must be in ({common.SIGMA_MIN}, 1000] (got {args.sigma_init})")
    for name in ("gan_weight", "gan_weight_g", "gan_weight_f", "ema", "warmup", "grad_clip"):
        if not getattr(args, name) >= 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    return args


def learning_rates(args, step):
    """The learning rates of iteration `step`, decided here only: the authors' linear warm-up from lr 0, counted in
    fake-score updates (the n-th fake update, n = 0, 1, ..., runs at lr_f min(1, n / warmup); the generator update
    that follows fake update n at lr_g min(1, n / warmup)), times --lr-decay's factor (the fake score's unless
    --no-fake-lr-decay). Returns (lr_g, lr_f), lr_f a list: one rate per fake update of this iteration."""
    K = args.fake_updates
    decay_f = args.lr_decay if args.fake_lr_decay else "none"
    lr_g = common.learning_rate(args.lr_g, step, args.iters, args.lr_decay, args.warmup, (step + 1) * K)
    lr_f = [common.learning_rate(args.lr_f, step, args.iters, decay_f, args.warmup, step * K + j) for j in range(K)]
    return lr_g, lr_f


# ================================================================================================================
# MAIN
# ================================================================================================================

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    dist, info, run, teacher, teacher_net = common.start_method(args)
    device = dist.device

    # The method's networks and optimizers: generator G and fake score D_psi (copies of the teacher) + GAN head.
    nets = build_networks(args, info, teacher_net, device)
    common.init_generator(args, nets.generator, nets.ema)  # --init-generator: a saved generator instead
    gan = nets.head is not None

    def adamw(params, lr):
        # AdamW(0.9, 0.999, weight decay 0.01), gradient norm clipped at --grad-clip (10): the paper's settings
        return common.AmpOptimizer(common.adam(params, device, adamw=True, lr=lr, betas=(0.9, 0.999),
                                               weight_decay=0.01), args, device, clip=args.grad_clip)

    opt_g = adamw(nets.generator.parameters(), args.lr_g)
    opt_f = adamw(list(nets.fake.parameters()) + (list(nets.head.parameters()) if gan else []), args.lr_f)
    nets.generator_t, nets.fake_t = common.wrap(nets.generator, args, dist), common.wrap(nets.fake, args, dist)
    nets.head_t = common.wrap(nets.head, args, dist) if gan else None
    trained = {"generator": nets.generator, "fake": nets.fake, **({"head": nets.head} if gan else {})}
    objects = {**trained, "ema": nets.ema, "opt_g": opt_g, "opt_f": opt_f}  # what a checkpoint holds
    batches = common.real_batches(args, info, dist) if gan else None  # real data feeds the GAN only

    def sampler(steps=None):  # the EMA generator's samples
        return common.student_sampler(nets.ema, student_sigmas(args, steps), args, device)

    teacher_t = common.frozen(teacher, args)  # its passes in an iteration, compiled with --compile
    if args.bench:  # time iterations and samplers, print one JSON line, write nothing
        return common.bench(args, info, dist, lambda step: train_iteration(args, info, dist, teacher_t, nets, opt_g,
                            opt_f, step, batches), sampler(), teacher, teacher_net, trained, nets.ema,
                            student_nfe=len(student_sigmas(args)))
    start = run.resume(objects)
    if args.export:  # --resume --export N: the EMA generator's samples as files (common.export_samples), no training
        return common.export_samples(args, nets.ema, common.generator_meta(args, info, student_sigmas(args)), dist)
    # The teacher's 35-NFE samples from the evaluation latents: reference metrics and the left half of every picture.
    teacher_metrics, x_teacher, nfe = common.teacher_reference(args, info, teacher, run)
    common.describe(dist, METHOD, trained, student_sigmas(args), args.iters)

    def evaluate(done):
        return common.evaluate(args, info, sampler(), dist, run=run, step=done, tag=METHOD, reference=x_teacher)[0]

    with common.Bookkeeping(args, run, objects, evaluate, start, desc=METHOD, optimizers=[opt_g, opt_f]) as book:
        for step in range(start, args.iters):
            lr_g, lr_f = learning_rates(args, step)
            opt_g.set_lr(lr_g)
            opt_f.set_lr(lr_f)
            losses = train_iteration(args, info, dist, teacher_t, nets, opt_g, opt_f, step, batches)
            common.ema_update(nets.ema, nets.generator, args.ema, args.batch, nimg=(step + 1) * args.batch,
                              rampup_ratio=0.05)  # --ema 0: a plain copy of the generator
            book.end_iteration(step, losses)  # log, evaluate, checkpoint, SIGINT / SIGTERM, --max-skips

    common.save_generator(args, info, run, nets.ema, student_sigmas(args))
    result = {"teacher": teacher_metrics, "student": book.metrics, "teacher_nfe": nfe,
              "student_nfe": len(student_sigmas(args)), "params": unet.count_params(nets.generator),
              "wall_s": round(time.time() - t0, 1)}
    if dist.is_main:
        print(f"{METHOD}: done in {result['wall_s']} s; generator saved to {run.dir / 'generator.pt'}")
    return result


if __name__ == "__main__":
    common.run_main(main)
