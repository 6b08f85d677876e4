"""DMD2: Improved Distribution Matching Distillation for Fast Image Synthesis (Yin et al., NeurIPS 2024,
arXiv:2405.14867), in one file.

Idea. A generator G_theta (a copy of the teacher) maps noise to images in one step (or a few). Distribution Matching
Distillation moves every generated sample x_g along the gradient of KL(p_fake,sigma || p_real,sigma) between the
noised generator distribution and the noised data distribution. That gradient is a difference of two scores at a
noised sample x_t = x_g + sigma * eps: the teacher D_phi gives the real score, a "fake score" network D_psi, trained
online with the EDM loss on the generator's own samples, gives the fake one:
    grad_theta KL = E[(s_fake - s_real)(x_t) dx_t/dtheta],   s_fake - s_real = (D_psi(x_t) - D_phi(x_t)) / sigma^2.
DMD2 drops DMD's regression loss (and its dataset of teacher noise-image pairs) and keeps training stable with a
two time-scale update rule (several fake-score updates per generator update), adds a GAN whose classifier is a small
head on the fake-score network's bottleneck, trained on noised real and generated images (so the student can beat
its teacher), and trains multi-step generators on their own intermediate outputs ("backward simulation").

Paper -> code (arXiv:2405.14867; the authors' code is tianweiy/DMD2, main/edm/ for ImageNet-64):
    distribution matching gradient (DMD), per-sample normalised by mean|x_g - D_real|  -> dmd_loss
    its noise level: index uniform in [0.02, 0.98] of a 1000-point Karras grid         -> grid_sigma, --dmd-range
    fake score D_psi trained on detached generator samples, EDM weighting              -> train_iteration step 1
    two time-scale update rule (TTUR): 5 fake-score updates per generator update       -> --fake-updates
    GAN: classifier head on D_psi's bottleneck, real and generated images noised       -> Classifier, train_iteration
    non-saturating logistic losses softplus(-D(real)) + softplus(D(fake)), softplus(-D(fake))  -> gan_d_loss, gan_g_loss
    generator G(80 z; 80), a copy of the teacher                                       -> student_sigmas, --sigma-init
    multi-step generator with K fixed input noise levels                               -> student_sigmas,
                                                                                          common.generate
    backward simulation: step k trained on the generator's own k-step input            -> backward_simulation
    AdamW(0.9, 0.999, wd 0.01), lr warm-up, grad-norm clip 10, bf16, no EMA            -> main, warmup_lr, --grad-clip
    networks without dropout (dropout=0.0, DMD2 main/edm/edm_network.py:11)            -> build_networks

Deliberate deviations from the paper and the authors' code:
  - One iteration here is --fake-updates fake-score/classifier updates, then ONE generator update, so --iters counts
    generator updates. The authors' step counter advances once per fake update (their 200k steps = 40k here).
  - Losses are averaged over pixels as in the authors' code (dmd_loss itself returns per-sample sums), so the paper's
    GAN weights (3e-3 generator side, 1e-2 fake side) keep their size relative to the other losses.
  - The GAN head's input size: the authors' head assumes an 8x8 encoder output (ImageNet-64); here its second
    conv has kernel = stride = S/2 for an SxS map (the authors' 4x4 stride 4 at S = 8), so that the small presets'
    4x4 maps also reach 1x1, and GroupNorm has min(32, C/4) groups (the authors' 32 from 128 channels up).
  - Multi-step noise levels: sigma_init, then the Karras grid at u = (K-1)/(K+1), ..., 1/(K+1) (K=2: 80, 0.47;
    K=4: 80, 5.8, 0.97, 0.085), our choice in the spirit of the SDXL model's 999/749/499/249 timesteps (which are
    about 14.6, 4.1, 1.6, 0.69 in EDM units, for latents of std ~1). k is drawn per sample.
  - A non-finite DMD gradient is not zeroed (the authors' code applies nan_to_num to it): the loss becomes NaN and
    the generator step is skipped (common.AmpOptimizer), so a run cannot train on silently zeroed gradients.
  - --ema keeps an EMA of the generator for evaluation (default 0: a plain copy, as the paper, which uses no EMA).
  - toy2d: the encoder output is the MLP's last hidden state and the classifier head is a 2-layer MLP; toy2d and
    synthetic use larger learning rates and no warm-up so that they finish in minutes on a CPU. A 1-step toy2d
    student takes its input at sigma_init = 2.5 (TOY_SIGMA_INIT, as SiD's generator), not 80: over seeds 0-3 with
    the exact teacher, median precision 0.86 -> 0.92 and mode_w2 0.065 -> 0.041 (README, "What limits each
    student").
  - toy2d's schedule: the generator's lr is 1.2e-3 (4x the earlier toy value) with a cosine decay over the 400
    iterations, and the fake score keeps its lr (--no-fake-lr-decay) so that it keeps up with the slowing generator
    (the authors use a constant lr after warm-up). Over seeds 0-3 with the exact teacher the medians of sw2 /
    mode_w2 / mode_tv / precision are 0.034 / 0.031 / 0.038 / 0.938, against 0.043 / 0.041 / 0.043 / 0.920 at the
    earlier constant 3e-4, in the same time (README, "What limits each student").
  - Multi-step: the fake score learns the K-step sampler's final outputs (--fake-samples final), while the authors'
    SDXL code trains it on the outputs of the randomly chosen steps the generator is trained on (a mixture over
    steps; --fake-samples steps). With the mixture, any split of the data between the steps whose average is the data
    is a fixed point: on toy2d with --steps 2 the first step ended on 3 modes and the second on the other 5, and the
    sampled (final) distribution lost 3 modes. With 'final' the DMD gradient of the last step is the exact one.

Known behaviour (toy2d): from G(80 z) = the teacher's D(80 z; 80), which is the data mean for every z (at 80 the
noise hides the data entirely), the generator needs some tens of iterations before its samples spread out;
afterwards the mode weights oscillate around the right values (the fake score lags the generator), more so with
larger --lr-g. With --steps 2 the first step may stay collapsed and leave the work to the second (the final samples
are what counts).

Shared pieces (common.py / unet.py): base_parser / parse_args, start_method (processes, data, run folder, the
teacher D_phi and the EDMDenoiser that G and psi are copied from), teacher_reference, real_batches (for the GAN),
edm_loss, karras_sigma, generate / student_sampler (the student's sampler), autocast, AmpOptimizer (zero_grad /
backward / step), ema_update, requires_grad, set_dropout, wrap / unwrap, sample_labels, evaluate (with FID), bench,
TrainLoop, save_generator / load_generator; EDMDenoiser.features (the encoder's feature maps), unet.count_params.

Commands:
    python dmd2.py                                           # toy2d on CPU, a few minutes
    python dmd2.py --gan-weight 0 --out-dir runs/toy2d-dmd2-ttur   # TTUR-only DMD2 (no GAN, no real data)
    python dmd2.py --steps 2 --out-dir runs/toy2d-dmd2-2step       # two-step generator, backward simulation
    python dmd2.py --dataset synthetic --resolution 16       # small class-conditional images on CPU
    python dmd2.py --dataset cifar10 --data-dir data         # one GPU
    torchrun --nproc_per_node=8 dmd2.py --dataset imagenet64 --data-dir data/imagenet64
    python dmd2.py --dataset cifar10 --resume --fid-samples 50000
        # the finished run's FID-50k (no training)
    python dmd2.py --dataset synthetic --resolution 32 --preset cifar10 --bench
        # speed at CIFAR-10 size
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
# ARGUMENTS
# ================================================================================================================

# Per-dataset defaults of this method (keys are argparse dests); the shared ones come from common.DATASET_DEFAULTS.
# cifar10 / imagenet64: the paper's ImageNet-64 settings (lr 2e-6 for both networks, warm-up over 500 fake-score
# steps from lr 0, 200k fake-score steps = 40k iterations here, batch 280 on ImageNet, no EMA). toy2d and
# synthetic: larger learning rates, no warm-up and short runs so that they finish in minutes on a CPU (one
# iteration = 6 network updates, so a synthetic iteration costs ~5 CPU-seconds at batch 32). toy2d also decays the
# generator's lr (cosine) and keeps the fake score's (module docstring, "toy2d's schedule").
METHOD_DEFAULTS = {
    "toy2d": dict(iters=400, batch=256, lr_g=1.2e-3, lr_f=2e-3, ema=0.0, warmup=0, eval_every=100,
                  lr_decay="cosine", fake_lr_decay=False),
    "synthetic": dict(iters=50, batch=32, lr_g=1e-4, lr_f=2e-4, ema=0.0, warmup=0, eval_every=25,
                      fake_lr_decay=True),
    "cifar10": dict(iters=40000, batch=256, lr_g=2e-6, lr_f=2e-6, ema=0.0, warmup=500, fake_lr_decay=True),
    "imagenet64": dict(iters=40000, batch=280, lr_g=2e-6, lr_f=2e-6, ema=0.0, warmup=500, fake_lr_decay=True),
}


# The 1-step toy2d student's input noise level: G(z) = D_G(2.5 z; 2.5), as SiD's, instead of the authors' 80 (the
# README's ablation: over seeds 0-3 it puts more samples inside a mode and widens the too-narrow modes). At 80 the
# teacher network's starting output is the mixture mean for every z, and the generator has further to go.
TOY_SIGMA_INIT = 2.5


def parse_args(argv=None):
    p = common.base_parser("DMD2: Improved Distribution Matching Distillation (arXiv:2405.14867)", method="dmd2")
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
    g.add_argument("--fake-sigma", default="grid", choices=("grid", "lognormal"),
                   help="noise levels of the fake-score loss: the whole Karras grid, index ~ U{0..999} (the authors'), "
                        "or EDM's ln sigma ~ N(-1.2, 1.2^2)")
    g.add_argument("--grad-clip", type=float, default=10.0, help="gradient norm clipping of both optimisers")
    args = common.parse_args(p, METHOD_DEFAULTS, argv)
    if args.sigma_init is None:
        args.sigma_init = TOY_SIGMA_INIT if args.dataset == "toy2d" and args.steps == 1 else common.SIGMA_MAX
    if args.fake_updates < 1:
        p.error(f"--fake-updates must be >= 1 (got {args.fake_updates})")
    if not 0 <= args.dmd_range[0] <= args.dmd_range[1] <= GRID - 1:
        p.error(f"--dmd-range needs 0 <= LO <= HI <= {GRID - 1} (got {args.dmd_range[0]} {args.dmd_range[1]})")
    if not 1 <= args.steps <= 4:
        p.error(f"--steps must be 1, 2, 3 or 4 (got {args.steps})")
    if not common.SIGMA_MIN < args.sigma_init <= 1000:  # also rejects NaN
        p.error(f"--sigma-init must be in ({common.SIGMA_MIN}, 1000] (got {args.sigma_init})")
    for name in ("gan_weight", "gan_weight_g", "gan_weight_f", "ema", "warmup", "grad_clip"):
        if not getattr(args, name) >= 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    return args


# ================================================================================================================
# NOISE LEVELS
# ================================================================================================================

# The 1000-point Karras grid of noise levels (index i -> karras_sigma(i / 999)) and the index range of the
# distribution matching gradient, [0.02, 0.98] of the grid (sigma ~0.003 .. ~72).
GRID = 1000
DMD_MIN_INDEX, DMD_MAX_INDEX = 20, 980


def student_sigmas(args):
    """The K = --steps input noise levels of the student for common.generate: sigma_init for the first step (pure
    noise), then the Karras grid at u = (K-1)/(K+1), ..., 1/(K+1) for the re-noised inputs. K=2: [80, 0.47];
    K=3: [80, 2.52, 0.17]; K=4: [80, 5.84, 0.97, 0.085]."""
    u = torch.arange(args.steps - 1, 0, -1, dtype=torch.float64) / (args.steps + 1)
    return [float(args.sigma_init)] + common.karras_sigma(u).tolist()


def grid_sigma(n, device, lo=0, hi=GRID - 1):
    """n noise levels drawn by index i ~ U{lo, ..., hi} of the 1000-point Karras grid: sigma = karras_sigma(i / 999)."""
    i = torch.randint(lo, hi + 1, (n,), device=device)
    return common.karras_sigma(i.float() / (GRID - 1))  # (B,)


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
    for j in range(1, int(k.max()) + 1):
        x = generator(x, sigmas[j - 1], labels) + sigmas[j] * torch.randn_like(x)
        pick = k == j
        x_in[pick], sigma_in[pick] = x[pick], float(sigmas[j])
    return x_in, sigma_in


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

def warmup_lr(lr, n, warmup):
    """The authors' constant-with-warm-up schedule: lr min(1, n / warmup) at fake-score update n = 0, 1, ...
    (lr 0 at the very first update); plain lr when warmup is 0."""
    return lr * min(1.0, n / warmup) if warmup else lr


def train_iteration(args, info, dist, teacher, nets, opt_g, opt_f, step, batches):
    """The two time-scale update rule: --fake-updates updates of the fake score D_psi (and the GAN classifier on its
    encoder output), then one generator update. `nets` holds the networks of build_networks and their (DDP /
    compiled) wrappers generator_t / fake_t / head_t, used where that network's own parameters are trained
    (nets.head is None without the GAN); `batches` yields real data for the GAN. Returns the losses to log."""
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
        opt_f.set_lr(warmup_lr(args.lr_f, step * args.fake_updates + j, args.warmup))
        z = torch.randn(shape, device=device)
        labels = common.sample_labels(info, batch, device)  # the generator's labels (None if unconditional)
        with torch.no_grad(), common.autocast(args, device):
            if args.fake_samples == "final":  # the K-step sampler's outputs only
                x_g = common.generate(nets.generator, z, labels, sigmas).float()
            else:  # the outputs of randomly chosen steps, as the generator is trained on (a mixture over steps)
                x_in, sigma_in = backward_simulation(nets.generator, z, labels, sigmas)
                x_g = nets.generator(x_in, sigma_in, labels).float()  # (B, *shape), no gradient
        with common.autocast(args, device):
            # lambda(sigma) || D_psi(x_g + sigma eps; sigma) - x_g ||^2, sigma = grid[i], i ~ U{0..999} (the authors')
            sigma_f = grid_sigma(batch, device) if args.fake_sigma == "grid" else None  # None: EDM's log-normal
            loss_fake = common.edm_loss(nets.fake_t, x_g, labels, sigma=sigma_f).mean() / pixels
            loss_f = loss_fake
            if gan:
                x0, real_labels = next(batches)  # real data: the only place DMD2 uses it
                x_both = torch.cat([x0, x_g])  # (2B, *shape): real first, then generated
                labels_both = torch.cat([real_labels, labels]) if info.cond else None
                # diffusion GAN: both noised, x + sigma eps with sigma = grid[i], i ~ U{0..999}
                sigma = grid_sigma(2 * batch, device)
                x_t = x_both + common.column(sigma, x_both) * torch.randn_like(x_both)
                # the encoder of D_psi alone (its decoder plays no part in the GAN), as the authors' return_bottleneck
                features = common.unwrap(nets.fake_t).features(x_t, sigma, labels_both)
                logits = nets.head_t(features[-1])  # (2B,) from D_psi's encoder output
                # L_D = softplus(-D(x_real,t)) + softplus(D(x_fake,t))
                loss_d = gan_d_loss(logits[:batch], logits[batch:]).mean()
                loss_f = loss_f + args.gan_weight * args.gan_weight_f * loss_d
        opt_f.zero_grad()
        opt_f.backward(loss_f)
        opt_f.step()
    out["loss_fake"] = loss_fake.detach()
    if gan:
        out["loss_d"] = loss_d.detach()
        # the classifier's accuracy-like read-out: mean sigmoid on real and on generated samples
        out["p_real"] = torch.sigmoid(logits[:batch].detach()).mean()
        out["p_fake"] = torch.sigmoid(logits[batch:].detach()).mean()

    # ---- 2. Generator G: DMD gradient (+ GAN); teacher, fake and classifier frozen, gradients flow through x_t ----
    for net in (nets.fake, nets.head) if gan else (nets.fake,):
        common.requires_grad(net, False).eval()
    z = torch.randn(shape, device=device)  # fresh latents
    labels = common.sample_labels(info, batch, device)
    with torch.no_grad(), common.autocast(args, device):
        x_in, sigma_in = backward_simulation(nets.generator, z, labels, sigmas)  # step k's input, k ~ U{0..K-1}
    nets.generator.train()
    with common.autocast(args, device):
        x_g = nets.generator_t(x_in, sigma_in, labels).float()  # (B, *shape), carries grad to theta
        # x_t = x_g + sigma eps, sigma = grid[i], i ~ U{LO..HI} of --dmd-range (the authors' 20..980: ~0.003 .. ~72)
        sigma = grid_sigma(batch, device, *args.dmd_range)
        x_t = x_g + common.column(sigma, x_g) * torch.randn_like(x_g)
        with torch.no_grad():
            d_real = teacher(x_t, sigma, labels)  # D_phi(x_t)
            d_fake = common.unwrap(nets.fake)(x_t, sigma, labels)  # D_psi(x_t)
        # dL/dx_g = g = (D_psi(x_t) - D_phi(x_t)) / mean_CHW |x_g - D_phi(x_t)|
        weight = sigma ** 2 if args.loss_weight == "sigma2" else None  # None: the authors' mean |x_g - D_phi|
        loss_dmd = dmd_loss(x_g, d_real, d_fake, weight).mean() / pixels
        loss_g = loss_dmd
        if gan:
            sigma = grid_sigma(batch, device)
            x_t = x_g + common.column(sigma, x_g) * torch.randn_like(x_g)
            features = common.unwrap(nets.fake).features(x_t, sigma, labels)  # D_psi's encoder, parameters frozen
            # L_G = softplus(-D(x_fake,t)), the non-saturating generator loss
            loss_adv = gan_g_loss(common.unwrap(nets.head)(features[-1])).mean()
            loss_g = loss_g + args.gan_weight * args.gan_weight_g * loss_adv
    # the authors' generator update follows their fake-score step (step + 1) * fake_updates
    opt_g.set_lr(warmup_lr(args.lr_g, (step + 1) * args.fake_updates, args.warmup))
    opt_g.zero_grad()
    opt_g.backward(loss_g)  # through x_g into theta (the DMD gradient g, and the GAN through the frozen classifier)
    opt_g.step()
    out["loss_dmd"] = loss_dmd.detach()
    if gan:
        out["loss_adv"] = loss_adv.detach()
    out["loss_g"] = loss_g.detach()
    return out


# ================================================================================================================
# MAIN
# ================================================================================================================

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    dist, info, run, teacher, teacher_net = common.start_method(args)
    device = dist.device

    nets = build_networks(args, info, teacher_net, device)
    common.init_generator(args, nets.generator, nets.ema)  # --init-generator: a saved generator instead
    gan = nets.head is not None

    def adamw(params, lr):
        # AdamW(0.9, 0.999, weight decay 0.01), gradient norm clipped at --grad-clip (10): the paper's settings
        return common.AmpOptimizer(torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.01),
                                   args, device, clip=args.grad_clip)

    opt_g = adamw(nets.generator.parameters(), args.lr_g)
    opt_f = adamw(list(nets.fake.parameters()) + (list(nets.head.parameters()) if gan else []), args.lr_f)
    nets.generator_t, nets.fake_t = common.wrap(nets.generator, args, dist), common.wrap(nets.fake, args, dist)
    nets.head_t = common.wrap(nets.head, args, dist) if gan else None
    objects = {"generator": nets.generator, "fake": nets.fake, "ema": nets.ema, "opt_g": opt_g, "opt_f": opt_f}
    if gan:
        objects["head"] = nets.head
    batches = common.real_batches(args, info, dist) if gan else None  # real data feeds the GAN only

    def iteration(step):
        losses = train_iteration(args, info, dist, teacher, nets, opt_g, opt_f, step, batches)
        # --ema 0 (the paper: no EMA) makes the EMA an exact copy of the generator
        common.ema_update(nets.ema, nets.generator, args.ema, args.batch, nimg=(step + 1) * args.batch,
                          rampup_ratio=0.05)
        return losses

    def sampler():  # the EMA generator's K-step samples
        return common.student_sampler(nets.ema, student_sigmas(args), args, device)

    if args.bench:  # time iterations and samplers, print one JSON line, write nothing
        return common.bench(args, info, dist, iteration, sampler(), teacher, teacher_net,
                            {"generator": nets.generator, "fake": nets.fake, **({"head": nets.head} if gan else {})},
                            student_nfe=args.steps)
    start = run.resume(objects)

    # The teacher's 35-NFE samples from the evaluation latents: reference metrics and the left half of every picture.
    teacher_metrics, x_teacher, nfe = common.teacher_reference(args, info, teacher, run)
    if dist.is_main:
        print(f"dmd2: generator {unet.count_params(nets.generator) / 1e6:.2f}M parameters, "
              + (f"classifier {unet.count_params(nets.head) / 1e3:.1f}k" if gan else "no GAN")
              + f", {args.steps}-step sigmas {[round(s, 3) for s in student_sigmas(args)]}, {args.iters} iterations")

    def evaluate(done):
        return common.evaluate(args, info, sampler(), dist, run=run, step=done, tag="dmd2", reference=x_teacher)[0]

    # --lr-decay: the generator's lr, and the fake score's unless --no-fake-lr-decay
    loop = common.TrainLoop(args, run, objects, evaluate, start, desc="dmd2", optimizers=[opt_g, opt_f],
                            decayed=[opt_g, opt_f] if args.fake_lr_decay else [opt_g])
    for step in loop:  # logging, evaluation, checkpoints, signals and skipped steps are the loop object's
        loop.log(iteration(step))

    common.save_generator(args, run, nets.ema)
    result = {"teacher": teacher_metrics, "student": loop.metrics, "teacher_nfe": nfe, "student_nfe": args.steps,
              "params": unet.count_params(nets.generator), "wall_s": round(time.time() - t0, 1)}
    if dist.is_main:
        print(f"dmd2: done in {result['wall_s']} s; generator saved to {run.dir / 'generator.pt'}")
    return result


if __name__ == "__main__":
    common.run_main(main)
