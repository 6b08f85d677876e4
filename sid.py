"""Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion Models for
One-Step Generation (SiD; Zhou et al., ICML 2024; arXiv:2404.04057; code: mingyuanzhou/SiD).

Idea. A one-step generator x_g = G(z), a copy of the teacher, is trained without data so that its
noised distribution matches the teacher's at every noise level, by a Fisher divergence between the
teacher D_phi and the denoiser D_psi* of the generator's own samples, x_t = x_g + sigma eps:
    J(theta) = E ||D_phi(x_t; sigma) - D_psi*(x_t; sigma)||^2.
A fake score D_psi, trained alongside G (EDM's loss on generator samples), stands in for D_psi*.
With eps_hat = (x_t - D) / sigma, Tweedie's E[eps | x_t] = eps_psi*(x_t) trades an eps_psi for eps:
    L1 = ||eps_phi - eps_psi||^2,   L2 = <eps_phi - eps_psi, eps_phi - eps>,   loss L2 - alpha L1.
In x0 form (eps_phi - eps_psi = (d_fake - d_real) / sigma, eps_phi - eps = (x_g - d_real) / sigma):
    sigma^2 (L2 - alpha L1) = (d_real - d_fake) . ((d_real - x_g) - alpha (d_real - d_fake)),
and SiD divides by w = sg(mean |x_g - d_real|) instead of sigma^2: what sid_generator_loss computes.
Why alpha = 0.5 is unbiased (identity 6, README.md "The maths, checked"): with the exact fake score
E[L1] = E[L2] = J for every theta, and with psi held fixed grad J = grad (2 L2 - L1), hence
    grad (L2 - alpha L1) = 1/2 grad J + (1/2 - alpha) grad L1|psi fixed:
alpha > 0.5 adds a push up the naive loss. The paper's 1.2 (kept on images) is empirical. The
identities need a weight of (sigma, x_t) alone; SiD's w also depends on x_g.

Paper -> code
    Algorithm 1: a fake-score update, then a generator update  -> train_iteration
    fake score: EDM loss on sg(G(z)), ln sigma ~ N(-1.2, 1.2^2) -> fake_loss, --fake-sigma
    G(z) = D_G(sigma_init z; sigma_init, c), sigma_init = 2.5   -> generator_loss, student_sigmas
    generator loss: sigma = Karras grid at u ~ U(0, t_max 0.8)  -> loss_sigma
    L2 - alpha L1, the w divisor; non-finite samples dropped    -> sid_generator_loss, finite_rows
    G and psi start as copies of the teacher (dropout kept)      -> build_networks
    Adam(0, 0.999) for G and psi, EMA of G (EDM's ramp-up)      -> main, common.ema_update
    the loop: learning_rates, train_iteration, ema_update, book.end_iteration  -> main

Deliberate deviations (mingyuanzhou/SiD files; "loop" is training/sid_training_loop.py)
    - Labels drawn uniformly (common.sample_labels); SiD reads them off the data (loop:314,340).
    - ImageNet-64: batch 256 at the paper's lr 4e-6, not 8192 (run_sid.sh:67).
    - Evaluations are FID-10k; the paper's are FID-50k (--resume --fid-samples 50000).
    - AMP: bf16 on CUDA; the authors' ImageNet-64 run is fp16 (run_sid.sh:79; --amp fp16).
    - No x100 generator-loss scale (sid_train.py:98, loop:348): Adam ignores a constant factor.
    - No augmentation of the fake loss's inputs (sid_train.py:72 AugmentPipe p 0.12, loop:321).
    - EMA ramp-up: half-life <= 0.05 x the images after this step; the authors', before (loop:364).
    - scaled_dot_product_attention for EDM's AttentionOp (edm networks.py:113): ~4e-7 relative.
    - A non-finite gradient skips the step (common.AmpOptimizer); nan_to_num zeroes it (loop:331).
    - toy2d: alpha 0.5, 3000 iterations, only G's lr decayed (assets/results.md#sid-toy-defaults).

Pitfalls (from SiD's issue tracker)
    - With alpha near 1 the loss is signed and hovers around 0: watch the metrics, not loss_g.
    - fp16 can diverge; prefer bf16 (the default on CUDA).

Shared pieces (common.py / unet.py): start_method, edm_loss, fake_sigma, karras_sigma, minimize,
ema_update, Bookkeeping, evaluate (FID), student_sampler, save_generator, export_samples, bench;
unet's EDM networks.

Commands
    python sid.py                                       # toy2d on the CPU, a few minutes
    python sid.py --dataset synthetic --resolution 16   # small conditional images, CPU
    python sid.py --dataset cifar10 --data-dir data     # one GPU (trains the teacher first)
    torchrun --nproc_per_node=8 sid.py --dataset imagenet64 --data-dir data/imagenet64
    python sid.py --dataset cifar10 --resume --fid-samples 50000   # the finished run's FID-50k
"""

import argparse
import copy
import time
from types import SimpleNamespace

import torch

import common
import unet

# ==================================================================================================
# LOSSES (pure functions of tensors; test_toy.py checks them against closed forms)
# ==================================================================================================

def sid_generator_loss(x_g, d_real, d_fake, alpha=1.2, weight=None):
    """SiD's generator loss per sample (B,), sigma^2 (L2 - alpha L1) / w in x0 form (the module
    docstring derives it), d_real = D_phi(x_t), d_fake = D_psi(x_t), x_t = x_g + sigma eps. w: SiD's
    sg(mean |x_g - d_real|) over the non-batch dimensions, or the given (B,) weight, used as given
    (sigma^2 gives L2 - alpha L1)."""
    if weight is None:
        with torch.no_grad():  # w = sg(mean_CHW |x_g - D_phi|), floored (a perfect sample)
            weight = (x_g - d_real).abs().flatten(1).mean(1).clamp_min(1e-5)  # (B,)
    w = common.column(weight, x_g)  # (B, 1, ..., 1)
    # sum_CHW (D_phi - D_psi) . ((D_phi - x_g) - alpha (D_phi - D_psi)) / w
    loss = (d_real - d_fake) * ((d_real - x_g) - alpha * (d_real - d_fake)) / w
    return loss.flatten(1).sum(1)  # (B,)


def finite_rows(*tensors):
    """SiD drops a sample with a non-finite value in any of the (B, ...) tensors before its loss
    is formed. Returns (keep (B,) bool, the tensors with the dropped rows zeroed by torch.where, so
    that backward sends them exact zeros; 0 * NaN would be NaN). A dropped sample adds 0 to the
    batch mean, as in the authors' code. With no sample left nothing is dropped: the loss is
    non-finite and the step is skipped."""
    keep = torch.stack([torch.isfinite(t).flatten(1).all(1) for t in tensors]).all(0)
    drop = ~keep & keep.any()  # (B,)
    return keep, [torch.where(drop.view(-1, *[1] * (t.ndim - 1)), 0.0, t) for t in tensors]


# ==================================================================================================
# NOISE LEVELS
# ==================================================================================================

def student_sigmas(args, steps=None):
    """The generator's input noise levels for common.generate: one, sigma_init (G(z) =
    D_G(sigma_init z; sigma_init)). SiD's generator has one step; `steps` keeps the signature."""
    return [float(args.sigma_init)]


def loss_sigma(n, args, device):
    """n noise levels of the generator loss (n,): the Karras grid at u ~ U(0, t_max), sigma =
    (smin^(1/rho) + u (smax^(1/rho) - smin^(1/rho)))^rho, in [0.002, ~24.4] at t_max = 0.8."""
    return common.karras_sigma(torch.rand(n, device=device) * args.t_max)


# ==================================================================================================
# NETWORKS (the generator and the fake score are copies of the teacher's EDMDenoiser)
# ==================================================================================================

def build_networks(args, info, teacher_net, device):
    """generator (theta), fake (psi) and ema (the generator that is evaluated and saved): copies
    of the teacher's network, dropout kept as in the authors' code."""
    def copy_of_teacher():
        return copy.deepcopy(teacher_net).to(device)

    return SimpleNamespace(generator=copy_of_teacher(), fake=copy_of_teacher(),
                           ema=copy_of_teacher())


# ==================================================================================================
# ONE TRAINING ITERATION
# ==================================================================================================

def train_iteration(args, info, dist, teacher, nets, opt_g, opt_f):
    """Algorithm 1 of the paper: a fake-score update, then a generator update. Each draws its noise
    for this rank's batch; common.minimize then steps on its per-sample loss (zero_grad, backward,
    step), handing it the network it trains first. Data-free: no real image. Returns the losses."""
    B, device = args.batch // dist.world, dist.device  # this rank's share of the batch

    # ---- 1. Fake score psi: EDM's denoising loss on generator samples (G fixed) ----
    def fake_loss(fake, x_g, labels, sigma, eps, keep):  # one round's rows
        # lambda(sigma) ||D_psi(x_g + sigma eps; sigma) - x_g||^2 on the kept samples
        loss = common.edm_loss(fake, x_g, labels, sigma, eps) * keep
        return {"loss_fake": loss, "nan_fake": ~keep}

    z = torch.randn(B, *info.shape, device=device)
    labels = common.sample_labels(info, B, device)  # data-free: labels only
    with torch.no_grad(), common.autocast(args, device):
        x_g = nets.generator(args.sigma_init * z, args.sigma_init, labels)  # G(z) = D_G(2.5 z; 2.5)
    keep, (x_g,) = finite_rows(x_g)  # SiD drops non-finite samples
    sigma = common.fake_sigma(B, args, device, loss_sigma)  # --fake-sigma: EDM's log-normal
    logs = common.minimize(opt_f, fake_loss, x_g=x_g, labels=labels, sigma=sigma,
                           eps=torch.randn_like(x_g), keep=keep)

    # ---- 2. Generator G: SiD's loss through x_t; teacher and fake score frozen ----
    def generator_loss(generator, z, labels, sigma, eps):  # one round's rows
        x_g = generator(args.sigma_init * z, args.sigma_init, labels)  # G(z) = D_G(2.5 z; 2.5, c)
        x_t = x_g + common.column(sigma, x_g) * eps
        d_real, d_fake = teacher(x_t, sigma, labels), nets.fake(x_t, sigma, labels)  # D_phi, D_psi
        keep, (x_g, d_real, d_fake) = finite_rows(x_g, d_real, d_fake)  # drop non-finite samples
        weight = sigma ** 2 if args.loss_weight == "sigma2" else None  # None: mean |x_g - D_phi|
        # sigma^2 (L2 - alpha L1) / w, back-propagated through x_t, D_phi and D_psi into theta
        loss = sid_generator_loss(x_g, d_real, d_fake, args.alpha, weight)
        return {"loss_g": loss, "nan_g": ~keep}

    z = torch.randn(B, *info.shape, device=device)  # fresh latents
    labels = common.sample_labels(info, B, device)
    eps = torch.randn(B, *info.shape, device=device)
    sigma = loss_sigma(B, args, device)  # (B,) in [0.002, ~24.4]
    return logs | common.minimize(opt_g, generator_loss, z=z, labels=labels, sigma=sigma, eps=eps)


# ==================================================================================================
# ARGUMENTS
# ==================================================================================================

METHOD = "sid"

# Per-dataset defaults of this method (argparse dests; the shared ones are common.DATASET_DEFAULTS):
# toy2d: alpha 0.5, 3000 iterations, only G's lr decayed (assets/results.md#sid-toy-defaults);
# synthetic: lrs, EMA and length so that it finishes on a CPU (assets/results.md#synthetic-16x16);
# cifar10: the authors' (run_sid.sh:38-59: batch 256, lr 1e-5, alpha 1.2; sid_train.py:70 EMA);
# imagenet64: the authors' lr 4e-6, EMA 2 Mimg (run_sid.sh:77,87,88), at batch 256 (theirs 8192).
METHOD_DEFAULTS = {
    "toy2d": dict(iters=3000, lr_g=3e-4, lr_f=1e-3, ema=50.0, eval_every=500, alpha=0.5,
                  lr_decay="cosine", fake_lr_decay=False),
    "synthetic": dict(iters=400, lr_g=1e-4, lr_f=3e-4, ema=2.0, eval_every=100, alpha=1.2,
                      fake_lr_decay=True),
    "cifar10": dict(iters=400000, batch=256, lr_g=1e-5, lr_f=1e-5, ema=500.0, alpha=1.2,
                    fake_lr_decay=True),
    "imagenet64": dict(iters=400000, batch=256, lr_g=4e-6, lr_f=4e-6, ema=2000.0, alpha=1.2,
                       fake_lr_decay=True),
}


def parse_args(argv=None):
    p = common.base_parser("SiD: one-step distillation of an EDM teacher by score identity "
                           "distillation.", method=METHOD)
    g = p.add_argument_group("sid")
    g.add_argument("--lr-g", type=common.POSITIVE, default=None,
                   help="generator Adam learning rate, betas (0, 0.999)")
    g.add_argument("--lr-f", type=common.POSITIVE, default=None,
                   help="fake-score Adam learning rate, betas (0, 0.999)")
    g.add_argument("--ema", type=common.NONNEGATIVE, default=None,
                   help="generator EMA half-life in kimg, capped at 5%% of the images seen so far "
                        "(EDM's ramp-up)")
    g.add_argument("--sigma-init", type=common.POSITIVE, default=2.5,
                   help="generator input noise level: G(z) = D_G(sigma_init * z; sigma_init)")
    g.add_argument("--alpha", type=common.FINITE, default=None,
                   help="generator loss L2 - alpha * L1 (paper 1.2, the image datasets' default; "
                        "0.5, the toy2d default, is unbiased with an optimal fake score)")
    g.add_argument("--t-max", type=common.checked(float, lambda v: 0 < v <= 1, "in (0, 1]"),
                   default=0.8, help="generator-loss noise levels: sigma = Karras grid at "
                                     "u ~ U(0, t_max) (0.8 -> sigma <= ~24)")
    g.add_argument("--loss-weight", default="mean-abs", choices=("mean-abs", "sigma2"),
                   help="the generator loss's per-sample divisor w: SiD's sg(mean |x_g - D_phi|), "
                        "or sigma^2 (then the loss is L2 - alpha L1 of the eps form, identity 6)")
    g.add_argument("--fake-lr-decay", action=argparse.BooleanOptionalAction, default=None,
                   help="apply --lr-decay to the fake score's lr too; with --no-fake-lr-decay only "
                        "the generator's lr decays and the fake score keeps its full lr")
    common.add_fake_sigma_flag(g, default="lognormal")
    return common.parse_args(p, METHOD_DEFAULTS, argv)


def learning_rates(args, step):
    """The learning rates of iteration `step`, decided here only: --lr-decay for the generator, and
    for the fake score unless --no-fake-lr-decay. Returns (lr_g, lr_f)."""
    decay_f = args.lr_decay if args.fake_lr_decay else "none"
    return (common.learning_rate(args.lr_g, step, args.iters, args.lr_decay),
            common.learning_rate(args.lr_f, step, args.iters, decay_f))


# ==================================================================================================
# MAIN
# ==================================================================================================

def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    dist, info, run, teacher, teacher_net = common.start_method(args)
    device = dist.device

    # The method's networks and optimizers: generator G and fake score D_psi, copies of the teacher.
    nets = build_networks(args, info, teacher_net, device)
    common.init_generator(args, nets.generator, nets.ema)  # --init-generator: a saved generator
    opt_g = common.optimizer([nets.generator], args, dist, lr=args.lr_g, betas=(0.0, 0.999))
    opt_f = common.optimizer([nets.fake], args, dist, lr=args.lr_f, betas=(0.0, 0.999))
    trained = {"generator": nets.generator, "fake": nets.fake}
    objects = {**trained, "ema": nets.ema, "opt_g": opt_g, "opt_f": opt_f}  # a checkpoint's content
    teacher = common.frozen(teacher, args)  # compiled with --compile

    def sampler(steps=None):  # the EMA generator's samples
        return common.student_sampler(nets.ema, student_sigmas(args, steps), args, device)

    if args.bench:  # time iterations and samplers, print one JSON line, write nothing
        iteration = lambda step: train_iteration(args, info, dist, teacher, nets, opt_g, opt_f)
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
            lr_g, lr_f = learning_rates(args, step)
            opt_g.set_lr(lr_g)
            opt_f.set_lr(lr_f)
            losses = train_iteration(args, info, dist, teacher, nets, opt_g, opt_f)
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
