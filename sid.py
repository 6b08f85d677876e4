"""Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion Models for One-Step
Generation (SiD; Zhou, Zheng, Wang, Yin, Huang; ICML 2024; arXiv:2404.04057; code: mingyuanzhou/SiD).

Idea. A one-step generator x_g = G(z), a copy of the teacher, is trained without data so that its noised distribution
matches the teacher's at every noise level, by a model-based Fisher divergence between the teacher D_phi and the
denoiser D_psi* of the generator's own samples:  J(theta) = E || D_phi(x_t; sigma) - D_psi*(x_t; sigma) ||^2,
x_t = x_g + sigma eps. A fake score D_psi, trained alongside G (EDM loss on generator samples), stands in for D_psi*.
With eps_hat = (x_t - D) / sigma, Tweedie's score identity E[eps | x_t] = eps_psi*(x_t) trades one eps_psi for eps:
    L1 = ||eps_phi - eps_psi||^2 (naive),   L2 = <eps_phi - eps_psi, eps_phi - eps>,   generator loss L2 - alpha L1.
In x0 form, eps_phi - eps_psi = (d_fake - d_real) / sigma and eps_phi - eps = (x_g - d_real) / sigma, so
    sigma^2 (L2 - alpha L1) = (d_real - d_fake) . ((d_real - x_g) - alpha (d_real - d_fake)),
and SiD divides by w = stopgrad(mean |x_g - d_real|) instead of sigma^2: exactly what sid_generator_loss computes.
Why alpha = 0.5 is unbiased (identity 6, README.md "The maths, checked"; test_toy.py): with the exact fake denoiser
E[L1] = E[L2] = J for every theta, and with psi held fixed grad J = grad (2 L2 - L1), hence
    grad (L2 - alpha L1) = 1/2 grad J + (1/2 - alpha) grad L1|psi fixed,
so alpha > 0.5 adds a push up the naive loss. The paper's 1.2 (kept on images) is empirical: its authors read it as
making up for a fake score that misses how psi* moves with theta. The identities need a weight of (sigma, x_t)
alone; SiD's w also depends on x_g, so with it they are approximate.

Paper -> code
    fake-score update: EDM loss on stopgrad(G(z)), ln sigma ~ N(-1.2, 1.2^2)  -> train_iteration step 1, --fake-sigma
      (--fake-sigma lognormal, the authors'; grid: index ~ U{0..999} of the 1000-point Karras grid; loss: loss_sigma)
    G(z) = D_G(sigma_init z; sigma_init, c), sigma_init = 2.5                -> student_sigmas, common.generate
    generator-loss sigma: Karras grid at u ~ U(0, t_max), t_max = 800/1000   -> loss_sigma(n, args, device)
    generator loss (L2 - alpha L1) with the w normaliser; NaN rows dropped   -> sid_generator_loss, finite_rows
    theta and psi start as copies of the teacher (dropout kept)              -> build_networks
    Adam(0, 0.999) for G and psi, EMA of G with EDM's 0.05 ramp-up          -> main, learning_rates, common.ema_update
    Algorithm 1: one fake-score update, then one generator update            -> train_iteration
    the loop: for step in range(start, args.iters): learning_rates -> train_iteration -> common.ema_update
              -> book.end_iteration (common.Bookkeeping: log, evaluate, checkpoint, signals, skip-stop)  -> main

Deliberate deviations (files of mingyuanzhou/SiD; "loop" is its training/sid_training_loop.py)
    - Labels are drawn uniformly (common.sample_labels); SiD reads them off the data (loop:314,340).
    - ImageNet-64: batch 256 at the paper's lr 4e-6, not 8192 (run_sid.sh:67); --batch-gpu: rounds, as loop's.
    - Periodic evaluations are FID-10k ("fid10k"); the paper's numbers are FID-50k (--resume --fid-samples 50000).
    - AMP: bf16 autocast on CUDA; the authors' ImageNet-64 run is fp16 (run_sid.sh:79; --amp fp16 gets a GradScaler).
    - No x100 generator-loss scale (sid_train.py:98, loop:348): Adam ignores a constant factor.
    - No augmentation: the authors' CIFAR-10 fake loss sees AugmentPipe inputs (sid_train.py:72 p 0.12, loop:321).
    - The fake-score loss is averaged over the kept (finite) rows; the authors', over the whole batch (loop:322).
    - EMA ramp-up: half-life <= 0.05 x images after this step, (step+1) batch; the authors', before it (loop:364,371).
    - scaled_dot_product_attention for EDM's AttentionOp (NVlabs/edm training/networks.py:113): within ~4e-7 relative.
    - A non-finite gradient skips the step (common.AmpOptimizer); the authors' nan_to_num zeroes it (loop:331,357).
    - toy2d: alpha 0.5, 3000 iterations, only the generator's lr decayed (assets/results.md#sid-toy-defaults).

Pitfalls (from SiD's issue tracker)
    - With alpha near 1 the generator loss is signed and hovers around 0: watch the evaluation metrics, not loss_g.
    - fp16 can diverge; prefer bf16 (the default on CUDA).
    - Under DDP, G's backward must run inside DDP's gradient sync (here opt_g.backward follows the wrapped forward).

Shared pieces (common.py / unet.py): start_method (processes, data, run folder, teacher), edm_loss, karras_sigma,
generate / student_sampler, AmpOptimizer, ema_update, Bookkeeping, evaluate (FID), save_generator, export_samples,
bench; unet's EDM networks.

Commands
    python sid.py                                         # toy2d on CPU, a few minutes
    python sid.py --dataset synthetic --resolution 16     # small class-conditional images on CPU
    python sid.py --dataset cifar10 --data-dir data       # one GPU (trains the teacher first if needed)
    torchrun --nproc_per_node=8 sid.py --dataset imagenet64 --data-dir data/imagenet64
    python sid.py --dataset cifar10 --resume --fid-samples 50000   # the finished run's FID-50k
    python sid.py --dataset cifar10 --resume --export 50000 --export-dir samples   # its samples, as PNGs
"""

import argparse
import copy
import time
from types import SimpleNamespace

import torch

import common
import unet

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
    a NaN in x_g, d_real or d_fake *before* forming the loss (zero_rows), so that backward sends exact zeros to the
    dropped rows (masking the per-sample loss alone would send 0 * NaN = NaN back through them)."""
    keep = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        keep &= torch.isfinite(t).flatten(1).all(1)
    return keep


def zero_rows(keep, *tensors):
    """The (B, ...) tensors with the rows that `keep` (B,) bool leaves out replaced by zeros. torch.where, not a
    product: backward then sends those rows exact zeros (0 * NaN would be NaN), and no row count leaves the device."""
    return [torch.where(keep.view(-1, *[1] * (t.ndim - 1)), t, 0.0) for t in tensors]


# ================================================================================================================
# NOISE LEVELS
# ================================================================================================================

def student_sigmas(args, steps=None):
    """The generator's input noise levels for common.generate: one, sigma_init (G(z) = D_G(sigma_init z; sigma_init)).
    SiD's generator has one step; `steps` is accepted for the three scripts' common signature."""
    return [float(args.sigma_init)]


def loss_sigma(n, args, device):
    """n noise levels of the generator loss: sigma = (smin^(1/rho) + u (smax^(1/rho) - smin^(1/rho)))^rho with
    u ~ U(0, t_max), so sigma in [0.002, ~24.4] for t_max = 0.8 (SiD's tmax = 800 of 1000). (n,)"""
    return common.karras_sigma(torch.rand(n, device=device) * args.t_max)


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

def train_iteration(args, info, dist, teacher, nets, opt_g, opt_f, step, batches=None):
    """Algorithm 1 of the paper: one fake-score update, then one generator update. `nets` holds the networks of
    build_networks and their (DDP / compiled) wrappers generator_t / fake_t, used where that network's own
    parameters are trained. SiD is data-free: `batches` is None. Each update draws its noise for this rank's whole
    batch, then runs forward and backward in rounds of --batch-gpu rows (common.rounds) and steps once; with one
    round (the default) the result is that of the whole batch at once. Returns the losses to log."""
    device, batch = dist.device, args.batch // dist.world  # this rank's share of the batch
    shape = (batch, *info.shape)

    # ---- 1. Fake score psi: EDM denoising on generator samples (G fixed, in eval mode as in SiD's code) ----
    nets.generator.eval()
    common.requires_grad(nets.fake, True).train()
    z = torch.randn(shape, device=device)
    labels = common.sample_labels(info, batch, device)  # data-free: labels only
    with torch.no_grad(), common.autocast(args, device):
        x_g = common.generate(nets.generator, z, labels, student_sigmas(args)).float()  # (B, *shape)
    # drop non-finite generator samples: zeroed here, left out of the mean below (none left: NaN, the step skipped)
    keep_f = finite_rows(x_g)  # (B,) bool
    x_g, = zero_rows(keep_f, x_g)
    kept_f = keep_f.sum()
    # sigma per --fake-sigma (EDM's log-normal by default) and eps, drawn for the whole batch before its rounds
    sigma_f, eps_f = common.fake_sigma(args, batch, device, loss_sigma), torch.randn_like(x_g)
    loss_fake = 0.0
    opt_f.zero_grad()
    for rows, share in common.rounds(batch, args.batch_gpu, nets.fake_t):  # --batch-gpu rows at a time
        with common.autocast(args, device):
            # lambda(sigma) || D_psi(x_g + sigma eps; sigma) - x_g ||^2, averaged over the kept samples
            loss = common.edm_loss(nets.fake_t, x_g[rows], common.pick(labels, rows), sigma_f[rows], eps_f[rows])
            loss = (loss * keep_f[rows]).mean() * (batch / kept_f) * share
        opt_f.backward(loss)
        loss_fake = loss_fake + loss.detach()
    opt_f.step()

    # ---- 2. Generator G: SiD loss through x_t; teacher and fake frozen, gradients flow through their inputs ----
    common.requires_grad(nets.fake, False).eval()
    nets.generator.train()
    z = torch.randn(shape, device=device)  # fresh latents
    labels = common.sample_labels(info, batch, device)
    eps = torch.randn(shape, device=device)
    sigma = loss_sigma(batch, args, device)  # (B,) in [0.002, ~24.4]
    loss_g, dropped = 0.0, batch - kept_f
    opt_g.zero_grad()
    for rows, share in common.rounds(batch, args.batch_gpu, nets.generator_t):  # --batch-gpu rows at a time
        labels_r, sigma_r = common.pick(labels, rows), sigma[rows]
        with common.autocast(args, device):
            # x_g = G(z) = D_G(sigma_init z; sigma_init, c): carries the gradient to theta
            x_g = common.generate(nets.generator_t, z[rows], labels_r, student_sigmas(args)).float()  # (b, *shape)
            x_t = x_g + common.column(sigma_r, x_g) * eps[rows]
            d_real = teacher(x_t, sigma_r, labels_r)  # D_phi(x_t): parameters frozen
            d_fake = common.unwrap(nets.fake)(x_t, sigma_r, labels_r)  # D_psi(x_t): plain module, parameters frozen
        # NaN masking (SiD): keep the samples with finite x_g, d_real and d_fake (fp16 overflow shows up here), sum
        # the loss over them and divide by the whole batch, as the authors' code does (a dropped sample contributes
        # 0). The dropped rows' inputs are replaced (torch.where) before the loss is formed, so that backward sends
        # them exact zeros. A NaN that backward still carries into shared weights (one raised inside a network), or
        # a round with no sample left (its loss is NaN), makes AmpOptimizer skip the step and count it.
        keep = finite_rows(x_g, d_real, d_fake)  # (b,) bool
        x_g, d_real, d_fake = zero_rows(keep, x_g, d_real, d_fake)
        # 1/B sum_b sigma_b^2 (L2 - alpha L1)_b / w_b over the kept samples b  (SiD sums over pixels, as its authors)
        weight = sigma_r ** 2 if args.loss_weight == "sigma2" else None  # None: SiD's mean |x_g - D_phi|
        loss = sid_generator_loss(x_g, d_real, d_fake, args.alpha, weight) * keep
        loss = torch.where(keep.any(), loss.sum() / batch, float("nan"))
        opt_g.backward(loss)  # through x_t, the teacher and the fake score into theta
        loss_g, dropped = loss_g + loss.detach(), dropped + (~keep).sum()
    opt_g.step()
    return {"loss_fake": loss_fake, "loss_g": loss_g, "nan_samples": dropped}


# ================================================================================================================
# ARGUMENTS
# ================================================================================================================

METHOD = "sid"

# Per-dataset defaults of this method (argparse dests; the shared ones are common.DATASET_DEFAULTS):
# toy2d: toy-tuned: alpha 0.5, 3000 iterations, only the generator's lr decayed (assets/results.md#sid-toy-defaults)
# synthetic: toy-tuned lrs, EMA and length so that it finishes on a CPU (assets/results.md#synthetic-16x16)
# cifar10: the authors' (SiD run_sid.sh:38-59: batch 256, lr 1e-5, alpha 1.2, 100 Mimg; EMA 0.5 Mimg, sid_train.py:70)
# imagenet64: the authors' lr 4e-6, EMA 2 Mimg, 100 Mimg (run_sid.sh:77,87,88), at batch 256 instead of their 8192
METHOD_DEFAULTS = {
    "toy2d": dict(iters=3000, lr_g=3e-4, lr_f=1e-3, ema=50.0, eval_every=500, alpha=0.5, lr_decay="cosine",
                  fake_lr_decay=False),
    "synthetic": dict(iters=400, lr_g=1e-4, lr_f=3e-4, ema=2.0, eval_every=100, alpha=1.2, fake_lr_decay=True),
    "cifar10": dict(iters=400000, batch=256, lr_g=1e-5, lr_f=1e-5, ema=500.0, alpha=1.2, fake_lr_decay=True),
    "imagenet64": dict(iters=400000, batch=256, lr_g=4e-6, lr_f=4e-6, ema=2000.0, alpha=1.2, fake_lr_decay=True),
}


def parse_args(argv=None):
    p = common.base_parser("SiD: one-step distillation of an EDM teacher by score identity distillation.",
                           method=METHOD)
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
    common.add_fake_sigma_flag(g, default="lognormal")
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


def learning_rates(args, step):
    """The learning rates of iteration `step`, decided here only: --lr-decay for the generator, and for the fake score
    unless --no-fake-lr-decay. Returns (lr_g, lr_f)."""
    decay_f = args.lr_decay if args.fake_lr_decay else "none"
    return (common.learning_rate(args.lr_g, step, args.iters, args.lr_decay),
            common.learning_rate(args.lr_f, step, args.iters, decay_f))


# ================================================================================================================
# MAIN
# ================================================================================================================

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    dist, info, run, teacher, teacher_net = common.start_method(args)
    device = dist.device

    # The method's networks and optimizers: generator G and fake score D_psi, both copies of the teacher.
    nets = build_networks(args, info, teacher_net, device)
    common.init_generator(args, nets.generator, nets.ema)  # --init-generator: a saved generator instead
    opt_g = common.AmpOptimizer(common.adam(nets.generator.parameters(), device, lr=args.lr_g,
                                            betas=(0.0, 0.999)), args, device)
    opt_f = common.AmpOptimizer(common.adam(nets.fake.parameters(), device, lr=args.lr_f,
                                            betas=(0.0, 0.999)), args, device)
    nets.generator_t, nets.fake_t = common.wrap(nets.generator, args, dist), common.wrap(nets.fake, args, dist)
    trained = {"generator": nets.generator, "fake": nets.fake}
    objects = {**trained, "ema": nets.ema, "opt_g": opt_g, "opt_f": opt_f}  # what a checkpoint holds
    batches = None  # data-free: SiD never sees a real image

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
