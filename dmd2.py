"""DMD2: Improved Distribution Matching Distillation for Fast Image Synthesis (Yin et al., NeurIPS
2024; arXiv:2405.14867; code: tianweiy/DMD2, main/edm/ for ImageNet-64).

Idea. A generator G_theta, a copy of the teacher, maps noise to images in one step (or a few).
Distribution Matching Distillation moves every sample x_g down the gradient of KL(p_fake,sigma ||
p_real,sigma), the KL between the noised generator and data distributions. At x_t = x_g + sigma eps
that gradient is a difference of two scores (identity 7, README.md "The maths, checked"):
    grad_theta KL = E[(s_fake - s_real)(x_t) dx_t/dtheta],   s = (D - x_t) / sigma^2:
the teacher D_phi gives the real score; a fake score D_psi, trained online with EDM's loss on
detached generator samples, the fake one. The authors' code replaces 1/sigma^2 by 1/w, w =
sg(mean |x_g - D_phi(x_t)|), and feeds g = (D_psi(x_t) - D_phi(x_t)) / w to autograd as
L = 0.5 ||x_g - sg(x_g - g)||^2, so dL/dx_g = g. DMD2 drops DMD's regression loss: a two time-scale
update rule (several fake-score updates per generator update) keeps D_psi current; a GAN whose
classifier is a small head on D_psi's encoder, trained on noised real and generated images, lets the
student beat its teacher; multi-step students train on their own inputs ("backward simulation").

Paper -> code
    DMD gradient g, per sample divided by mean |x_g - D_phi(x_t)|  -> dmd_loss, --loss-weight
    its sigma: index ~ U{20..980} (--dmd-range), 1000-point grid   -> loss_sigma
    fake score: EDM-weighted loss on detached samples, i ~ U{0..999} -> fake_loss, --fake-sigma
    TTUR: 5 fake-score (+ classifier) updates per G update          -> --fake-updates
    GAN classifier on D_psi's encoder, real and fake noised         -> Classifier, fake_loss
    L_D = softplus(-D(real)) + softplus(D(fake)), L_G = softplus(-D(fake)) -> gan_d_loss, gan_g_loss
    GAN weights 3e-3 (generator side), 1e-2 (fake-score side)       -> --gan-weight-g / -f
    G(80 z; 80); a K-step generator at fixed input noise levels     -> student_sigmas
    backward simulation: step k trained on its own k-step input     -> backward_simulation
    AdamW(0.9, 0.999, wd 0.01), warm-up, grad-norm clip 10, no EMA  -> main, learning_rates
    networks without dropout (main/edm/edm_network.py:11)           -> build_networks

Deliberate deviations (tianweiy/DMD2, main/edm/ unless the path says otherwise)
    - --iters counts G updates; the authors' step, fake updates (train_edm.py:235): 200k = 40k.
    - The fake updates run first, then G's; the authors' step starts with G's (train_edm.py:235).
    - Every fake update draws fresh samples; the authors' reuse G's batch (train_edm.py:274).
    - --warmup counts fake updates; the authors' scheduler steps once per GPU (train_edm.py:110).
    - The GAN head's 2nd conv has kernel = stride = S/2, GroupNorm min(32, C/4): any S reaches 1x1
      (edm_guidance.py:47-56).
    - Multi-step sigmas: sigma_init, then Karras at u = (K-1)/(K+1), ... (SDXL's 999/749/...).
    - --fake-samples final: D_psi learns the K-step outputs; the authors' SDXL code, each step's.
    - A NaN DMD gradient is not zeroed (nan_to_num, edm_guidance.py:108): the step is skipped.
    - AMP: bf16 autocast; the authors' network is fp16 (experiments/imagenet/*scratch.sh:20).
    - --ema: an optional EMA of the generator (default 0, a plain copy; the paper has none).
    - scaled_dot_product_attention for EDM's AttentionOp (edm networks.py:113): ~4e-7 relative.
    - toy2d: MLP head, sigma_init 2.5 (1 step), only G's lr decays, no warm-up
      (assets/results.md#dmd2-toy-defaults).

Pitfalls
    - G(80 z) starts as D(80 z; 80), the data mean for every z: the samples take tens of iterations
      to spread; then mode weights oscillate (D_psi lags G), more so with a larger --lr-g.
    - fp16 can diverge (the paper trains in bf16); bf16 autocast is the default on CUDA.

Shared pieces (common.py / unet.py): start_method, real_batches (the GAN's data), edm_loss,
fake_sigma, grid_sigma, generate, minimize, ema_update, Bookkeeping, evaluate (FID),
student_sampler, save_generator, export_samples, bench; EDMDenoiser.features (the encoder's maps).

Commands
    python dmd2.py                                           # toy2d on the CPU, a few minutes
    python dmd2.py --gan-weight 0 --out-dir runs/toy2d-dmd2-ttur   # TTUR only: no GAN, no data
    python dmd2.py --steps 2 --out-dir runs/toy2d-dmd2-2step # a two-step student
    python dmd2.py --dataset cifar10 --data-dir data         # one GPU
    torchrun --nproc_per_node=8 dmd2.py --dataset imagenet64 --data-dir data/imagenet64
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

def dmd_loss(x_g, d_real, d_fake, weight=None):
    """Distribution matching loss per sample (B,), summed over pixels, with gradient w.r.t. x_g
    exactly g = (D_fake(x_t) - D_real(x_t)) / w. w: the authors' sg(mean_CHW |x_g - D_real(x_t)|),
    or the given (B,) weight (sigma^2: g = s_fake - s_real, the gradient of KL(p_fake,sigma ||
    p_real,sigma)). w = 0 gives g = 0; a NaN stays (the authors zero it): the step is skipped."""
    with torch.no_grad():
        if weight is None:
            weight = (x_g - d_real).abs().flatten(1).mean(1)  # w = mean_CHW |x_g - D_real|, (B,)
        w = common.column(weight, x_g)
        g = torch.where(w == 0, 0.0, (d_fake - d_real) / w)  # g = (D_fake - D_real) / w
    # L = 0.5 ||x_g - sg(x_g - g)||^2, so dL/dx_g = g
    return 0.5 * ((x_g - (x_g - g).detach()) ** 2).flatten(1).sum(1)


def gan_d_loss(real_logits, fake_logits):
    """The classifier's non-saturating logistic loss per sample: L_D = softplus(-D(x_real,t)) +
    softplus(D(x_fake,t)), minimised over all functions by D*(x) = log p_real,t - log p_fake,t."""
    return F.softplus(-real_logits) + F.softplus(fake_logits)


def gan_g_loss(fake_logits):
    """The generator's non-saturating GAN loss per sample: L_G = softplus(-D(x_fake,t))."""
    return F.softplus(-fake_logits)


# ==================================================================================================
# NOISE LEVELS
# ==================================================================================================

# The DMD gradient's noise levels: indices [0.02, 0.98] of the 1000-point Karras grid (common.GRID;
# sigma ~0.003 .. ~72), the authors'.
DMD_MIN_INDEX, DMD_MAX_INDEX = 20, 980


def student_sigmas(args, steps=None):
    """The K = --steps input noise levels of the student for common.generate: sigma_init, then
    the Karras grid at u = (K-1)/(K+1), ..., 1/(K+1). K=2: [80, 0.47]; K=3: [80, 2.52, 0.17]."""
    steps = args.steps if steps is None else steps
    u = torch.arange(steps - 1, 0, -1, dtype=torch.float64) / (steps + 1)
    return [float(args.sigma_init)] + common.karras_sigma(u).tolist()


def loss_sigma(n, args, device):
    """n noise levels of the DMD gradient (n,): index i ~ U{LO..HI} of --dmd-range on the 1000-point
    Karras grid, sigma = karras_sigma(i / 999) (the authors' 20..980: ~0.003 .. ~72)."""
    return common.grid_sigma(n, device, *args.dmd_range)


@torch.no_grad()
def backward_simulation(generator, z, labels, sigmas):
    """A K-step student's training inputs (x_in, sigma_in): per sample k ~ U{0..K-1}, its own
    input at step k, from k steps without gradient: x_0 = sigma_0 z, x_j+1 = G(x_j; sigma_j) +
    sigma_j+1 eps."""
    x = x_in = sigmas[0] * z
    sigma_in = torch.full((len(z),), float(sigmas[0]), device=z.device)  # (B,)
    k = torch.randint(len(sigmas), (len(z),), device=z.device) if len(sigmas) > 1 else None
    for j in range(1, len(sigmas)):  # all K - 1 steps: stopping at max(k) would read k on the host
        x = generator(x, sigmas[j - 1], labels) + sigmas[j] * torch.randn_like(x)
        x_in = torch.where((k == j).view(-1, *[1] * (x.ndim - 1)), x, x_in)  # x_in[k == j]: a sync
        sigma_in = torch.where(k == j, sigmas[j], sigma_in)
    return x_in, sigma_in


# ==================================================================================================
# NETWORKS (the generator and the fake score are copies of the teacher's EDMDenoiser; the GAN
# classifier is new)
# ==================================================================================================

class Classifier(nn.Module):
    """The GAN classifier head on the fake score's encoder output (the last of its feature maps,
    before the decoder: the authors' `return_bottleneck`) -> one logit per sample. Images
    (B, C, S, S), as the authors' ImageNet head (main/edm/edm_guidance.py:47-56, S = 8, C = 768):
        conv 4x4 stride 2 (S -> S/2) -> GroupNorm -> SiLU -> conv (S/2)x(S/2) stride S/2 (-> 1)
        -> GroupNorm -> SiLU -> conv 1x1 -> logit;
    at S = 8 the second conv is the authors' 4x4 stride 4. toy2d (B, hidden): Linear -> SiLU ->
    Linear. The label reaches the logit through the conditional fake network (no projection)."""

    def __init__(self, channels, spatial=None):
        super().__init__()
        if spatial is None:  # toy2d: a hidden-state vector
            layers = [nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1)]
        else:
            if spatial < 2 or spatial % 2:
                raise ValueError(f"the GAN head needs an even map side >= 2 (got {spatial})")
            groups = min(32, channels // 4)  # the authors' 32 groups from 128 channels up
            layers = [nn.Conv2d(channels, channels, 4, stride=2, padding=1),  # (B, C, S/2, S/2)
                      nn.GroupNorm(groups, channels), nn.SiLU(),
                      nn.Conv2d(channels, channels, spatial // 2, stride=spatial // 2),  # 1x1
                      nn.GroupNorm(groups, channels), nn.SiLU(),
                      nn.Conv2d(channels, 1, 1), nn.Flatten()]  # (B, 1)
        self.layers = nn.Sequential(*layers)

    def forward(self, features):  # (B, C, S, S) or (B, C) -> (B,)
        return self.layers(features.float())[:, 0]


def build_classifier(fake, info):
    """A Classifier sized to the fake network's encoder output (the last of its feature maps)."""
    net = common.unwrap(fake).net
    spatial = None
    if len(info.shape) == 3:  # the UNet halves the resolution once per level after the first
        spatial = info.shape[1] // 2 ** (len(net.feature_channels) - 1)
    return Classifier(net.feature_channels[-1], spatial)


def build_networks(args, info, teacher_net, device):
    """generator (theta), fake (psi) and ema (the generator that is evaluated and saved): copies
    of the teacher's network without dropout, as the authors'; head: the GAN classifier on psi's
    encoder output (None with --gan-weight 0)."""
    def copy_of_teacher():
        return common.set_dropout(copy.deepcopy(teacher_net), 0.0).to(device)

    fake = copy_of_teacher()
    head = build_classifier(fake, info).to(device) if args.gan_weight > 0 else None
    return SimpleNamespace(generator=copy_of_teacher(), fake=fake, ema=copy_of_teacher(), head=head)


# ==================================================================================================
# ONE TRAINING ITERATION
# ==================================================================================================

def train_iteration(args, info, dist, teacher, nets, opt_g, opt_f, batches, lr_f):
    """The two time-scale update rule: an update of the fake score D_psi (and of the GAN classifier)
    per rate in lr_f (--fake-updates), then a generator update. Each draws its noise for this rank's
    batch; common.minimize steps on its per-sample loss, handing it the networks it trains first.
    `batches`: the GAN's real data. Returns the losses, the fake side's the mean of its updates."""
    B, device, pixels = args.batch // dist.world, dist.device, math.prod(info.shape)
    sigmas, gan = student_sigmas(args), nets.head is not None
    gan_f, gan_g = args.gan_weight * args.gan_weight_f, args.gan_weight * args.gan_weight_g

    # ---- 1. Fake score psi (+ classifier): EDM loss on samples, GAN loss on real / fake ----
    def fake_loss(fake, head=None, *, x_g, labels, sigma, eps, x0=None, labels_real=None,
                  sigma_d=None, eps_d=None):  # one round's rows; losses per pixel, as the authors'
        # lambda(sigma) ||D_psi(x_g + sigma eps; sigma) - x_g||^2
        loss = {"loss_f": 0.0, "loss_fake": common.edm_loss(fake, x_g, labels, sigma, eps) / pixels}
        if head is not None:  # diffusion GAN: real and generated, both noised: x + sigma_d eps
            x_d, sigma_d = torch.cat([x0, x_g]), sigma_d.T.flatten()  # (2b, *shape), (2b,)
            x_d = x_d + common.column(sigma_d, x_d) * eps_d.transpose(0, 1).flatten(0, 1)
            both = None if labels is None else torch.cat([labels_real, labels])
            # the classifier on D_psi's encoder output (the authors' return_bottleneck): (2, b)
            logits = head(common.unwrap(fake).features(x_d, sigma_d, both)[-1]).view(2, -1)
            loss["loss_d"] = gan_d_loss(logits[0], logits[1])  # L_D = sp(-D(real)) + sp(D(fake))
            loss["p_real"], loss["p_fake"] = logits[0].sigmoid(), logits[1].sigmoid()
        loss["loss_f"] = loss["loss_fake"] + gan_f * loss.get("loss_d", 0.0)
        return loss

    logs = {}
    for lr in lr_f:  # TTUR: --fake-updates updates of psi, each at its (warm-up) rate
        z = torch.randn(B, *info.shape, device=device)
        labels = common.sample_labels(info, B, device)
        with torch.no_grad(), common.autocast(args, device):  # --fake-samples: the K-step outputs
            if args.fake_samples == "final":
                x_g = common.generate(nets.generator, z, labels, sigmas)
            else:  # the steps' outputs, as the generator is trained on (the authors')
                x_in, sigma_in = backward_simulation(nets.generator, z, labels, sigmas)
                x_g = nets.generator(x_in, sigma_in, labels)
        # sigma per --fake-sigma (the authors': the whole grid); the GAN's real data, sigma_d, eps
        draws = dict(x_g=x_g, labels=labels, sigma=common.fake_sigma(B, args, device, loss_sigma),
                     eps=torch.randn_like(x_g))
        if gan:
            x0, labels_real = next(batches)  # real data: the only place DMD2 uses it
            draws |= dict(x0=x0, labels_real=labels_real if info.cond else None,
                          sigma_d=common.grid_sigma(2 * B, device).view(2, B).T,  # (B, 2)
                          eps_d=torch.randn(2, B, *info.shape, device=device).transpose(0, 1))
        opt_f.set_lr(lr)
        for k, v in common.minimize(opt_f, fake_loss, **draws).items():
            logs[k] = logs.get(k, 0.0) + v / len(lr_f)  # the mean over the fake updates

    # ---- 2. Generator G: the DMD gradient (+ GAN); teacher, fake score and classifier frozen ----
    def generator_loss(generator, x_in, sigma_in, labels, sigma, eps, sigma_adv=None, eps_adv=None):
        x_g = generator(x_in, sigma_in, labels)  # (b, *shape), carries the gradient to theta
        x_t = x_g + common.column(sigma, x_g) * eps
        with torch.no_grad():  # D_phi(x_t), D_psi(x_t)
            d_real, d_fake = teacher(x_t, sigma, labels), nets.fake(x_t, sigma, labels)
        weight = sigma ** 2 if args.loss_weight == "sigma2" else None  # None: mean |x_g - D_phi|
        # dL/dx_g = g = (D_psi(x_t) - D_phi(x_t)) / w, per pixel
        loss = {"loss_g": 0.0, "loss_dmd": dmd_loss(x_g, d_real, d_fake, weight) / pixels}
        if gan:  # L_G = softplus(-D(x_fake,t)), through the frozen classifier on D_psi's encoder
            x_t = x_g + common.column(sigma_adv, x_g) * eps_adv
            loss["loss_adv"] = gan_g_loss(nets.head(nets.fake.features(x_t, sigma_adv, labels)[-1]))
        loss["loss_g"] = loss["loss_dmd"] + gan_g * loss.get("loss_adv", 0.0)
        return loss

    z, labels = torch.randn(B, *info.shape, device=device), common.sample_labels(info, B, device)
    with torch.no_grad(), common.autocast(args, device):
        x_in, sigma_in = backward_simulation(nets.generator, z, labels, sigmas)  # step k's input
    # x_t = x_g + sigma eps, sigma = grid[i], i ~ U{20..980} (--dmd-range); the GAN's on the grid
    draws = dict(x_in=x_in, sigma_in=sigma_in, labels=labels, sigma=loss_sigma(B, args, device),
                 eps=torch.randn(B, *info.shape, device=device))
    if gan:
        draws |= dict(sigma_adv=common.grid_sigma(B, device),
                      eps_adv=torch.randn(B, *info.shape, device=device))
    return logs | common.minimize(opt_g, generator_loss, **draws)


# ==================================================================================================
# ARGUMENTS
# ==================================================================================================

METHOD = "dmd2"

# Per-dataset defaults of this method (argparse dests; the shared ones are common.DATASET_DEFAULTS):
# toy2d: lr_g 1.2e-3 decayed, the fake score's lr kept, no warm-up (results.md#dmd2-toy-defaults);
# synthetic: lrs, no warm-up, a short run that finishes on a CPU (results.md#synthetic-16x16);
# cifar10: the authors' ImageNet-64 settings: lr 2e-6, warm-up 500, no EMA (200k steps = 40k here);
# imagenet64: the same, batch 280 = 7 GPUs x 40 (experiments/imagenet/imagenet_gan_*scratch.sh:5).
METHOD_DEFAULTS = {
    "toy2d": dict(iters=400, batch=256, lr_g=1.2e-3, lr_f=2e-3, ema=0.0, warmup=0, eval_every=100,
                  lr_decay="cosine", fake_lr_decay=False),
    "synthetic": dict(iters=50, batch=32, lr_g=1e-4, lr_f=2e-4, ema=0.0, warmup=0, eval_every=25,
                      fake_lr_decay=True),
    "cifar10": dict(iters=40000, batch=256, lr_g=2e-6, lr_f=2e-6, ema=0.0, warmup=500,
                    fake_lr_decay=True),
    "imagenet64": dict(iters=40000, batch=280, lr_g=2e-6, lr_f=2e-6, ema=0.0, warmup=500,
                       fake_lr_decay=True),
}

# The 1-step toy2d student's input noise level: G(z) = D_G(2.5 z; 2.5), as SiD's, not the authors'
# 80 (assets/results.md#dmd2-toy-defaults).
TOY_SIGMA_INIT = 2.5


def parse_args(argv=None):
    p = common.base_parser("DMD2: Improved Distribution Matching Distillation (arXiv:2405.14867)",
                           method=METHOD)
    g = p.add_argument_group("dmd2")
    g.add_argument("--lr-g", type=common.POSITIVE, default=None,
                   help="generator AdamW learning rate (paper 2e-6)")
    g.add_argument("--lr-f", type=common.POSITIVE, default=None,
                   help="fake score + GAN classifier AdamW learning rate (paper 2e-6)")
    g.add_argument("--ema", type=common.NONNEGATIVE, default=None,
                   help="half-life in kimg of the generator EMA that is evaluated and saved, "
                        "capped at 5%% of the images seen so far (0: no EMA, as the paper)")
    g.add_argument("--sigma-init", default=None, type=common.checked(
                   float, lambda v: common.SIGMA_MIN < v <= 1000, f"in ({common.SIGMA_MIN}, 1000]"),
                   help="noise level of the generator's input sigma_init * z (first step); "
                        "default 80 (the authors'), except 2.5 for a 1-step toy2d student")
    g.add_argument("--steps", type=int, default=1, choices=(1, 2, 3, 4),
                   help="sampling steps of the student, trained with backward simulation")
    g.add_argument("--fake-updates", default=5,
                   type=common.checked(int, lambda v: v > 0, "positive", 1000, "a rate for each"),
                   help="two time-scale update rule: fake score / classifier updates per generator "
                        "update")
    g.add_argument("--fake-samples", default="final", choices=("final", "steps"),
                   help="with --steps > 1, what the fake score learns: 'final' the K-step "
                        "sampler's outputs; 'steps' the outputs of the steps the generator is "
                        "trained on (the authors'; a mixture, which on toy2d can split the modes)")
    g.add_argument("--gan-weight", type=common.NONNEGATIVE, default=1.0,
                   help="scale of both GAN weights; 0: no GAN (no classifier, no real data)")
    g.add_argument("--gan-weight-g", type=common.NONNEGATIVE, default=3e-3,
                   help="weight of the generator's non-saturating GAN loss (paper 3e-3)")
    g.add_argument("--gan-weight-f", type=common.NONNEGATIVE, default=1e-2,
                   help="weight of the classifier's GAN loss on the fake score side (paper 1e-2)")
    g.add_argument("--warmup", type=common.COUNT0, default=None,
                   help="linear learning-rate warm-up of both optimisers from 0, counted in "
                        "fake-score updates (the authors' steps): fake update n runs at lr_f "
                        "min(1, n / warmup), the generator update after it at lr_g min(1, "
                        "n / warmup)")
    g.add_argument("--dmd-range", type=common.COUNT0, nargs=2, metavar=("LO", "HI"),
                   default=[DMD_MIN_INDEX, DMD_MAX_INDEX],
                   help="index range of the DMD gradient's noise level on the 1000-point Karras "
                        "grid (the authors' [0.02, 0.98] x 1000; 500 -> sigma ~2.5, 800 -> ~24)")
    g.add_argument("--loss-weight", default="mean-abs", choices=("mean-abs", "sigma2"),
                   help="the DMD gradient's per-sample divisor w: the authors' sg(mean |x_g - "
                        "D_phi|), or sigma^2 (then g = s_fake - s_real, the exact KL gradient)")
    g.add_argument("--fake-lr-decay", action=argparse.BooleanOptionalAction, default=None,
                   help="apply --lr-decay to the fake score's (and classifier's) lr too; with "
                        "--no-fake-lr-decay only the generator's lr decays")
    common.add_fake_sigma_flag(g, default="grid")
    g.add_argument("--grad-clip", type=common.NONNEGATIVE, default=10.0,
                   help="gradient norm clipping of both optimisers (0: none)")
    args = common.parse_args(p, METHOD_DEFAULTS, argv)
    if args.sigma_init is None:
        one_step_toy = args.dataset == "toy2d" and args.steps == 1
        args.sigma_init = TOY_SIGMA_INIT if one_step_toy else common.SIGMA_MAX
    if not args.dmd_range[0] <= args.dmd_range[1] <= common.GRID - 1:
        p.error(f"--dmd-range needs 0 <= LO <= HI <= {common.GRID - 1} (got {args.dmd_range})")
    return args


def learning_rates(args, step):
    """The learning rates of iteration `step`, decided here only: the authors' linear warm-up
    from 0, counted in fake-score updates (fake update n = 0, 1, ... runs at lr_f min(1, n /
    warmup), the generator update after fake update n at lr_g min(1, n / warmup)), times
    --lr-decay's factor (the fake score's unless --no-fake-lr-decay). Returns (lr_g, lr_f), lr_f a
    list: one rate per fake update."""
    K, decay_f = args.fake_updates, args.lr_decay if args.fake_lr_decay else "none"
    lr_g = common.learning_rate(args.lr_g, step, args.iters, args.lr_decay, args.warmup,
                                (step + 1) * K)
    lr_f = [common.learning_rate(args.lr_f, step, args.iters, decay_f, args.warmup, step * K + j)
            for j in range(K)]
    return lr_g, lr_f


# ==================================================================================================
# MAIN
# ==================================================================================================

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    dist, info, run, teacher, teacher_net = common.start_method(args)
    device = dist.device

    # The method's networks and optimizers: G and D_psi (copies of the teacher) and the GAN head.
    nets = build_networks(args, info, teacher_net, device)
    common.init_generator(args, nets.generator, nets.ema)  # --init-generator: a saved generator
    gan = nets.head is not None
    # AdamW(0.9, 0.999, weight decay 0.01), gradient norm clipped at --grad-clip: the paper's
    adamw = dict(adamw=True, betas=(0.9, 0.999), weight_decay=0.01, clip=args.grad_clip)
    opt_g = common.optimizer([nets.generator], args, dist, lr=args.lr_g, **adamw)
    opt_f = common.optimizer([nets.fake] + [nets.head] * gan, args, dist, lr=args.lr_f, **adamw)
    trained = {"generator": nets.generator, "fake": nets.fake}
    if gan:
        trained["head"] = nets.head
    objects = {**trained, "ema": nets.ema, "opt_g": opt_g, "opt_f": opt_f}  # a checkpoint's content
    teacher = common.frozen(teacher, args)  # compiled with --compile
    batches = common.real_batches(args, info, dist) if gan else None  # real data: the GAN's only

    def sampler(steps=None):  # the EMA generator's samples
        return common.student_sampler(nets.ema, student_sigmas(args, steps), args, device)

    if args.bench:  # time iterations and samplers, print one JSON line, write nothing
        iteration = lambda step: train_iteration(args, info, dist, teacher, nets, opt_g, opt_f,
                                                 batches, learning_rates(args, step)[1])
        return common.bench(args, info, dist, iteration, sampler(), teacher, teacher_net, trained,
                            nets.ema, student_nfe=len(student_sigmas(args)))
    start = run.resume(objects)
    if args.export:  # --resume --export N: the EMA generator's samples as files
        meta = common.generator_meta(args, info, student_sigmas(args))
        return common.export_samples(args, nets.ema, meta, dist)
    # The teacher's 35-NFE samples from the evaluation latents: metrics, the pictures' left half.
    teacher_metrics, x_teacher, nfe = common.teacher_reference(args, info, teacher, run)
    common.describe(dist, METHOD, trained, student_sigmas(args), args.iters)

    def evaluate(done):
        return common.evaluate(args, info, sampler(), dist, run=run, step=done, tag=METHOD,
                               reference=x_teacher)[0]

    with common.Bookkeeping(args, run, objects, evaluate, start, desc=METHOD,
                            optimizers=[opt_g, opt_f]) as book:
        for step in range(start, args.iters):
            lr_g, lr_f = learning_rates(args, step)  # lr_f: one rate per fake-score update
            opt_g.set_lr(lr_g)
            losses = train_iteration(args, info, dist, teacher, nets, opt_g, opt_f, batches, lr_f)
            common.ema_update(nets.ema, nets.generator, args.ema, args.batch,
                              nimg=(step + 1) * args.batch, rampup_ratio=0.05)  # --ema 0: a copy
            book.end_iteration(step, losses)  # log, evaluate, checkpoint, signals, --max-skips

    common.save_generator(args, info, run, nets.ema, student_sigmas(args))
    result = {"teacher": teacher_metrics, "student": book.metrics, "teacher_nfe": nfe,
              "student_nfe": len(student_sigmas(args)), "params": unet.count_params(nets.generator),
              "wall_s": round(time.time() - t0, 1)}
    if dist.is_main:
        print(f"{METHOD}: done in {result['wall_s']} s; generator in {run.dir / 'generator.pt'}")
    return result


if __name__ == "__main__":
    common.run_main(main)
