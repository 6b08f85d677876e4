"""Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion Models for One-Step
Generation (SiD; Zhou, Zheng, Wang, Yin, Huang; ICML 2024; arXiv:2404.04057).

Idea. A one-step generator x_g = G(z) is trained, without any real data, so that the noisy generator distribution
p_theta,sigma matches the teacher's noisy distribution at every noise level. The target is a model-based Fisher
divergence between the teacher's denoiser D_phi and the denoiser D_psi*(theta) of the generator's own samples,
    J(theta) = E_{z, eps, sigma} || D_phi(x_t; sigma) - D_psi*(theta)(x_t; sigma) ||^2,   x_t = x_g + sigma * eps.
D_psi*(theta) is unknown; a "fake score" network D_psi is trained alongside G to approximate it (plain EDM
denoising on generator samples). The naive loss (L1 below, with D_psi held fixed) trains poorly, because it
ignores how psi* moves with theta. SiD uses Tweedie's score identity E[eps | x_t] = eps_psi*(x_t) (the noise the
generator's own denoiser predicts) to trade one eps_psi for the injected noise eps:

    eps form (eps_hat = (x_t - D) / sigma):
        L1 = || eps_phi - eps_psi ||^2                    the naive Fisher-divergence estimate
        L2 = < eps_phi - eps_psi , eps_phi - eps >         one eps_psi replaced by eps (the score identity)
        SiD generator loss  = L2 - alpha * L1,            alpha = 1.2 (paper; 1.0 also works)
    x0 form (what the code computes; D = d_real, d_fake):
        eps_phi - eps_psi = (d_fake - d_real) / sigma,    eps_phi - eps = (x_g - d_real) / sigma,
        so  sigma^2 (L2 - alpha L1) = (d_real - d_fake) . ((d_real - x_g) - alpha (d_real - d_fake)),
    and SiD divides by w = stopgrad(mean |x_g - d_real|) instead of sigma^2 (a per-sample normaliser).

Why alpha = 0.5 is the unbiased choice (identity 6 of README.md, "The maths, checked"; test_toy.py checks it): with the
exact fake denoiser, E[L1] = E[L2] = J for every theta, and differentiating with psi held fixed (gradients only
through x_t) gives  grad J = grad (2 L2 - L1)  exactly. Hence
    grad (L2 - alpha L1) = 1/2 grad J + (1/2 - alpha) grad L1|psi fixed,
so alpha = 0.5 follows grad J (times 1/2) and alpha > 0.5 adds a push *up* the naive loss L1. (With the exact
fake score, 2 L2 - L1 is even stationary in psi, so at alpha = 0.5 the dependence of psi* on theta is fully
accounted for.) The paper's 1.0-1.2 are empirical: its authors guess, in the blog's comments, that they make up
for the ignored dependence of psi*(theta) on theta when the fake score is not optimal. The image datasets keep the
paper's 1.2. On toy2d, where the fake score is nearly optimal, alpha = 0.5 is the default: over seeds 0-3 (exact
teacher; README, "toy2d"), at 2000 iterations with both lrs' cosine decay, it widens the students' too-narrow modes
(median mode_w2 0.055 -> 0.030, the teacher's 0.016) and puts more samples inside a mode (precision 0.89 -> 0.945)
against alpha 1.2 at 1000 constant-lr iterations; alpha 1.2 at the same 2000 iterations and decay ends where it did
(mode_w2 0.055, precision 0.892), so the gain is alpha's; and of 0.25, 0.5 and 0.75, 0.5 is the best (0.75: mode_w2
0.036, precision 0.937; 0.25: mode_tv 0.064 against 0.031). alpha 0.5 at 2000 constant-lr iterations already had the
modes' shape (mode_w2 0.023, seed 0); the decay settles the mode weights (README, "What limits each student").
Only the generator's lr decays on toy2d (--no-fake-lr-decay), over 3000 iterations: the fake score must follow the
generator, and with its lr decayed too it lags behind at the end (the reading that fits) and the mode weights drift
(3000 iterations with both decayed: median mode_tv 0.051, sw2 0.040). With the fake score at its full lr the 3000
iterations reach median sw2 0.027, mode_w2 0.024, mode_tv 0.026, precision 0.955 (every seed's mode_tv <= 0.032 and
precision >= 0.951), against 0.032 / 0.030 / 0.031 / 0.945 for 2000 iterations with both decayed (the earlier
default); over seeds 4-7 0.029 / 0.025 / 0.031 / 0.952 against 0.037 / 0.029 / 0.033 / 0.944.
The identities hold for a weight that depends on (sigma, x_t) only; SiD's w also depends on x_g, so with it they
are approximate.

Paper -> code
    fake-score update: EDM denoising loss on stopgrad(G(z))        -> common.edm_loss in train_iteration (step 1)
    G(z) = D_G(sigma_init z; sigma_init, c), sigma_init = 2.5      -> student_sigmas, common.generate
    sigma = Karras grid at u ~ U(0, t_max), t_max = 800/1000       -> generator_loss_sigma
    generator loss L2 - alpha L1 with the w normaliser             -> sid_generator_loss()
    samples with NaN in any term are dropped                       -> finite_rows() in train_iteration
    theta and psi start as copies of the teacher (dropout kept)    -> build_networks
    Adam(betas=(0, 0.999)) for G and psi, EMA of G (0.05 ramp-up)  -> main(), common.ema_update
    Algorithm 1: 1 fake update then 1 generator update             -> train_iteration()

Deliberate deviations from the paper / its code
    - Labels are drawn uniformly (common.sample_labels); SiD's code reads them from the training set (the images
      are never used there either).
    - ImageNet-64: the paper's batch 8192 needs gradient accumulation over many GPUs, which this file does not do;
      the default is batch 256 at the paper's lr 4e-6 (pass --batch to change).
    - Periodic evaluations use FID-10k (common.fid, labelled "fid10k"); the paper's numbers are FID-50k
      (--resume --fid-samples 50000 on the finished run).
    - AMP: bf16 autocast on CUDA by default (common.py); the paper ran fp16 with loss scaling on ImageNet, which
      its issue tracker reports can diverge (--amp fp16 still works, with a GradScaler).
    - Loss scale: the authors multiply the generator loss by a fixed `--lsg 100` (SiD run_sid.sh, every dataset;
      sid_training_loop.py `loss.sum().mul(loss_scaling_G / batch_gpu_total)`), an fp16 loss scale. Here the loss
      is not multiplied: Adam's update does not depend on a constant factor of the loss (up to its eps, 1e-8), and
      fp16 runs get a dynamic GradScaler instead.
    - CIFAR-10 augmentation: the authors' CIFAR-10 runs apply EDM's AugmentPipe (p = 0.12) to the fake-score
      loss's inputs and feed its augment labels to the fake network (SiD sid_train.py --augment,
      sid_training_loop.py `loss_fn(..., augment_pipe=augment_pipe)`; ImageNet-64 runs with `--augment 0`).
      Here the fake score trains on un-augmented generator samples on every dataset.
    - toy2d / synthetic use toy-tuned learning rates, EMA and lengths so they finish in minutes on a CPU; toy2d
      also alpha 0.5 and a cosine decay of the generator's lr (above; the image datasets keep --lr-decay none).

Pitfalls (from SiD's issue tracker)
    - With alpha near 1 the generator loss is signed and oscillates around 0; it says nothing about progress.
      Watch the evaluation metrics (sw2 / precision / modes / fd here, FID on images) instead.
    - fp16 can diverge; prefer bf16 (the default on CUDA).
    - Under DDP, G's backward must run inside DDP's gradient sync (it does here: the generator's forward in the
      generator step goes through common.wrap, and its backward, opt_g.backward(loss_g), runs right after).

Shared pieces (common.py / unet.py): base_parser / parse_args, start_method (processes, data, run folder, the
teacher D_phi and the EDMDenoiser that G and psi are copied from), teacher_reference, edm_loss, karras_sigma,
generate / student_sampler (the student's sampler), autocast, AmpOptimizer (zero_grad / backward / step),
ema_update, requires_grad, wrap / unwrap, sample_labels, evaluate (with FID), bench, TrainLoop, save_generator /
load_generator; unet.count_params.

Commands:
    python sid.py                                          # toy2d, a few minutes on 2 CPU cores
    python sid.py --teacher analytic --out-dir runs/toy2d-sid-exact   # distil the exact mixture denoiser
    python sid.py --dataset synthetic --resolution 16      # CPU, 15-25 minutes on 2 cores
    python sid.py --dataset cifar10 --data-dir data        # one GPU (the teacher is trained first if needed)
    python sid.py --dataset imagenet64 --data-dir data/imagenet64
    torchrun --nproc_per_node=8 sid.py --dataset cifar10 --data-dir data
    python sid.py --dataset cifar10 --resume --fid-samples 50000
        # the finished run's FID-50k (no training)
    python sid.py --dataset synthetic --resolution 32 --preset cifar10 --bench
        # speed at CIFAR-10 size
"""

import argparse
import copy
import time
from types import SimpleNamespace

import torch

import common
import unet

# ================================================================================================================
# ARGUMENTS
# ================================================================================================================

# Per-dataset defaults of this method (argparse dests). cifar10 / imagenet64 are the authors' (SiD run_sid.sh): lr 1e-5
# at batch 256 and EMA half-life 0.5 Mimg (CIFAR-10; EDM's default, run_sid.sh sets no --ema there), lr 4e-6 and EMA
# half-life 2 Mimg (ImageNet-64, `--ema 2`); ~100 Mimg of generator samples ("very competitive").
# toy2d: alpha 0.5 (unbiased), 3000 iterations, the generator's lr decayed (cosine) and the fake score's kept: the
# best of the README's ablation over seeds (module docstring).
METHOD_DEFAULTS = {
    "toy2d": dict(iters=3000, lr_g=3e-4, lr_f=1e-3, ema=50.0, eval_every=500, alpha=0.5, lr_decay="cosine",
                  fake_lr_decay=False),
    "synthetic": dict(iters=400, lr_g=1e-4, lr_f=3e-4, ema=2.0, eval_every=100, alpha=1.2, fake_lr_decay=True),
    "cifar10": dict(iters=400000, batch=256, lr_g=1e-5, lr_f=1e-5, ema=500.0, alpha=1.2, fake_lr_decay=True),
    "imagenet64": dict(iters=400000, batch=256, lr_g=4e-6, lr_f=4e-6, ema=2000.0, alpha=1.2, fake_lr_decay=True),
}


def parse_args(argv=None):
    p = common.base_parser("SiD: one-step distillation of an EDM teacher by score identity distillation.",
                           method="sid")
    g = p.add_argument_group("sid")
    g.add_argument("--lr-g", type=float, default=None,
                   help="generator Adam learning rate, betas (0, 0.999)")
    g.add_argument("--lr-f", type=float, default=None,
                   help="fake-score Adam learning rate, betas (0, 0.999)")
    g.add_argument("--ema", type=float, default=None,
                   help="generator EMA half-life in kimg, capped at 5%% of the images seen so far (EDM's ramp-up)")
    g.add_argument("--sigma-init", type=float, default=2.5,
                   help="generator input noise level: G(z) = D_G(sigma_init * z; sigma_init)")
    g.add_argument("--alpha", type=float, default=None,
                   help="generator loss L2 - alpha * L1 (paper 1.2, the image datasets' default; 0.5, the toy2d "
                        "default, is unbiased with an optimal fake score)")
    g.add_argument("--t-max", type=float, default=0.8,
                   help="generator-loss noise levels: sigma = Karras grid at u ~ U(0, t_max) (0.8 -> sigma <= ~24)")
    g.add_argument("--loss-weight", default="mean-abs", choices=("mean-abs", "sigma2"),
                   help="the generator loss's per-sample divisor w: SiD's stopgrad(mean |x_g - D_phi(x_t)|), or "
                        "sigma^2 (then the loss is L2 - alpha L1 of the eps form, and identity 6 holds exactly)")
    g.add_argument("--fake-lr-decay", action=argparse.BooleanOptionalAction, default=None,
                   help="apply --lr-decay to the fake score's lr too; with --no-fake-lr-decay only the generator's lr "
                        "decays and the fake score keeps tracking the slowing generator at its full lr")
    g.add_argument("--fake-sigma", default="lognormal", choices=("lognormal", "generator"),
                   help="noise levels of the fake-score loss: EDM's ln sigma ~ N(-1.2, 1.2^2) (the authors'), or the "
                        "generator loss's (Karras grid at u ~ U(0, t_max))")
    args = common.parse_args(p, METHOD_DEFAULTS, argv)
    if not args.sigma_init > 0:
        p.error(f"--sigma-init must be a positive number (got {args.sigma_init})")
    if not 0 < args.t_max <= 1:
        p.error(f"--t-max must be in (0, 1] (got {args.t_max})")
    if not args.ema >= 0:
        p.error(f"--ema must be >= 0 (got {args.ema})")
    if not abs(args.alpha) < float("inf"):
        p.error(f"--alpha must be a finite number (got {args.alpha})")
    return args


# ================================================================================================================
# NOISE LEVELS
# ================================================================================================================

def student_sigmas(args):
    """The generator's input noise levels for common.generate: one, sigma_init (G(z) = D_G(sigma_init z; sigma_init))."""
    return [float(args.sigma_init)]


def generator_loss_sigma(n, t_max, device):
    """n noise levels of the generator loss: sigma = (smin^(1/rho) + u (smax^(1/rho) - smin^(1/rho)))^rho with
    u ~ U(0, t_max), so sigma in [0.002, ~24.4] for t_max = 0.8 (SiD's tmax = 800 of 1000). (n,)"""
    return common.karras_sigma(torch.rand(n, device=device) * t_max)


# ================================================================================================================
# LOSSES (pure functions of tensors; test_toy.py checks them against closed forms)
# ================================================================================================================

def sid_generator_loss(x_g, d_real, d_fake, alpha=1.2, weight=None):
    """SiD's generator loss per sample (B,), sigma^2 (L2 - alpha L1) / w in x0 form (the module docstring derives it),
    with d_real = D_phi(x_t), d_fake = D_psi(x_t), x_t = x_g + sigma eps. w is SiD's normaliser
    stopgrad(mean |x_g - d_real|) over the non-batch dimensions when `weight` is None, else the given (B,) weight
    (used as given: detach it yourself if it should carry no gradient). weight = sigma^2 gives L2 - alpha L1."""
    if weight is None:
        # w = stopgrad(mean_{CHW} |x_g - D_phi|), floored so a perfect sample cannot divide by zero
        with torch.no_grad():
            weight = (x_g - d_real).abs().flatten(1).mean(1).clamp_min(1e-5)  # (B,)
    w = common.column(weight, x_g)  # (B, 1, ..., 1)
    # sum_{CHW} (D_phi - D_psi) ((D_phi - x_g) - alpha (D_phi - D_psi)) / w
    loss = (d_real - d_fake) * ((d_real - x_g) - alpha * (d_real - d_fake)) / w
    return loss.flatten(1).sum(1)  # (B,)


def finite_rows(*tensors):
    """(B,) bool: the samples whose entries are finite in every given (B, ...) tensor. SiD drops the samples with
    a NaN in x_g, d_real or d_fake *before* forming the loss, so that backward sends exact zeros to the dropped
    rows (masking the per-sample loss instead would send 0 * NaN = NaN back through them)."""
    keep = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        keep &= torch.isfinite(t).flatten(1).all(1)
    return keep


# ================================================================================================================
# NETWORKS (the generator and the fake score are copies of the teacher's EDMDenoiser)
# ================================================================================================================

def build_networks(args, info, teacher_net, device):
    """generator (theta), fake (psi) and ema (the generator that is evaluated and saved): copies of the teacher's
    network, dropout kept as in the authors' code (EDM's networks with their training dropout)."""
    def copy_of_teacher():
        return copy.deepcopy(teacher_net).to(device)

    return SimpleNamespace(generator=copy_of_teacher().requires_grad_(True),
                           fake=copy_of_teacher().requires_grad_(True),
                           ema=copy_of_teacher().eval().requires_grad_(False))


# ================================================================================================================
# ONE TRAINING ITERATION
# ================================================================================================================

def train_iteration(args, info, dist, teacher, nets, opt_g, opt_f, step):
    """Algorithm 1 of the paper: one fake-score update, then one generator update. `nets` holds the networks of
    build_networks and their (DDP / compiled) wrappers generator_t / fake_t, used where that network's own
    parameters are trained. Returns the losses to log."""
    device, batch = dist.device, args.batch // dist.world  # this rank's share of the batch
    shape = (batch, *info.shape)

    # ---- 1. Fake score psi: EDM denoising on generator samples (G fixed, in eval mode as in SiD's code) ----
    nets.generator.eval()
    common.requires_grad(nets.fake, True).train()
    z = torch.randn(shape, device=device)
    labels = common.sample_labels(info, batch, device)  # data-free: labels only
    with torch.no_grad(), common.autocast(args, device):
        x_g = common.generate(nets.generator, z, labels, student_sigmas(args)).float()  # (B, *shape)
    keep_f = finite_rows(x_g)  # drop non-finite generator samples (an empty batch gives NaN: the step is skipped)
    x_g, labels = x_g[keep_f], None if labels is None else labels[keep_f]
    with common.autocast(args, device):
        # lambda(sigma) || D_psi(x_g + sigma eps; sigma) - x_g ||^2, ln sigma ~ N(-1.2, 1.2^2) (or the generator's)
        sigma_f = generator_loss_sigma(len(x_g), args.t_max, device) if args.fake_sigma == "generator" else None
        loss_fake = common.edm_loss(nets.fake_t, x_g, labels, sigma=sigma_f).mean()
    opt_f.zero_grad()
    opt_f.backward(loss_fake)
    opt_f.step()

    # ---- 2. Generator G: SiD loss through x_t; teacher and fake frozen, gradients flow through their inputs ----
    common.requires_grad(nets.fake, False).eval()
    nets.generator.train()
    z = torch.randn(shape, device=device)  # fresh latents
    labels = common.sample_labels(info, batch, device)
    eps = torch.randn(shape, device=device)
    sigma = generator_loss_sigma(batch, args.t_max, device)  # (B,) in [0.002, ~24.4]
    with common.autocast(args, device):
        # x_g = G(z) = D_G(sigma_init z; sigma_init, c): carries the gradient to theta
        x_g = common.generate(nets.generator_t, z, labels, student_sigmas(args)).float()  # (B, *shape)
        x_t = x_g + common.column(sigma, x_g) * eps
        d_real = teacher(x_t, sigma, labels)  # D_phi(x_t): parameters frozen
        d_fake = common.unwrap(nets.fake)(x_t, sigma, labels)  # D_psi(x_t): plain module, parameters frozen
    # NaN masking (SiD): keep the samples with finite x_g, d_real and d_fake (fp16 overflow shows up here), sum the
    # loss over them and divide by the whole batch, as the authors' code does (a dropped sample contributes 0). A NaN
    # that backward still carries into shared weights (one raised inside a network) is cleaned by AmpOptimizer's
    # nan_to_num; a batch with no sample left gets a NaN loss, so that AmpOptimizer skips the step and counts it.
    keep = finite_rows(x_g, d_real, d_fake)  # (B,) bool
    # 1/B sum_b sigma_b^2 (L2 - alpha L1)_b / w_b over the kept samples b
    weight = sigma[keep] ** 2 if args.loss_weight == "sigma2" else None  # None: SiD's mean |x_g - D_phi|
    loss_g = sid_generator_loss(x_g[keep], d_real[keep], d_fake[keep], args.alpha, weight).sum() / batch
    if not keep.any():
        loss_g = torch.full_like(loss_g, float("nan"))
    opt_g.zero_grad()
    opt_g.backward(loss_g)  # through x_t, the teacher and the fake score into theta
    opt_g.step()
    dropped = int((~keep_f).sum()) + int((~keep).sum())
    return {"loss_fake": loss_fake.detach(), "loss_g": loss_g.detach(), "nan_samples": dropped}


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
    opt_g = common.AmpOptimizer(torch.optim.Adam(nets.generator.parameters(), lr=args.lr_g, betas=(0.0, 0.999)),
                                args, device)
    opt_f = common.AmpOptimizer(torch.optim.Adam(nets.fake.parameters(), lr=args.lr_f, betas=(0.0, 0.999)),
                                args, device)
    nets.generator_t, nets.fake_t = common.wrap(nets.generator, args, dist), common.wrap(nets.fake, args, dist)
    objects = {"generator": nets.generator, "fake": nets.fake, "ema": nets.ema, "opt_g": opt_g, "opt_f": opt_f}

    def iteration(step):
        losses = train_iteration(args, info, dist, teacher, nets, opt_g, opt_f, step)
        common.ema_update(nets.ema, nets.generator, args.ema, args.batch, nimg=(step + 1) * args.batch,
                          rampup_ratio=0.05)
        return losses

    def sampler():  # the EMA generator's one-step samples
        return common.student_sampler(nets.ema, student_sigmas(args), args, device)

    if args.bench:  # time iterations and samplers, print one JSON line, write nothing
        return common.bench(args, info, dist, iteration, sampler(), teacher, teacher_net,
                            {"generator": nets.generator, "fake": nets.fake}, student_nfe=1)
    start = run.resume(objects)

    # The teacher's 35-NFE samples from the evaluation latents: reference metrics and the left half of every picture.
    teacher_metrics, x_teacher, nfe = common.teacher_reference(args, info, teacher, run)
    if dist.is_main:
        print(f"sid: generator {unet.count_params(nets.generator) / 1e6:.2f}M parameters, {args.iters} iterations")

    def evaluate(done):
        return common.evaluate(args, info, sampler(), dist, run=run, step=done, tag="sid", reference=x_teacher)[0]

    # --lr-decay: the generator's lr, and the fake score's unless --no-fake-lr-decay (toy2d's default)
    loop = common.TrainLoop(args, run, objects, evaluate, start, desc="sid", optimizers=[opt_g, opt_f],
                            decayed=[opt_g, opt_f] if args.fake_lr_decay else [opt_g])
    for step in loop:  # logging, evaluation, checkpoints, signals and skipped steps are the loop object's
        loop.log(iteration(step))

    common.save_generator(args, run, nets.ema)
    result = {"teacher": teacher_metrics, "student": loop.metrics, "teacher_nfe": nfe, "student_nfe": 1,
              "params": unet.count_params(nets.generator), "wall_s": round(time.time() - t0, 1)}
    if dist.is_main:
        print(f"sid: done in {result['wall_s']} s; generator saved to {run.dir / 'generator.pt'}")
    return result


if __name__ == "__main__":
    common.run_main(main)
