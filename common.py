"""Everything the three distillation scripts share. Above the PLUMBING banner, what a reader of the
methods needs: exact Gaussian-mixture denoisers, EDM (preconditioning, loss, sigma grids, the Heun
sampler, the students' sampler), the metrics, the teacher's training, and the training loop's pieces
(one update: minimize; the EMA; the learning rate). Below it, what keeps runs safe, resumable and
fast: a reader of the methods can stop at the banner.

Notation as in README.md, "The maths, checked" (EDM's variance-exploding form, Karras et al. 2022):
    x_t = x0 + sigma eps,   D(x; sigma, c) ~ E[x0 | x_t = x],   score (D(x; sigma) - x) / sigma^2.

Run on its own, it trains (or loads) the teacher and evaluates its 35-NFE Heun sampler:
    python common.py --dataset toy2d                 # ~1 minute on 2 CPU cores
    python common.py --dataset synthetic --resolution 16
    python common.py --dataset cifar10 --data-dir data   # GPU; downloads CIFAR-10 on first use
    torchrun --nproc_per_node=8 common.py --dataset imagenet64 --data-dir data/imagenet64
and writes a saved generator's samples for other evaluators (EDM's PNG folders, the ADM .npz):
    python common.py --generator runs/cifar10-sid/generator.pt --export 50000 --export-dir samples

Sections, in file order (search for the banner):
    GAUSSIAN MIXTURES   GaussianMixture (exact denoiser, score, density), toy2d / synthetic mixtures
    EDM                 EDMDenoiser, AnalyticDenoiser, karras_sigma, grid_sigma, edm_sigma,
                        fake_sigma, edm_loss, heun_sample, generate (the students' sampler)
    METRICS             frechet_distance, sliced_w2, mixture_metrics
    DATA                DatasetInfo, sample_labels
    THE TEACHER         build_denoiser, train_teacher
    THE TRAINING LOOP   optimizer, minimize (one update), ema_update, learning_rate
    ## PLUMBING ##      errors, data loaders and files, the teacher's cache, NVIDIA's EDM
                        pickles, AMP and the optimizer (AmpOptimizer), bookkeeping, evaluation,
                        the frame of a method script, checkpoints, the run folder, arguments,
                        DDP, pictures, FID, --export, --bench, main
"""
import argparse
import collections
import contextlib
import copy
import functools
import gc
import hashlib
import importlib
import inspect
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._python_dispatch
from tqdm import tqdm

import unet

DATASETS = ("toy2d", "synthetic", "cifar10", "imagenet64")
SIGMA_DATA = 0.5  # EDM's sigma_data for data in [-1, 1]; also the 2-D toy's (its std is ~0.55)
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # EDM's sampling range and Karras grid exponent
F64 = torch.float64


# ==================================================================================================
# GAUSSIAN MIXTURES (exact denoisers)
# ==================================================================================================

class GaussianMixture:
    """p(x0) = sum_k w_k N(x0; mu_k, diag(v_k)) in any dimension D; v_k a scalar (isotropic) or a
    D-vector. Noising by sigma keeps it a mixture, p_sigma(x) = sum_k w_k N(x; mu_k, v_k + sigma^2),
    so everything is closed-form:
        responsibilities  r_k(x) = w_k N(x; mu_k, v_k + s^2) / sum_j w_j N(x; mu_j, v_j + s^2)
        denoiser          D(x; s) = E[x0 | x] = sum_k r_k(x) [mu_k + v_k / (v_k + s^2) (x - mu_k)]
        score             grad log p_s(x) = (D(x; s) - x) / s^2                      (Tweedie)
    With `labels`, the class-conditional versions use component labels[b] alone (r one-hot). Inputs
    are flat (B, D); sigma a float or a (B,) tensor; computed in x's dtype, on x's device."""

    def __init__(self, weights, means, variances):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        self.variances = torch.as_tensor(variances, dtype=torch.float64)  # (K,) or (K, D)
        self.isotropic = self.variances.ndim == 1
        self.num_components, self.dim = self.means.shape
        self._copies = {}  # (device, dtype) -> (weights, means, variances) there

    def _p(self, x):
        """(weights, means, variances) in x's dtype on x's device, copied there once: a copy from
        the host in every call would be a sync on CUDA."""
        key = (x.device, x.dtype)
        if key not in self._copies:
            self._copies[key] = tuple(t.to(x) for t in (self.weights, self.means, self.variances))
        return self._copies[key]

    def _sigma(self, sigma, x):
        return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])  # (B,)

    def component_log_prob(self, x, sigma=0.0):
        """log N(x; mu_k, v_k + sigma^2) for every component: (B, D) -> (B, K)."""
        _, mu, v = self._p(x)
        s2 = self._sigma(sigma, x) ** 2
        if self.isotropic:
            var = v[None, :] + s2[:, None]  # (B, K)
            d2 = (x * x).sum(1, keepdim=True) - 2 * x @ mu.T + (mu * mu).sum(1)[None, :]
            return -0.5 * (d2.clamp_min(0) / var + self.dim * torch.log(2 * math.pi * var))
        var = v[None] + s2[:, None, None]  # (B, K, D)
        d = x[:, None, :] - mu[None]
        return -0.5 * ((d * d / var).sum(-1) + torch.log(2 * math.pi * var).sum(-1))

    def responsibilities(self, x, sigma=0.0, labels=None):
        """p(k | x_sigma): (B, K); one-hot at the label when labels are given."""
        if labels is not None:
            return F.one_hot(labels.long(), self.num_components).to(x)
        w, _, _ = self._p(x)
        return torch.softmax(torch.log(w)[None] + self.component_log_prob(x, sigma), dim=1)

    def denoise(self, x, sigma, labels=None):
        """Exact posterior mean E[x0 | x_sigma = x]: (B, D) -> (B, D)."""
        _, mu, v = self._p(x)
        s2 = self._sigma(sigma, x) ** 2
        r = self.responsibilities(x, sigma, labels)  # (B, K)
        if self.isotropic:
            g = v[None, :] / (v[None, :] + s2[:, None])  # (B, K) shrinkage towards x
            return (r * (1 - g)) @ mu + (r * g).sum(1, keepdim=True) * x
        g = v[None] / (v[None] + s2[:, None, None])  # (B, K, D)
        return torch.einsum("bk,bkd->bd", r, (1 - g) * mu[None] + g * x[:, None, :])

    def score(self, x, sigma, labels=None):
        """grad_x log p_sigma(x) = (D(x; sigma) - x) / sigma^2 (Tweedie), sigma > 0."""
        s2 = self._sigma(sigma, x)[:, None] ** 2
        return (self.denoise(x, sigma, labels) - x) / s2

    def log_prob(self, x, sigma=0.0, labels=None):
        """log p_sigma(x) (or log p_sigma(x | c) with labels): (B, D) -> (B,)."""
        comp = self.component_log_prob(x, sigma)
        if labels is not None:
            return comp.gather(1, labels.long()[:, None])[:, 0]
        w, _, _ = self._p(x)
        return torch.logsumexp(torch.log(w)[None] + comp, dim=1)

    def sample(self, n, labels=None, generator=None, device="cpu", dtype=torch.float32):
        """n samples (n, D) and their component labels (n,), drawn on `device` by its RNG (training
        batches: no copy from the host), or on the CPU by `generator` (a fixed seed) and moved
        there; `labels` fixes the components."""
        where = torch.device("cpu") if generator is not None else torch.device(device)
        w, mu, v = self._p(torch.empty(0, dtype=F64, device=where))
        if labels is None:
            labels = torch.multinomial(w, n, replacement=True, generator=generator)
        labels = labels.to(where)
        std = v.sqrt()[labels]
        std = std[:, None] if self.isotropic else std
        noise = torch.randn(n, self.dim, generator=generator, dtype=F64, device=where)
        x = mu[labels] + std * noise
        return x.to(device=device, dtype=dtype), labels.to(device)

    def mean(self):
        return self.weights @ self.means  # (D,)

    def covariance(self):
        """Exact Cov[x0] = sum_k w_k (diag(v_k) + mu_k mu_k^T) - m m^T (float64, (D, D))."""
        v = self.variances[:, None].expand(-1, self.dim) if self.isotropic else self.variances
        m = self.mean()
        second = torch.einsum("k,kd,ke->de", self.weights, self.means, self.means)
        return torch.diag(self.weights @ v) + second - torch.outer(m, m)


def toy2d_mixture():
    """Eight modes on a ring of radius 0.8, weights 8:7:...:1, some elongated (diagonal)."""
    k = torch.arange(8, dtype=torch.float64)
    angle = 2 * math.pi * k / 8
    means = 0.8 * torch.stack([angle.cos(), angle.sin()], dim=1)
    weights = 8.0 - k
    std = torch.tensor([[0.06, 0.06], [0.09, 0.04], [0.05, 0.05], [0.04, 0.09],
                        [0.07, 0.07], [0.09, 0.05], [0.06, 0.06], [0.05, 0.08]], dtype=F64)
    return GaussianMixture(weights, means, std ** 2)


SYNTHETIC_NOISE_STD = 0.1


def synthetic_templates(resolution, num_classes=10, channels=3):
    """Ten smooth, distinct template images in [-0.8, 0.8], the same at every resolution: random
    low-frequency patterns (5x5 coefficients, bicubic upsampling) on a per-class base colour."""
    g = torch.Generator().manual_seed(20240501)
    coarse = torch.randn(num_classes, channels, 5, 5, generator=g, dtype=torch.float64)
    colour = torch.rand(num_classes, channels, 1, 1, generator=g, dtype=torch.float64) * 2 - 1
    img = F.interpolate(coarse, size=(64, 64), mode="bicubic", align_corners=True)
    img = 0.8 * torch.tanh(0.6 * img + 1.2 * colour)
    if resolution != 64:
        img = F.interpolate(img, size=(resolution, resolution), mode="area")
    return img  # (K, C, R, R)


def synthetic_mixture(resolution):
    """A miniature conditional CIFAR-10: x0 = template_c + N(0, 0.1^2 I), ten equally likely c."""
    t = synthetic_templates(resolution)
    variances = torch.full((len(t),), SYNTHETIC_NOISE_STD ** 2)
    return GaussianMixture(torch.ones(len(t)), t.flatten(1), variances)


# ==================================================================================================
# EDM: preconditioning, loss, sigma grids, samplers
# ==================================================================================================

def column(v, x):
    """A scalar or per-sample (B,) value viewed as (B, 1, ..., 1) to broadcast against x, in x's
    dtype: the shape every per-sample sigma or weight takes in the losses."""
    return torch.as_tensor(v, device=x.device).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _as_column(sigma, x):
    """sigma as a float32 (B,) tensor, and viewed as (B, 1, ..., 1) to broadcast against x."""
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.to(device=x.device, dtype=torch.float32).expand(x.shape[0])
    else:  # a number (a sampler's level): filled on the device, not copied from the host (a sync)
        sigma = torch.full((x.shape[0],), float(sigma), device=x.device)
    return sigma, sigma.reshape(-1, *([1] * (x.ndim - 1)))


class EDMDenoiser(nn.Module):
    """D(x; sigma, c) = c_skip x + c_out F(c_in x, c_noise, c), with sd = sigma_data and
        c_skip = sd^2 / (s^2 + sd^2),   c_out = s sd / sqrt(s^2 + sd^2),
        c_in = 1 / sqrt(s^2 + sd^2),    c_noise = ln(s) / 4.
    forward(x, sigma, labels=None, return_features=False) -> D (float32) [, the feature maps];
    features(x, sigma, labels=None) -> the feature maps alone (the UNet's encoder half only)."""

    def __init__(self, net, sigma_data=SIGMA_DATA):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def features(self, x, sigma, labels=None):
        sigma, s = _as_column(sigma, x)
        c_in = 1 / (s ** 2 + self.sigma_data ** 2).sqrt()
        labels = labels if self.net.num_classes else None
        return self.net.features(c_in * x, sigma.log() / 4, labels)

    def forward(self, x, sigma, labels=None, return_features=False):
        sigma, s = _as_column(sigma, x)
        sd = self.sigma_data
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log() / 4
        labels = labels if self.net.num_classes else None
        out = self.net(c_in * x, c_noise, labels, return_features=return_features)
        F_x, features = out if return_features else (out, None)
        D = c_skip * x + c_out * F_x.float()
        return (D, features) if return_features else D


class AnalyticDenoiser(nn.Module):
    """The exact posterior mean of a GaussianMixture with EDMDenoiser's call signature: a perfect
    teacher. Unconditional (ignores labels) unless cond=True. Float32, never autocast."""

    def __init__(self, mixture, shape, cond=False):
        super().__init__()
        self.mixture, self.shape, self.cond = mixture, tuple(shape), cond

    def forward(self, x, sigma, labels=None, return_features=False):
        if return_features:
            raise ValueError("the analytic denoiser has no features")
        with torch.autocast(x.device.type, enabled=False):
            sigma, _ = _as_column(sigma, x)
            D = self.mixture.denoise(x.float().flatten(1), sigma, labels if self.cond else None)
        return D.reshape(x.shape)


def karras_sigma(u, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """The Karras grid at u in [0, 1]: (smin^(1/rho) + u (smax^(1/rho) - smin^(1/rho)))^rho."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + u * (hi - lo)) ** rho


GRID = 1000  # DMD2's 1000-point Karras grid: index i -> karras_sigma(i / 999)


def grid_sigma(n, device, lo=0, hi=GRID - 1):
    """n noise levels (n,): index i ~ U{lo..hi} of the 1000-point grid, karras_sigma(i / 999)."""
    i = torch.randint(lo, hi + 1, (n,), device=device)
    return karras_sigma(i.float() / (GRID - 1))


def edm_sigma(n, device, P_mean=-1.2, P_std=1.2):
    """EDM's training noise levels (n,): ln sigma ~ N(P_mean, P_std^2)."""
    return (torch.randn(n, device=device) * P_std + P_mean).exp()


def fake_sigma(n, args, device, loss_sigma):
    """n noise levels of the fake score's EDM loss (n,), per --fake-sigma: EDM's log-normal, the
    1000-point grid, or the method's own loss_sigma(n, args, device)."""
    if args.fake_sigma == "lognormal":
        return edm_sigma(n, device)
    if args.fake_sigma == "grid":
        return grid_sigma(n, device)
    return loss_sigma(n, args, device)


def sampling_sigmas(steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, device="cpu"):
    """EDM's sampling schedule t_0 = sigma_max > ... > t_N-1 = sigma_min, t_N = 0 (float64)."""
    u = torch.linspace(1, 0, steps, dtype=torch.float64) if steps > 1 else torch.ones(1, dtype=F64)
    t = torch.cat([karras_sigma(u, sigma_min, sigma_max, rho), torch.zeros(1, dtype=F64)])
    return t.to(device)


def edm_loss(denoiser, x0, labels, sigma, eps, sigma_data=SIGMA_DATA):
    """EDM's denoising loss per sample (B,), summed over pixels, at the caller's draws sigma, eps:
        lambda(sigma) ||D(x0 + sigma eps; sigma, c) - x0||^2,  lambda = (s^2 + sd^2) / (s sd)^2."""
    s = column(sigma, x0)
    weight = (s ** 2 + sigma_data ** 2) / (s * sigma_data) ** 2
    return (weight * (denoiser(x0 + s * eps, sigma, labels) - x0) ** 2).flatten(1).sum(1)


def heun_nfe(steps):
    """Network evaluations of the Heun sampler: 2 per step, but 1 at the last step."""
    return 2 * steps - 1


@torch.no_grad()
def heun_sample(denoiser, z, labels=None, steps=18, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                rho=RHO, churn=0.0):
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Algorithm 1; with churn > 0,
    Algorithm 2's stochastic churn, S_noise = 1, over all sigmas). z ~ N(0, I); x_0 = sigma_max z.
        d_i = (x_i - D(x_i; t_i)) / t_i,   x_i+1 = x_i + (t_i+1 - t_i) d_i,   and if t_i+1 > 0:
        d' = (x_i+1 - D(x_i+1; t_i+1)) / t_i+1,   x_i+1 = x_i + (t_i+1 - t_i) (d_i + d') / 2."""
    t_host = sampling_sigmas(steps, sigma_min, sigma_max, rho)  # its tests stay on the host
    t = t_host.to(z.device)
    x = z.double() * t[0]
    for i in range(steps):
        t_cur, t_next = t[i], t[i + 1]
        if churn > 0:
            gamma = min(churn / steps, math.sqrt(2) - 1)
            t_hat = t_cur * (1 + gamma)
            x = x + (t_hat ** 2 - t_cur ** 2).sqrt() * torch.randn_like(x)
            t_cur = t_hat
        d = (x - denoiser(x.float(), t_cur.float(), labels).double()) / t_cur
        x_next = x + (t_next - t_cur) * d
        if t_host[i + 1] > 0:
            d2 = (x_next - denoiser(x_next.float(), t_next.float(), labels).double()) / t_next
            x_next = x + (t_next - t_cur) * (d + d2) / 2
        x = x_next
    return x.float()


def generate(generator, z, labels, sigmas, noise_generator=None, eps=None):
    """Every student's few-step sampler: x = sigma_0 z; at each level k, x0 = G(x; sigma_k, c), then
    x = x0 + sigma_k+1 eps; the last x0 is the sample. One level: x_g = G(sigma_0 z; sigma_0, c).
    eps: drawn with `noise_generator`, or given (one tensor per level after the first)."""
    x = sigmas[0] * z
    for k, sigma in enumerate(sigmas):
        x0 = generator(x, sigma, labels)  # (B, *shape)
        if k + 1 < len(sigmas):
            noise = eps[k].to(x0) if eps is not None else \
                torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=noise_generator)
            x = x0 + sigmas[k + 1] * noise
    return x0


def student_sampler(net, sigmas, args, device):
    """fn(z, labels, eps=None) -> samples of `net` (the EMA generator) by generate(), to
    evaluate: no gradient, --amp's autocast, re-noising from its own generator seeded from --seed
    (every evaluation sees the same noise; the training RNG streams are left alone) unless `eps`
    gives it (fid and --export draw each image's from its seed)."""
    noise_generator = torch.Generator(device=device).manual_seed(args.seed + 1)

    @torch.no_grad()
    def sample(z, labels, eps=None):
        with autocast(args, device):
            return generate(net, z, labels, sigmas, noise_generator, eps).float()
    sample.levels = len(sigmas)
    return sample


# ==================================================================================================
# METRICS on the built-in datasets (their exact densities) and the Frechet distance
# ==================================================================================================

def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): the Frechet (2-Wasserstein) distance of two
    Gaussians. float64, scipy.linalg.sqrtm, a small ridge when the product is near-singular (as the
    FID code does); NaN for non-finite statistics."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes do not match (mu {mu1.shape} / {mu2.shape}, "
                         f"cov {cov1.shape} / {cov2.shape})")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, cov1, cov2)):
        # sqrtm of a matrix with a NaN can run for ever; NaN statistics (a diverged model) give NaN
        warnings.warn("frechet_distance: non-finite mean or covariance (too few samples or "
                      "non-finite samples); returning NaN")
        return float("nan")
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        ridge = np.eye(len(cov1)) * 1e-6
        covmean = scipy.linalg.sqrtm((cov1 + ridge) @ (cov2 + ridge))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def sliced_w2(x, y, projections=256, seed=0):
    """Sliced 2-Wasserstein distance between two equal-size point sets (n, D): the root mean square,
    over random unit directions, of the 1-D W2 distance (sorted projections)."""
    n = min(len(x), len(y))
    x, y = x[:n].double(), y[:n].double()
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x.cpu() @ dirs, dim=0)
    py, _ = torch.sort(y.cpu() @ dirs, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def mixture_metrics(x, mixture, labels=None, seed=0):
    """Sample quality against the exact mixture; x (n, ...) flattened to (n, D). Each sample is
    assigned to the component of highest likelihood N(x; mu_k, v_k) ("nearest component").
        sw2        sliced W2 to fresh true samples (0 = perfect; compare two true sets of the size)
        mode_tv    total variation of the assigned shares and the weights, 0.5 sum_k |share_k - w_k|
        modes      components holding at least a quarter of their true share
        precision  share of samples inside their component's 99.9% ellipsoid (chi^2_D quantile)
        mode_w2    (D = 2) each mode's shape: the Gaussian W2 distance (the Frechet distance's root)
                   of the samples assigned to a component and fresh true samples assigned to it,
                   averaged with the weights over components holding >= 10 of each. sw2, mode_tv
                   and precision can look fine while every mode shrank to a spike; this cannot.
        fd         (D > 2) Frechet distance of the samples' mean / covariance to the exact ones
        class_acc  (with labels) share of samples assigned to the component of their label
        class_bias (D > 2, labels) where fd comes from, 1: the squared distance of each label's
                   sample mean to its component's mean, averaged over labels with >= 2 samples
                   (true samples: D v / n_k, e.g. 0.077 for 100 per class of synthetic 16)
        spread     (D > 2, labels) 2: the samples' variance around their label's mean over the true
                   within-component variance (1 right; below 1, samples too alike in a class)."""
    x = x.detach().flatten(1).double().cpu()
    n, D = x.shape
    comp = mixture.component_log_prob(x, 0.0)  # (n, K)
    assign = comp.argmax(1)
    share = torch.bincount(assign, minlength=mixture.num_components).double() / n
    w = mixture.weights
    # Mahalanobis^2 = -2 (log N - log-normaliser) for a diagonal Gaussian.
    v = mixture.variances[:, None].expand(-1, D) if mixture.isotropic else mixture.variances
    lognorm = -0.5 * torch.log(2 * math.pi * v).sum(1)
    maha2 = -2 * (comp.gather(1, assign[:, None])[:, 0] - lognorm[assign])
    true_x, _ = mixture.sample(n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    out = {
        "sw2": sliced_w2(x, true_x, seed=seed),
        "mode_tv": float(0.5 * (share - w).abs().sum()),
        "modes": int((share >= 0.25 * w).sum()),
        "precision": float((maha2 <= scipy.stats.chi2.ppf(0.999, D)).double().mean()),
    }
    if D == 2:
        true_assign = mixture.component_log_prob(true_x, 0.0).argmax(1)
        total, weight = 0.0, 0.0
        for k in range(mixture.num_components):
            a, b = x[assign == k], true_x[true_assign == k]
            if len(a) >= 10 and len(b) >= 10:
                fd = frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
                total, weight = total + float(w[k]) * math.sqrt(max(fd, 0.0)), weight + float(w[k])
        out["mode_w2"] = total / weight if weight else float("nan")
    if D > 2:
        out["fd"] = frechet_distance(x.mean(0), torch.cov(x.T), mixture.mean(),
                                     mixture.covariance())
    if labels is not None:
        labels = labels.cpu().long()
        out["class_acc"] = float((assign == labels).double().mean())
    if labels is not None and D > 2:
        bias, var, true_var, present = 0.0, 0.0, 0.0, 0
        for k in labels.unique().tolist():
            a = x[labels == k]
            if len(a) >= 2:
                bias += float(((a.mean(0) - mixture.means[k]) ** 2).sum())
                var += float(a.var(0).sum())
                true_var += float(v[k].sum())
                present += 1
        if present:
            out["class_bias"], out["spread"] = bias / present, var / true_var
    return out


# ==================================================================================================
# DATA: what a dataset is, and the labels drawn for it (the loaders: real_batches, below the banner)
# ==================================================================================================

@dataclass
class DatasetInfo:
    name: str
    shape: tuple  # (2,) or (C, H, W)
    num_classes: int  # classes in the data (0 if none)
    cond: bool  # whether the networks are class-conditional
    mixture: GaussianMixture = None  # exact data density for toy2d / synthetic

    @property
    def label_dim(self):
        return self.num_classes if self.cond else 0


def dataset_info(args):
    if args.dataset == "toy2d":
        m = toy2d_mixture()
        return DatasetInfo("toy2d", (2,), m.num_components, bool(args.cond), m)
    if args.dataset == "synthetic":
        r = args.resolution
        return DatasetInfo("synthetic", (3, r, r), 10, bool(args.cond), synthetic_mixture(r))
    if args.dataset == "cifar10":
        return DatasetInfo("cifar10", (3, 32, 32), 10, bool(args.cond))
    return DatasetInfo("imagenet64", (3, 64, 64), 1000, bool(args.cond))


def sample_labels(info, n, device):
    """n uniform class labels (n,) on the device for a conditional model, None otherwise."""
    return torch.randint(info.num_classes, (n,), device=device) if info.cond else None


def balanced_labels(info, n, device, offset=0):
    """Class-balanced labels to evaluate: offset, offset+1, ... mod K; None if unconditional."""
    if not info.cond:
        return None
    return torch.arange(offset, offset + n, device=device) % info.num_classes


# ==================================================================================================
# THE TEACHER: EDM's training
# ==================================================================================================

def build_denoiser(args, info):
    """A fresh EDM denoiser with the preset's network: the teacher's architecture."""
    return EDMDenoiser(unet.build_network(args.preset, info.shape, info.label_dim))


def train_teacher(args, info, dist, folder):
    """EDM's training (Karras et al. 2022, Sec. 5): Adam(0.9, 0.999), lr warm-up over
    --teacher-rampup kimg, EMA with --teacher-ema half-life, non-finite steps skipped, --amp.
    Resumable: an interrupted run continues from folder/ckpt.pt the next time the teacher is asked
    for. Writes folder/teacher.pt (the EMA)."""
    net = build_denoiser(args, info).to(dist.device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = optimizer([net], args, dist, lr=args.teacher_lr, betas=(0.9, 0.999), eps=1e-8)
    targs = copy.copy(args)
    targs.out_dir, targs.batch, targs.eval_every = str(folder), args.teacher_batch, 0
    targs.method, targs.lr_decay = "teacher", "none"  # the schedule is EDM's warm-up, below
    targs.resume = (folder / "ckpt.pt").is_file()
    targs.overwrite = not targs.resume
    targs.allow_changed_flags = True  # the folder is named by the config's hash: a resume fits
    data = real_batches(targs, info, dist)  # missing or unreadable data fails before the folder
    run = Run(targs, dist)
    objects = {"net": net, "ema": ema, "opt": opt}
    start = run.resume(objects)
    batch = args.teacher_batch

    if dist.is_main:
        print(f"training the teacher ({unet.count_params(net) / 1e6:.2f}M parameters) in {folder}")
    with Bookkeeping(targs, run, objects, lambda done: {}, start, args.teacher_iters, "teacher",
                     [opt]) as book:
        for step in range(start, args.teacher_iters):
            nimg = step * batch
            # EDM's schedule: a linear warm-up over --teacher-rampup kimg, then constant
            opt.set_lr(learning_rate(args.teacher_lr, step, args.teacher_iters, "none",
                                     max(args.teacher_rampup * 1000, 1e-8), nimg))
            x0, labels = next(data)
            # lambda(sigma) ||D(x0 + sigma eps; sigma) - x0||^2, ln sigma ~ N(-1.2, 1.2^2)
            losses = minimize(opt, edm_loss, x0=x0, labels=labels if info.cond else None,
                              sigma=edm_sigma(len(x0), dist.device), eps=torch.randn_like(x0))
            ema_update(ema, net, args.teacher_ema, batch, nimg=nimg + batch, rampup_ratio=0.05)
            book.end_iteration(step, losses)
    # every one of its last steps skipped (the whole run, or --max-skips of them) is a broken run; a
    # last step or two that fp16's loss scaler skipped on an overflow is not
    skipped = opt.skipped >= min(args.max_skips, args.teacher_iters) > 0
    problem = ruined({"teacher": ema}) or (skipped and f"its last {opt.skipped} steps were skipped")
    if problem:  # never cached: a later run would reuse it without training again
        raise UserError(f"teacher training in {folder}: {problem}; teacher.pt not written (is the "
                        f"data in --data-dir corrupt?)")
    if dist.is_main:
        save_checkpoint(folder / "teacher.pt", {"ema": ema}, args.teacher_iters,
                        {**teacher_config(args), "num_classes": info.label_dim})
    dist.barrier()


# ==================================================================================================
# THE TRAINING LOOP: one update, the EMA, the learning rate, and what a method's main() relies on
# ==================================================================================================
# Each method's main() writes its loop out (for step in range(start, args.iters): the learning
# rates, train_iteration, ema_update, book.end_iteration), and each train_iteration writes its
# updates as the draws, a per-sample loss and minimize. What they call besides (bodies below):
#   start_method(args) -> (dist, info, run, teacher, teacher_net): the processes (dist.device,
#       dist.world), the data (info.shape, info.cond), the run folder, the frozen teacher D_phi and
#       the network it is made of (the students' copies start from it).
#   AmpOptimizer, made by optimizer(): zero_grad / backward / step, with fp16's loss scaling, the
#       non-finite check (a step whose loss or gradient holds a NaN or an infinity is skipped on
#       every rank, and counted) and --grad-clip; set_lr(lr) for the coming steps.
#   autocast(args, device): --amp's autocast (bf16 / fp16), or nothing in fp32.
#   real_batches(args, info, dist): this rank's real (x0, labels) batches, forever.
#   Bookkeeping(...).end_iteration(step, losses): log, evaluate, checkpoint, signals, --max-skips.
#   evaluate, teacher_reference, save_generator, export_samples, bench: evaluation, the teacher's
#       reference samples, generator.pt, --export, --bench.

def optimizer(nets, args, dist, adamw=False, clip=None, compile=True, **adam_args):
    """An AmpOptimizer training `nets` (a list of modules): Adam, or AdamW with adamw=True (fused on
    CUDA), gradient norms clipped at `clip`, the networks' training passes through their DDP /
    compiled wrappers (compile=False: DDP only). Outside its updates its networks are frozen."""
    nets = [net.requires_grad_(True) for net in nets]  # DDP takes the parameters that require grad
    wrappers = [wrap(net, args, dist, compile) for net in nets]
    params = [p for net in nets for p in net.parameters()]
    opt = adam(params, dist.device, adamw, **adam_args)
    return AmpOptimizer(opt, args, dist.device, clip, nets, wrappers)


def minimize(opt, loss_fn, **draws):
    """One update of opt's networks down the batch mean of a per-sample loss: EDM's training loop
    (training_loop.py:123-148), written once for every update of the methods and the teacher:
        opt.zero_grad()
        for each round of at most --batch-gpu rows (one round by default):  # under --amp autocast
            losses = loss_fn(*networks, **the round's rows of every draw)
            opt.backward(losses[first].mean() * rows / batch)  # DDP syncs in the last round only
        opt.step()                   # skipped, and counted, if the loss or a gradient is non-finite
    loss_fn gets opt's networks (their DDP / compiled wrappers; trainable, in train mode, while
    every other network is frozen, in eval mode), then the draws by name: (B, ...) tensors drawn for
    the whole batch, or None. It returns per-sample losses (b,), or a dict of them whose first entry
    is minimised. Returns each entry's batch mean (device tensors, for the log)."""
    return opt.minimize(loss_fn, draws)


@torch.no_grad()
def ema_update(ema, net, halflife_kimg, batch, nimg=None, rampup_ratio=None):
    """EMA with a half-life in images: beta = 0.5^(batch / halflife); with rampup_ratio (EDM's 0.05)
    the half-life is capped at rampup_ratio * the images seen, so early averages forget fast."""
    halflife = halflife_kimg * 1000
    if rampup_ratio is not None and nimg is not None:
        halflife = min(halflife, nimg * rampup_ratio)
    beta = 0.5 ** (batch / max(halflife, 1e-8))
    # ema <- ema + (1 - beta) (net - ema): all tensors in one foreach call, not one launch each
    params = list(ema.parameters())
    if params:
        torch._foreach_lerp_(params, list(unwrap(net).parameters()), 1 - beta)
    buffers = list(ema.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(unwrap(net).buffers()))


def lr_decay_factor(decay, step, total):
    """--lr-decay's factor at iteration `step` of `total`: 1 ('none'), or a cosine from 1 to 0."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total)) if decay == "cosine" else 1.0


def learning_rate(lr, step, total, decay="none", warmup=0, warmed=0):
    """The learning rate of an update at iteration `step` of `total`, the one place it is decided:
        lr * min(1, warmed / warmup) * lr_decay_factor(decay, step, total),
    a linear warm-up from 0 (none when warmup is 0; `warmed` counts in the warm-up's unit: DMD2's
    fake-score updates, the teacher's images) times --lr-decay's factor."""
    if warmup:
        lr = lr * min(1.0, warmed / warmup)
    if decay != "none":
        lr = lr * lr_decay_factor(decay, step, total)
    return lr


# ##################################################################################################
# PLUMBING: not needed to learn the methods. Everything below keeps runs safe, resumable and fast: errors, data
# loaders and files, the teacher's cache, NVIDIA's EDM pickles, AMP and the optimizer, bookkeeping, evaluation, the
# frame of a method script, checkpoints, the run folder, arguments, processes (DDP), pictures, FID, --export,
# --bench, main.
# ##################################################################################################


# ==================================================================================================
# ERRORS: a user's mistake is one line and exit code 2
# ==================================================================================================

class UserError(Exception):
    """A problem with the user's input (flags, files, data). Printed as one line; exit code 2."""


def _reason(e, limit=160):
    """An exception as a short clause for a one-line error: its type and the first sentence of its message."""
    text = (str(e).strip().splitlines() or [""])[0]
    text = text.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {text[:limit]}"


def run_main(main, argv=None):
    """Call main(argv); turn a UserError into one clear line on stderr and exit code 2 (no traceback soup). After a
    --bench on CUDA, also measure the fp32 / bf16 / compiled variants in this process (bench_compare)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        result = main(argv)
        if isinstance(result, dict) and result.get("device_type") == "cuda" and result.get("compare"):
            bench_compare(main, argv, result)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, torch.OutOfMemoryError) as e:
        print(f"error: out of memory ({_reason(e)}); lower --batch, --eval-samples or --fid-samples", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the disk filled up, a file vanished, a device failed: the message says which file
        print(f"error: {_reason(e)}{f' ({e.filename})' if e.filename else ''}", file=sys.stderr)
        sys.exit(2)


def write_atomically(path, write, sync=False):
    """write(tmp) into NAME.tmp beside `path` (or `write`, a str, as its text), then rename it to NAME:
    a kill or a full disk never leaves half a file under its final name, and a failed write leaves
    no temporary file (its error is raised again). sync: fsync the file before the rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(write, str):
            tmp.write_text(write)
        else:
            write(tmp)
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def lock(path, wait=True):
    """An exclusive flock on the file `path` (created if missing), held as long as the open file this
    returns is (the kernel drops it when the process ends, however it ends); None where file locks
    are not available (not Linux / macOS). wait=False: an OSError if another process holds it."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        f.close()
        raise
    return f


# ==================================================================================================
# DATA LOADERS: the mixtures, CIFAR-10, ImageNet-64 (npz or class folders)
# ==================================================================================================

def _mixture_batches(mixture, info, batch, device):
    while True:
        x, labels = mixture.sample(batch, device=device)
        yield x.reshape(batch, *info.shape), labels


def _tensor_batches(images, labels, batch, device, flip):
    """uint8 images (N, C, H, W) -> random batches in [-1, 1] forever (with replacement). The whole set moves to the
    device once (CIFAR-10: 150 MB) and the indices are drawn there, so no batch waits on a copy from the host."""
    images, labels = images.to(device), labels.to(device)
    n = len(images)
    while True:
        idx = torch.randint(n, (batch,), device=device)
        x = images[idx].float() / 127.5 - 1
        if flip:
            x = torch.where(torch.rand(batch, 1, 1, 1, device=device) < 0.5, x.flip(3), x)
        yield x, labels[idx]


def load_cifar10(data_dir):
    """CIFAR-10 train split as uint8 (50000, 3, 32, 32) and labels; torchvision downloads it on first use."""
    import torchvision
    try:
        ds = torchvision.datasets.CIFAR10(root=data_dir, train=True, download=True)
    except Exception as e:  # no network, bad folder, corrupt archive
        raise UserError(f"CIFAR-10 is not in {data_dir!r} and could not be downloaded ({_reason(e)}). "
                        f"Put cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) in "
                        f"{data_dir!r} or pass --data-dir") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(ds.targets, dtype=torch.long)


def check_image_arrays(path, shape, dtype, labels=None):
    """A downsampled-ImageNet batch as this project reads it, or a UserError naming the file and the problem:
    `data` uint8 (N, 12288) with N > 0 (its .npy header's shape and dtype), `labels` N integers in 1..1000."""
    problem = None
    if dtype != np.uint8:
        problem = f"'data' is {dtype}, expected uint8 pixels 0..255"
    elif len(shape) != 2 or shape[1] != 3 * 64 * 64:
        problem = f"'data' has shape {shape}, expected (N, 12288) for 64x64 ImageNet"
    elif shape[0] == 0:
        problem = "'data' holds no images"
    elif labels is not None and (labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer)):
        problem = f"'labels' is {labels.dtype} of shape {labels.shape}, expected N integers"
    elif labels is not None and len(labels) != shape[0]:
        problem = f"{len(labels)} labels for {shape[0]} images"
    elif labels is not None and (labels.min() < 1 or labels.max() > 1000):
        problem = f"labels range {labels.min()}..{labels.max()}, expected 1..1000"
    if problem:
        raise UserError(f"{path}: {problem}; download it again or remove it from --data-dir")


def _folder_batches(data_dir, batch, device, workers, rank):
    """A folder of class subfolders of images (torchvision ImageFolder), center-cropped and resized to 64."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    tf = T.Compose([_center_crop_square, T.Resize(64, interpolation=T.InterpolationMode.LANCZOS), T.PILToTensor()])
    try:  # checked now, not at the first batch: a run folder is only created once its inputs are known good
        ds = ImageFolder(data_dir, transform=tf)
        ds[0]
    except Exception as e:  # no class folder, no image file, an unreadable first image
        raise UserError(f"imagenet64: {str(data_dir)!r} is not a readable folder of class subfolders of images "
                        f"({_reason(e)})") from None
    gen = torch.Generator().manual_seed(rank)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=2**62, generator=gen)
    # on CUDA the loader pins its batches, which then copy to the GPU without blocking the host
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda")

    def batches():
        try:
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                yield x.float() / 127.5 - 1, y
        except (OSError, ValueError, RuntimeError) as e:  # an unreadable image found later (PIL, worker errors)
            raise UserError(f"imagenet64: reading {str(data_dir)!r} failed ({_reason(e)}); remove or replace the "
                            f"broken image") from None

    return batches()


def _center_crop_square(img):
    """Center crop to the short side (a square), before resizing to 64x64."""
    import torchvision.transforms.functional as TF
    return TF.center_crop(img, min(img.size))


def real_batches(args, info, dist):
    """Infinite iterator of (x in [-1, 1] of shape (B, *shape), labels (B,)) per rank (B = batch / world)."""
    batch, device = args.batch // dist.world, dist.device
    if info.mixture is not None:
        return _mixture_batches(info.mixture, info, batch, device)
    if args.dataset == "cifar10":
        images, labels = load_cifar10(args.data_dir)
        return _tensor_batches(images, labels, batch, device, flip=True)
    root = Path(args.data_dir)
    if not root.is_dir():
        raise UserError(f"imagenet64: {str(root)!r} is not a folder. Put the downsampled ImageNet 64x64 npz batches "
                        f"(train_data_batch_1.npz ...) or class subfolders of images there, or pass --data-dir")
    if any(root.glob("*.npz")):
        images, labels = load_imagenet64_npz(root, args.data_cache)
        return _mapped_batches(images, labels, batch, device)
    if any(p.is_dir() for p in root.iterdir()):
        return _folder_batches(root, batch, device, args.workers, dist.rank)
    raise UserError(f"imagenet64: no *.npz files and no class subfolders in {str(root)!r}. Put the downsampled "
                    f"ImageNet 64x64 train_data_batch_*.npz files (https://image-net.org/download-images, 'Downsampled "
                    f"ImageNet 64x64') or a folder of class subfolders of images there, or pass --data-dir")


# ==================================================================================================
# DATA FILES: ImageNet-64's npz batches converted once into memory-mapped .npy files
# ==================================================================================================

# The downsampled ImageNet-64 train set is 1,281,167 images, 15.7 GB as uint8. npz files are zip archives, so reading
# them means loading them: each process would hold the whole set (and twice that while concatenating), 8 ranks over
# 120 GB. Instead the npz files are converted once, a chunk at a time, into one uint8 .npy of shape (N, 3, 64, 64)
# and a labels .npy, beside them or in --data-cache, with a manifest of the sources (names, sizes, modification times):
# a changed source converts again. Every process opens the .npy as a read-only memory map (np.load(mmap_mode="r"):
# its shape, and where its rows are) and reads each batch's rows from the file (_read_rows): the pages live once, in
# the kernel's page cache, shared by all ranks on the machine, and a process holds a few batches, whatever the data
# size. Measured in assets/results.md (ImageNet-64 host memory); tested by
# test_imagenet64_host_memory_does_not_grow_with_the_data.
IMAGENET64_FILES = ("imagenet64-images.npy", "imagenet64-labels.npy", "imagenet64-manifest.json")
ROW_BYTES = 3 * 64 * 64  # one image, planar RGB
CONVERT_ROWS = 1024  # rows per read while converting (12.6 MB)


def _converted(cache, manifest):
    """Whether `cache` holds a finished conversion of exactly these sources."""
    images, labels, recorded = (cache / name for name in IMAGENET64_FILES)
    try:
        old = json.loads(recorded.read_text())
        rows = old.pop("rows")
        return (old == manifest and np.load(images, mmap_mode="r").shape == (rows, 3, 64, 64)
                and np.load(labels, mmap_mode="r").shape == (rows,))
    except (OSError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def _npz_data(f):
    """The `data` member of an npz file (np.savez or np.savez_compressed) as an open stream, left at its first row,
    and its row count, read from its .npy header and checked (check_image_arrays)."""
    try:
        archive = zipfile.ZipFile(f)
        member = archive.open("data.npy")
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {f} as a downsampled-ImageNet batch ({_reason(e)}); download it again or "
                        f"remove it from --data-dir") from None
    with archive, member:
        try:
            version = np.lib.format.read_magic(member)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, fortran, dtype = read(member)
        except (ValueError, KeyError) as e:
            raise UserError(f"cannot read {f} as a downsampled-ImageNet batch ({_reason(e)}); download it again or "
                            f"remove it from --data-dir") from None
        check_image_arrays(f, shape, dtype)
        if fortran:
            raise UserError(f"{f}: 'data' is stored in Fortran order; expected the official files' C order")
        yield member, shape[0]


def checked_row_counts(sources):
    """Every npz file's row count, read from its header, after checking the file (check_image_arrays: the data's
    dtype and shape from the header, the labels in full, which are small): bad data stops before anything is written."""
    counts = []
    for f in sources:
        with _npz_data(f) as (_, count):  # the header alone, checked
            pass
        try:
            with np.load(f) as d:
                labels = np.asarray(d["labels"])
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"cannot read the labels of {f} ({_reason(e)}); download it again or remove it from "
                            f"--data-dir") from None
        check_image_arrays(f, (count, ROW_BYTES), np.uint8, labels)
        counts.append(count)
    return counts


def convert_imagenet64(sources, cache, manifest):
    """Stream the npz files' rows, CONVERT_ROWS at a time, into cache/imagenet64-images.npy (a .npy header, then
    the rows as they are: planar RGB rows are (3, 64, 64) images in C order) and their labels - 1 into
    imagenet64-labels.npy (int16), each written atomically; the manifest goes first and comes back last, so an
    interrupted conversion is never taken for a finished one."""
    images_path, labels_path, manifest_path = (cache / name for name in IMAGENET64_FILES)
    counts = checked_row_counts(sources)  # the output's header, which holds the row count, comes before its rows
    n = sum(counts)
    if shutil.disk_usage(cache).free < n * ROW_BYTES * 1.01:
        raise UserError(f"converting ImageNet-64 needs {n * ROW_BYTES / 1e9:.1f} GB in {cache}, which has "
                        f"{shutil.disk_usage(cache).free / 1e9:.1f} GB free; pass --data-cache DIR")
    manifest_path.unlink(missing_ok=True)  # an older conversion is no longer a finished one
    labels = []

    def write_images(tmp):
        with open(tmp, "wb") as out:
            header = {"descr": "|u1", "fortran_order": False, "shape": (n, 3, 64, 64)}
            np.lib.format.write_array_header_1_0(out, header)
            bar = tqdm(total=n, unit="img", desc=f"converting {len(sources)} npz files into {images_path}")
            for f, count in zip(sources, counts):
                with _npz_data(f) as (member, _):
                    for start in range(0, count, CONVERT_ROWS):
                        chunk = member.read(min(CONVERT_ROWS, count - start) * ROW_BYTES)
                        if len(chunk) != min(CONVERT_ROWS, count - start) * ROW_BYTES:
                            raise UserError(f"{f} is truncated; download it again")
                        out.write(chunk)
                        bar.update(len(chunk) // ROW_BYTES)
                with np.load(f) as d:
                    labels.append((np.asarray(d["labels"], dtype=np.int64) - 1).astype(np.int16))
            bar.close()

    def write_labels(tmp):
        with open(tmp, "wb") as out:
            np.save(out, np.concatenate(labels))

    write_atomically(images_path, write_images, sync=True)
    write_atomically(labels_path, write_labels)
    write_atomically(manifest_path, json.dumps({**manifest, "rows": n}, indent=1) + "\n")


def load_imagenet64_npz(data_dir, cache_dir=None):
    """The official downsampled ImageNet 64x64 batches (train_data_batch_*.npz, or any *.npz) in data_dir: `data` uint8
    (N, 12288) planar RGB, `labels` 1..1000. Returns uint8 images (N, 3, 64, 64), a read-only memory map of one .npy
    converted from the npz files into cache_dir (default: data_dir) on first use and whenever its manifest does not
    match them, so that no process holds a copy of the 15.7 GB set, and int16 labels 0..999 (2 bytes an image, in
    memory). Every rank may call it: the first to take the lock converts, the others wait for it."""
    sources = sorted(Path(data_dir).glob("train_data_batch_*.npz")) or sorted(Path(data_dir).glob("*.npz"))
    cache = Path(cache_dir or data_dir)
    # what a conversion is made of: the source folder and each npz file's name, size and modification time
    stats = [(f.name, f.stat()) for f in sources]
    manifest = {"format": 1, "source_dir": str(Path(data_dir).resolve()),
                "sources": [{"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns} for name, st in stats]}
    if not _converted(cache, manifest):
        checked_row_counts(sources)  # before the cache folder or its lock is written
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # one process converts while the others wait, however many ranks or runs start at once
        with lock(cache / ".imagenet64.lock") or contextlib.nullcontext():
            if not _converted(cache, manifest):
                convert_imagenet64(sources, cache, manifest)
    except OSError as e:
        if not _converted(cache, manifest):  # a read-only folder is fine once it holds the conversion
            raise UserError(f"cannot write the converted ImageNet-64 into {cache} ({_reason(e)}); pass "
                            f"--data-cache DIR, a writable folder") from None
    return np.load(cache / IMAGENET64_FILES[0], mmap_mode="r"), np.load(cache / IMAGENET64_FILES[1])


def _read_rows(array, rows, out):
    """out[j] = array[rows[j]] for a memory-mapped .npy `array` and sorted `rows`, read from its file with os.preadv,
    each run of consecutive rows in one call, straight into `out` (C-contiguous). Gathering through the map instead
    (np.take) maps whole page-cache folios around each row into the process, where they stay and count in its
    resident set (measured: +26 MB a batch of 64, 2.6 GB after 100 batches of a 2.9 GB file; assets/results.md); a
    read maps nothing. Where os.preadv is missing (Windows), through the map."""
    if not hasattr(os, "preadv"):
        return np.take(array, rows, axis=0, out=out)
    row = array.strides[0]
    flat = out.reshape(len(rows), -1).view(np.uint8)  # (B, row bytes)
    fd = os.open(array.filename, os.O_RDONLY)
    try:
        j = 0
        while j < len(rows):
            k = j + 1
            while k < len(rows) and rows[k] == rows[k - 1] + 1:
                k += 1
            if os.preadv(fd, [flat[j:k]], array.offset + int(rows[j]) * row) != (k - j) * row:
                raise UserError(f"{array.filename} is shorter than its header says; delete it to convert again")
            j = k
    finally:
        os.close(fd)
    return out


def _mapped_batches(images, labels, batch, device):
    """Memory-mapped uint8 images (N, 3, H, W) and labels (N,) -> random batches in [-1, 1] forever (with
    replacement). The indices are sorted (neighbouring rows share pages) and the rows read into a staging buffer
    (_read_rows). On CUDA the staging buffers are pinned and copied with non_blocking=True, two of them in turn: a
    buffer is refilled only once the copy that read it has finished (its event), long since the case one batch later."""
    n, cuda = len(images), device.type == "cuda"
    slots = [[torch.empty(batch, *images.shape[1:], dtype=torch.uint8, pin_memory=cuda),
              torch.empty(batch, dtype=torch.int16, pin_memory=cuda), None] for _ in range(2 if cuda else 1)]
    for k in itertools.cycle(range(len(slots))):
        x_host, labels_host, copied = slots[k]
        if copied is not None:
            copied.synchronize()
        idx = torch.randint(n, (batch,)).sort().values.numpy()
        _read_rows(images, idx, x_host.numpy())
        np.take(labels, idx, out=labels_host.numpy())
        x = x_host.to(device, non_blocking=True).float() / 127.5 - 1  # new tensors: the buffers are free again
        y = labels_host.to(device, non_blocking=True).long()
        if cuda:
            slots[k][2] = torch.cuda.Event()
            slots[k][2].record()
        yield x, y


# ==================================================================================================
# THE TEACHER'S CACHE: trained once per data, network and settings; or loaded
# ==================================================================================================

TEACHER_KEYS = ("dataset", "resolution", "preset", "cond", "teacher_iters", "teacher_batch", "teacher_lr",
                "teacher_ema", "teacher_rampup", "teacher_seed")


def teacher_config(args):
    """What a trained teacher is made of (its cache key): data, network preset and layout, training flags."""
    cfg = {**{k: getattr(args, k) for k in TEACHER_KEYS}, "layout": unet.layout_version(args.preset)}
    if args.dataset == "imagenet64":
        cfg["data"] = data_identity(args.data_dir)
    return cfg


def data_identity(data_dir):
    """What identifies a user's ImageNet-64 files (part of the teacher's cache key, so that a teacher trained on other
    data is never reused): the npz files' names and sizes and a hash of their first and last 64 KiB, or the class
    folders' names and file counts. (CIFAR-10 needs none: torchvision checks its archive's MD5.)"""
    root, h = Path(data_dir), hashlib.sha256()
    files = sorted(root.glob("*.npz")) if root.is_dir() else []
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name} {size}\n".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(65536))
            fh.seek(max(0, size - 65536))
            h.update(fh.read(65536))
    if not files and root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            h.update(f"{d.name} {sum(1 for _ in d.iterdir())}\n".encode())
    return h.hexdigest()[:16]


def teacher_folder(args):
    """runs/teachers/<dataset><res>-<preset>-<cond|uncond>-<hash of the training config>/"""
    cfg = teacher_config(args)
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    res = "" if args.dataset == "toy2d" else str(args.resolution)
    return Path(args.teacher_dir) / f"{args.dataset}{res}-{args.preset}-{'cond' if args.cond else 'uncond'}-{key}"


def load_teacher_file(path, args, info):
    """A trained teacher (EMA weights) from a teacher.pt, checked against this run's data and network flags."""
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    for key in ("dataset", "resolution", "preset", "cond"):
        if key in cfg and cfg[key] != getattr(args, key):
            raise UserError(f"teacher {path} was trained with {key}={cfg[key]!r} but this run has "
                            f"{key}={getattr(args, key)!r}")
    if cfg.get("layout", 1) != unet.layout_version(args.preset):
        raise UserError(f"teacher {path} has an earlier layout of the {args.preset!r} network; train it again "
                        f"(delete it, or pass --teacher auto)")
    net = build_denoiser(args, info)
    restore({"ema": net}, ckpt, path)
    return net


def load_or_train_teacher(args, info, dist):
    """Returns (teacher, teacher_net):
        teacher      the frozen D_phi the method distils from: the trained network, or with --teacher analytic
                     the exact mixture denoiser;
        teacher_net  the trained EDMDenoiser (frozen, eval) that the method's networks are copied from.
    --teacher auto trains the teacher once into --teacher-dir (keyed by dataset, network and training config)
    and loads it from there afterwards; --teacher PATH loads a given teacher.pt; --teacher edm downloads NVIDIA's
    pretrained EDM network for the dataset into --teacher-dir (once) and --teacher PATH.pkl loads such a pickle,
    both without running any code from it (load_edm_pickle)."""
    if args.teacher == "edm" or is_edm_pickle(args.teacher):
        path = fetch(edm_download_key(args), args.teacher_dir, dist) if args.teacher == "edm" else \
            verified_file(args.teacher)
        teacher_net = load_edm_pickle(path, args, info)
    else:
        path = teacher_file(args)  # --teacher auto / analytic: the cached teacher.pt, trained first if missing
        if args.teacher in ("auto", "analytic") and not path.is_file():
            train_teacher(args, info, dist, path.parent)
        teacher_net = load_teacher_file(path, args, info)
    teacher_net = teacher_net.to(dist.device).eval().requires_grad_(False)
    teacher = AnalyticDenoiser(info.mixture, info.shape, cond=info.cond) if args.teacher == "analytic" else teacher_net
    # Reseed: training the teacher here (rather than loading it from the cache) must not change the run after it.
    seed_everything(args.seed + dist.rank)
    return teacher, teacher_net


# ==================================================================================================
# NVIDIA'S PRETRAINED EDM NETWORKS (restricted unpickler)
# ==================================================================================================

# NVIDIA's pretrained EDM networks, loaded safely. EDM's pickles (torch_utils.persistence) hold their classes' Python
# source and rebuild every network object by running it; an ordinary unpickling of such a file runs whatever code it
# names. Here a restricted unpickler admits only what carries weights: tensors and their storages (read from the
# storages' own serialised bytes by a second restricted reader), plain containers, and EDM's persistent objects, each
# of which becomes an inert record of its class name and attribute dict (its source is never compiled). Any other
# global in the file is refused before anything runs. The weights are then copied, by name, into this project's
# layer-for-layer copy of EDM's network (unet.SongUNet / unet.DhariwalUNet), built from the init arguments recorded in
# the pickle and checked against the run.
EDM_PRESETS = {"cifar10": "edm-cifar10", "imagenet64": "edm-imagenet64"}  # --teacher edm: dataset -> network preset


def edm_download_key(args):
    """The DOWNLOADS key of NVIDIA's EDM network for this run (--teacher edm)."""
    return f"edm-{args.dataset}-{'cond' if args.cond else 'uncond'}"


def is_edm_pickle(teacher):
    return str(teacher).endswith(".pkl")


class _Persistent:
    """An EDM persistent object as data: its class name and its attribute dict (parameters, buffers, submodules,
    init arguments). Made in place of running the class's recorded source."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state


class _Inert:
    """Stands in for a torch.nn container class named in the pickle (ModuleDict, ...): it keeps the state the
    pickle gives it and runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _InertDict(dict):
    """Stands in for a dict subclass named in the pickle (dnnlib's EasyDict)."""

    def __setstate__(self, state):
        pass


def _persistent_object(meta):
    """torch_utils.persistence._reconstruct_persistent_obj, without compiling meta['module_src']."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("a persistent object without a class record")
    return _Persistent(str(meta.get("class_name")), meta["state"])


class _TensorBox:
    """A tensor read from the pickle, boxed: the file cannot call a tensor's own methods on it (a BUILD opcode on a
    bare tensor would run Tensor.__setstate__, which can resize its storage at will)."""
    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a state given to a tensor")


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 on a flat storage: a copy of the strided view, which may not hold more
    elements than its storage (a zero-stride view of a tiny storage would otherwise allocate without bound)."""
    if not isinstance(storage, _TensorBox):
        raise pickle.UnpicklingError("a tensor without a storage")
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if len(size) != len(stride) or min(size + stride, default=0) < 0 or math.prod(size) > storage.tensor.numel():
        raise pickle.UnpicklingError(f"a tensor of size {size} and stride {stride} that its storage cannot hold")
    return _TensorBox(torch.as_strided(storage.tensor, size, stride, int(storage_offset)).clone())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_NUMPY_NUMBERS = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


class _NumpyDtype:
    """numpy.dtype as named in a pickle, for plain numbers only (EDM's networks record np.sqrt(0.5) and the like
    among their init arguments): its code ('f8', ...) and, from the pickled state, its byte order."""

    def __init__(self, code, align=False, copy=True):
        if code not in _NUMPY_NUMBERS:
            raise pickle.UnpicklingError(f"a numpy dtype {code!r} that is not a plain number")
        self.code, self.order = code, "<"

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "=")):
            raise pickle.UnpicklingError("a numpy dtype with an unreadable state")
        self.order = state[1].replace("=", "<" if sys.byteorder == "little" else ">")


def _numpy_scalar(dtype, data):
    """numpy.core.multiarray.scalar: a plain Python number from its dtype and raw bytes."""
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar that is not a plain number")
    dt = np.dtype(dtype.code).newbyteorder(dtype.order if dtype.order != "|" else "=")
    if len(data) != dt.itemsize:
        raise pickle.UnpicklingError("a numpy scalar of the wrong size")
    return np.frombuffer(data, dtype=dt)[0].item()


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool, "UntypedStorage": torch.uint8}


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the names in ALLOWED (module, name) -> stand-in; anything else raises
    pickle.UnpicklingError naming the global, before it is looked up."""
    ALLOWED = {}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module.startswith("torch.nn.modules.") and name[:1].isupper():
            return _Inert  # a torch container class (ModuleDict, ModuleList, ...): its state only
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


class _StorageUnpickler(_RestrictedUnpickler):
    """Reads a storage's serialised bytes (torch's legacy format, what a pickled storage holds): the record that
    names its dtype and key, then the raw data. Only torch's storage classes may be named."""
    ALLOWED = {("torch", name): name for name in _STORAGE_DTYPES}

    def persistent_load(self, pid):
        kind, storage_type, key, location, numel = pid[:5]
        if kind != "storage" or storage_type not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unexpected storage record {kind!r} {storage_type!r}")
        self.records[key] = _STORAGE_DTYPES[storage_type]
        return key


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def _storage_from_bytes(data):
    """torch.storage._load_from_bytes without torch.load: the storage as a flat tensor of its dtype."""
    f = io.BytesIO(data)
    plain = _RestrictedUnpickler
    if plain(f).load() != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("a storage without torch's legacy magic number")
    plain(f).load()  # protocol version
    sys_info = plain(f).load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise pickle.UnpicklingError("a storage written on a big-endian machine")
    reader = _StorageUnpickler(f)
    reader.records = {}
    key = reader.load()
    tensors = {}
    for k in plain(f).load():
        dtype = reader.records[k]
        numel = int.from_bytes(f.read(8), "little")
        raw = f.read(numel * torch.empty((), dtype=dtype).element_size())
        tensors[k] = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    return _TensorBox(tensors[key])


class _EDMUnpickler(_RestrictedUnpickler):
    ALLOWED = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("dnnlib.util", "EasyDict"): _InertDict,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy < 2 writes this name, numpy 2 the next
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("numpy", "dtype"): _NumpyDtype,
    }


def _collect_weights(obj, prefix="", out=None):
    """The parameters and persistent buffers of a network held as records, by dotted name (a state dict)."""
    out = {} if out is None else out
    state = obj.state if isinstance(obj, (_Persistent, _Inert)) else {}
    for name, p in (state.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.tensor  # a _TensorBox (anything else fails here, and is reported as corrupt)
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, b in (state.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b.tensor
    for name, m in (state.get("_modules") or {}).items():
        if m is not None:
            _collect_weights(m, prefix + name + ".", out)
    return out


def read_edm_pickle(path):
    """The 'ema' network of an EDM pickle as records: (the EDMPrecond record, its network record). Refuses, with one
    line, a file that names any other global, a truncated or foreign file, and one that is not an EDMPrecond."""
    try:
        with open(path, "rb") as f:
            data = _EDMUnpickler(f).load()
    except Exception as e:  # a global refused; a truncated file, bad opcodes, a storage that does not parse
        if isinstance(e, pickle.UnpicklingError) and "is not allowed" in str(e):
            raise UserError(f"{path}: refused, the pickle names {str(e).split()[1]}, which none of NVIDIA's EDM "
                            f"network files needs (nothing in it was run)") from None
        raise UserError(f"{path} is corrupt or not an EDM network pickle ({_reason(e)}); replace it with a good copy "
                        f"or delete it and let --teacher edm download it again") from None
    precond = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(precond, _Persistent) or precond.class_name != "EDMPrecond":
        found = precond.class_name if isinstance(precond, _Persistent) else type(precond).__name__
        raise UserError(f"{path}: its 'ema' network is {found}, not EDMPrecond (the preconditioning of NVIDIA's "
                        f"edm-*.pkl networks, which this project's EDMDenoiser implements)")
    model = (precond.state.get("_modules") or {}).get("model")
    if not isinstance(model, _Persistent) or model.class_name not in unet.UNETS:
        raise UserError(f"{path}: the network inside is not one of {sorted(unet.UNETS)}")
    return precond, model


def edm_denoiser_from_pickle(path, info):
    """NVIDIA's EDM network (an edm-*.pkl) as this project's EDMDenoiser, loading its weights and nothing else. The
    preconditioning (EDMPrecond, sigma_data 0.5), the image size and channels, the label dimension and the sigma
    range come from the pickle's recorded init arguments and must fit the data (`info`); the network is unet's copy
    of EDM's class, built from its recorded init arguments."""
    precond, model = read_edm_pickle(path)
    p = precond.state
    expected = {"img_resolution": info.shape[-1], "img_channels": info.shape[0], "label_dim": info.label_dim,
                "sigma_data": SIGMA_DATA}
    for key, want in expected.items():
        if p.get(key) != want:
            raise UserError(f"{path}: the network has {key}={p.get(key)!r} but this run needs {want!r} (--dataset, "
                            f"--resolution, --cond)")
    if not (float(p.get("sigma_min", 0)) <= SIGMA_MIN and float(p.get("sigma_max", math.inf)) >= SIGMA_MAX):
        raise UserError(f"{path}: the network covers sigma in [{p.get('sigma_min')}, {p.get('sigma_max')}], not "
                        f"EDM's sampling range [{SIGMA_MIN}, {SIGMA_MAX}]")
    try:
        kwargs = dict(model.state.get("_init_kwargs") or {})
        net = unet.UNETS[model.class_name](**kwargs)
        net.load_state_dict(_collect_weights(model), strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        raise UserError(f"{path}: its {model.class_name} does not load into this project's copy of EDM's network "
                        f"({_reason(e)})") from None
    return EDMDenoiser(net).eval()


def load_edm_pickle(path, args, info):
    """edm_denoiser_from_pickle, checked to be exactly the network of the run's --preset (the architecture that the
    method's copies, its checkpoints and load_generator build)."""
    teacher_net = edm_denoiser_from_pickle(path, info)
    with torch.device("meta"):
        reference = unet.build_network(args.preset, info.shape, info.label_dim)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    if shapes(reference) != shapes(teacher_net.net):
        raise UserError(f"{path}: its {type(teacher_net.net).__name__} is not the network of --preset {args.preset}; "
                        f"pass the preset that builds it (--teacher edm picks "
                        f"{EDM_PRESETS.get(args.dataset, 'an edm-* preset')})")
    return teacher_net


# ==================================================================================================
# AMP AND OPTIMIZERS: autocast, Adam, --batch-gpu's default, AmpOptimizer (the body of minimize)
# ==================================================================================================

def amp_dtype(args, device):
    """Resolve --amp: auto -> bf16 on GPUs that compute in bf16 natively (compute capability 8.0 and later: A100,
    H100, RTX 30xx on), fp32 elsewhere. Older GPUs (V100, T4) run bf16 emulated, slowly, though
    torch.cuda.is_bf16_supported() says yes; fp16 needs loss scaling and diverged in SiD's and DMD2's authors' runs,
    so auto does not choose it there (--amp fp16 asks for it). Returns None for fp32."""
    mode = args.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[mode]


def autocast(args, device):
    """Context manager for the forward passes: autocast to bf16/fp16, or a no-op in fp32."""
    dtype = amp_dtype(args, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def adam(params, device, adamw=False, **kw):
    """torch.optim.Adam (AdamW with adamw=True) updating all tensors at once: fused kernels on CUDA, foreach on the
    CPU (one call per group of tensors instead of a Python loop over them)."""
    # the CPU's foreach Adam is bit-identical to torch's loop over tensors (its fused kernel differs by ~1e-7), so
    # the CPU's measured trajectories stay those of the plain loop; on CUDA, fused skips a step on the device
    mode = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return (torch.optim.AdamW if adamw else torch.optim.Adam)(params, **kw, **mode)


# What an update holds on a GPU, for --batch-gpu's default (test_batch_gpu_estimate_matches_what_an_update_holds):
# the activations one forward saves for backward, per sample (MiB, fp32, the networks' weights excluded; measured on
# the CPU with saved_tensors_hooks; bf16 needs less), times the graphs the largest update of a method holds at once
# (SiD's generator step: generator, teacher and fake score); and the fp32 copies of the network's parameters held
# throughout: 4 per trained network (weights, gradients, Adam's two moments), 1 per EMA and per frozen teacher.
ACTIVATION_MIB = {"mlp": 0.013, "mlp-wide": 0.027, "tiny": 0.297, "small": 2.38, "cifar10": 43.7,
                  "imagenet64": 160.0, "edm-cifar10": 129.1, "edm-imagenet64": 771.4}
GRAPHS = {"sid": 3, "dmd2": 2, "add": 2, "teacher": 1}
COPIES = {"sid": 10, "dmd2": 10, "add": 6, "teacher": 5}  # SiD, DMD2: 2 trained + EMA + teacher; ADD: 1 + 2


@functools.lru_cache(maxsize=None)
def _parameter_count(preset, shape, classes):
    with torch.device("meta"):  # counted without allocating anything
        return unet.count_params(unet.build_network(preset, shape, classes))


def update_memory(args, rows):
    """The estimated peak bytes of one rank's update at `rows` rows per round: COPIES x the network's parameter bytes
    + rows x ACTIVATION_MIB x GRAPHS."""
    shape = (2,) if args.dataset == "toy2d" else (3, args.resolution, args.resolution)
    classes = {"toy2d": 8, "synthetic": 10, "cifar10": 10, "imagenet64": 1000}[args.dataset] if args.cond else 0
    static = COPIES.get(args.method, 10) * _parameter_count(args.preset, shape, classes) * 4
    return static + rows * ACTIVATION_MIB[args.preset] * 2 ** 20 * GRAPHS.get(args.method, 3)


def fitting_batch_gpu(args, device, world):
    """--batch-gpu's default: on CUDA, the most rows per round whose update_memory fits 7/8 of the GPU's memory (70
    GiB of an 80 GB card); None (the rank's whole share in one round) when the share fits, and on the CPU."""
    if device.type != "cuda":
        return None
    budget = torch.cuda.get_device_properties(device).total_memory * 7 / 8
    per_row = update_memory(args, 1) - update_memory(args, 0)
    rows = int((budget - update_memory(args, 0)) / per_row)
    return max(rows, 1) if rows < args.batch // world else None


class AmpOptimizer:
    """An optimizer with its own GradScaler (fp16 only), the networks it trains and the check every update needs:
    zero_grad(), backward(loss) once per --batch-gpu round, step() (minimize runs the three). A step whose loss or
    gradients hold a NaN or an infinity is skipped (parameters and optimizer state untouched) and counted toward
    --max-skips; under torchrun every rank skips together. The decision stays on the device: a fused optimizer (on
    CUDA) reads it in its kernel, so an update makes no host-device sync; other optimizers (the CPU's foreach Adam,
    bit-identical to the loop) and fp16 read it on the host."""

    def __init__(self, optimizer, args, device, clip=None, nets=(), wrappers=None):
        self.opt, self.clip, self.args, self.device = optimizer, clip, args, device
        # the networks this optimizer trains, and the modules their training passes go through (DDP / compiled)
        self.nets, self.wrappers = list(nets), list(wrappers or nets)
        self.training(False)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(args, device) == torch.float16)
        # fused kernels take a found_inf tensor and skip the step themselves (torch's GradScaler protocol)
        self.on_device = getattr(optimizer, "_step_supports_amp_scaling", False) and not self.scaler.is_enabled()
        self.found = torch.zeros((), device=device)  # 1 once this step's loss or a gradient is non-finite
        self.one = torch.ones((), device=device)
        self.streak = torch.zeros((), device=device)  # consecutive skipped steps, on the device
        self.longest = torch.zeros((), device=device)  # the longest streak since Bookkeeping last looked
        self.idle_scaler_state = {}  # an fp16 run's loss scale, kept through a resumed run that does not use it
        self.lr = optimizer.param_groups[0]["lr"]  # the learning rate set_lr last asked for

    def set_lr(self, lr):
        """The learning rate of the coming steps, as the loop's schedule decides it (learning_rate)."""
        self.lr = float(lr)

    def training(self, flag):
        """Its networks trainable (requires_grad, train mode: dropout) with flag, else frozen and in eval mode:
        gradients still flow through their inputs, as another update's frozen networks need."""
        for net in self.nets:
            net.train(flag)
            for p in net.parameters():
                p.requires_grad_(flag)

    def minimize(self, loss_fn, draws):
        """The body of common.minimize (see there). Gradient accumulation (--batch-gpu): each round's loss is its
        rows' mean times its share rows / batch, so that the rounds' backward passes sum to the batch's gradient;
        every round but the last runs inside DDP's no_sync() (forward and backward), so the gradients are
        all-reduced once, in the last round's backward, as the SiD authors' loop (sid_training_loop.py)."""
        batch = next(len(v) for v in draws.values() if v is not None)
        size, logged = self.args.batch_gpu or batch, {}
        self.training(True)
        self.zero_grad()
        for start in range(0, batch, size):
            rows = slice(start, min(start + size, batch))
            with contextlib.ExitStack() as stack:
                for net in self.wrappers if rows.stop < batch else ():
                    net = getattr(net, "_orig_mod", net)  # DDP under torch.compile
                    if isinstance(net, nn.parallel.DistributedDataParallel):
                        stack.enter_context(net.no_sync())
                with autocast(self.args, self.device):
                    losses = loss_fn(*self.wrappers, **{k: None if v is None else v[rows] for k, v in draws.items()})
                losses = losses if isinstance(losses, dict) else {"loss": losses}
                share = (rows.stop - rows.start) / batch
                means = {k: v.mean(dtype=torch.float32) * share for k, v in losses.items()}
                self.backward(next(iter(means.values())))
            for k, v in means.items():
                logged[k] = logged.get(k, 0.0) + v.detach()
        self.step()
        self.training(False)
        return logged

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)
        self.found.zero_()

    def backward(self, loss):
        """loss.backward() into this optimizer's parameters (scaled by the GradScaler under fp16); a non-finite loss
        marks the coming step() to be skipped. Called once per round of --batch-gpu."""
        self.found.add_(~torch.isfinite(loss.detach()).all())  # on the device: no sync
        self.scaler.scale(loss).backward()

    def step(self):
        """Skip the step if its loss or gradients were non-finite, else clip the gradients (--grad-clip) and step."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        if self.scaler.is_enabled():  # fp16: gradients divided by the loss scale, overflow found by the scaler
            self.scaler.unscale_(self.opt)
            for found in self.scaler._per_optimizer_states[id(self.opt)]["found_inf_per_device"].values():
                self.found.add_(found.to(self.found.device))
        else:  # one multi-tensor kernel over all gradients: found = 1 if any is non-finite (each multiplied by 1)
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found, self.one)
        if torch.distributed.is_initialized():  # every rank skips together (a collective on the device, no sync)
            torch.distributed.all_reduce(self.found, op=torch.distributed.ReduceOp.MAX)
        self.found.clamp_(max=1)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)  # foreach norms, no sync
        if self.on_device:  # the fused kernel skips the update and leaves its state when found_inf = 1
            self.opt.found_inf = self.found
            try:
                self.opt.step()
            finally:
                del self.opt.found_inf
        elif not bool(self.found):  # a host read: free on the CPU, one sync under fp16 on a GPU
            self.scaler.step(self.opt)
        if self.scaler.is_enabled():
            self.scaler.update()
        self.streak.add_(1).mul_(self.found)  # +1 if skipped, else back to 0
        torch.maximum(self.longest, self.streak, out=self.longest)

    @property
    def skipped(self):
        """Consecutive steps skipped so far (reading it is a host sync on a GPU)."""
        return int(self.streak)

    def longest_streak(self):
        """The longest run of consecutive skipped steps since the last call (one host read); Bookkeeping asks this
        every --log-every iterations, so that no run of skips between two looks goes unseen."""
        longest = int(self.longest)
        self.longest.copy_(self.streak)
        return longest

    def state_dict(self):
        scaler = self.scaler.state_dict() if self.scaler.is_enabled() else self.idle_scaler_state
        return {"opt": self.opt.state_dict(), "scaler": scaler, "skipped": self.skipped}

    def load_state_dict(self, state):
        """Restore the optimizer, the loss scale and the skip count. A checkpoint may cross precisions: fp16 -> fp32
        keeps the fp16 loss scale aside (saved again with this run's checkpoints), and fp32 -> fp16 starts a fresh
        scale when the checkpoint has none."""
        # the checkpoint's param groups carry the saving machine's fused / foreach flags (a CPU run's foreach, a CUDA
        # run's fused): this optimizer keeps its own, so that its state lands where its step() needs it
        mode = {k: self.opt.defaults[k] for k in ("fused", "foreach", "capturable") if k in self.opt.defaults}
        opt_state = dict(state["opt"], param_groups=[{**g, **mode} for g in state["opt"]["param_groups"]])
        self.opt.load_state_dict(opt_state)
        if not self.scaler.is_enabled():
            self.idle_scaler_state = dict(state["scaler"])
        elif state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.streak.fill_(int(state.get("skipped", 0)))  # a resumed run keeps counting toward --max-skips
        self.longest.copy_(self.streak)


@functools.lru_cache(maxsize=None)
def constant(table, device):
    """table() (a function of no argument, e.g. ADD's noise-level tables) as float32 on `device`,
    made once per device: a copy from the host in every iteration would be a sync on CUDA."""
    return table().to(device=device, dtype=torch.float32)


def set_dropout(net, p):
    """Set the dropout rate of every nn.Dropout in a network (e.g. 0: DMD2 trains its copies of the teacher without
    the teacher's dropout). Returns the network."""
    for m in unwrap(net).modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    return net


# ==================================================================================================
# BOOKKEEPING: log, evaluate, checkpoint, signals, skipped steps
# ==================================================================================================

class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the end of the current iteration and exits."""

    def __init__(self):
        self.raised, self.old = None, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        self.raised = signum

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


# A parameter this large means a ruined model, not a trained one (the networks here work with weights of order 1):
# such a model is never saved over a good checkpoint.
RUINED = 1e6


def ruined(objects):
    """Why the networks in `objects` must not be checkpointed (a non-finite parameter, or one above RUINED), or
    None. One host sync per network."""
    for name, obj in objects.items():
        if isinstance(obj, nn.Module):
            params = [p.detach() for p in obj.parameters()]
            if not params:
                continue
            peak = float(torch.stack([p.abs().max() for p in params]).max())
            if not math.isfinite(peak):
                return f"{name} has non-finite parameters"
            if peak > RUINED:
                return f"{name} has a parameter of size {peak:.3g}"
    return None


class Bookkeeping:
    """Everything around a training iteration that is not the method (a context for the loop of each main()):
    end_iteration(step, losses) logs the losses every --log-every, evaluates with evaluate(done) -> dict every
    --eval-every and at the end, checkpoints `objects` every --ckpt-every, at the end and on SIGINT / SIGTERM to any
    rank (then every rank exits with 128 + the signal, at the same iteration), and stops the run after --max-skips
    consecutive steps that the `optimizers` skipped (looked at when it logs or checkpoints), or when a checkpoint
    would hold a ruined model, keeping the last good checkpoint. A finished run that is resumed (e.g. with
    --fid-samples 50000) is evaluated on entry and trains no further. `metrics`: the latest evaluation."""

    def __init__(self, args, run, objects, evaluate, start, total=None, desc="train", optimizers=()):
        self.args, self.run, self.objects, self.evaluate = args, run, objects, evaluate
        self.start, self.total = start, args.iters if total is None else total
        self.desc, self.optimizers = desc, list(optimizers)
        self.metrics = {}
        self.stop, self.bar, self.t0 = _StopFlag(), None, time.time()

    def __enter__(self):
        if self.start >= self.total:  # a finished run, resumed: evaluate it again, no training
            if self.run.dist.is_main:
                print(f"{self.desc}: already at iteration {self.start} of {self.total}; evaluating")
            self._evaluate_and_log(self.start)
            return self
        self.stop.__enter__()
        self.bar = tqdm(initial=self.start, total=self.total, desc=self.desc, disable=not self.run.dist.is_main,
                        dynamic_ncols=True)
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
            self.stop.__exit__(*exc)

    def _evaluate_and_log(self, done):
        metrics = self.evaluate(done)
        if metrics:
            self.metrics = dict(metrics)
            self.run.log({"iter": done, **{f"eval/{k}": v for k, v in metrics.items()}, **fid_ref_record(self.args,
                                                                                                        metrics)})
            if self.run.dist.is_main:
                tqdm.write(f"{self.desc} {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                           + fid_note(self.args, metrics))

    def _check_skips(self, done):
        """Stop after --max-skips consecutive skipped steps (the streaks live on the device: one host read, made only
        when logging or saving, over the longest streak since the last look)."""
        bad = max((o.longest_streak() for o in self.optimizers), default=0)
        if bad >= self.args.max_skips:
            raise UserError(f"{self.desc}: {bad} consecutive steps were skipped for a non-finite loss or gradient "
                            f"(seen at iteration {done}); stopped without saving. {self.run.last_good()}")

    def end_iteration(self, step, losses):
        """The bookkeeping after iteration `step` (0-based) with its losses: log, evaluate, signals, skip-stop,
        checkpoint."""
        args, run, desc, done = self.args, self.run, self.desc, step + 1
        self.bar.update(1)
        log = done % args.log_every == 0 or done == self.total
        if log:
            self._check_skips(done)
            record = {k: float(v) for k, v in losses.items()}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items()})
            run.log({"iter": done, "time": round(time.time() - self.t0, 2), **record})
        if (args.eval_every and done % args.eval_every == 0) or done == self.total:
            self._evaluate_and_log(done)
        # a signal to any rank stops every rank here, at this iteration, with one checkpoint (the ranks agree on the
        # largest signal number received, 0 for none: one all_reduce of one number on the host)
        signum = run.dist.max(self.stop.raised or 0)
        if done % args.ckpt_every == 0 or done == self.total or signum:
            if not log:
                self._check_skips(done)
            problem = ruined(self.objects)
            if problem:  # the checkpoint before stays: a ruined model never replaces a good one
                raise UserError(f"{desc}: at iteration {done} {problem}; not saved. {run.last_good()}")
            run.save(self.objects, done)
        if signum:
            if run.dist.is_main:
                print(f"\n{desc}: signal {signum} received; checkpoint saved at iteration {done} in "
                      f"{run.ckpt_path}. Continue with --resume.", file=sys.stderr)
            run.dist.barrier()
            sys.exit(128 + signum)


# ==================================================================================================
# EVALUATION: sample a generator on fixed latents, score it, draw it
# ==================================================================================================

@torch.no_grad()
def sample_many(fn, info, n, batch, device, seed, desc="sampling"):
    """Run a sampler fn(z, labels) -> x over n fixed latents z ~ N(0, I) (drawn on the CPU from `seed`, so every
    device and every method sees the same z) with class-balanced labels. Returns (x (n, *shape) on CPU, labels)."""
    g = torch.Generator().manual_seed(seed)
    z_all = torch.randn(n, *info.shape, generator=g)
    labels_all = balanced_labels(info, n, "cpu")
    out = []
    for i in tqdm(range(0, n, batch), desc=desc, leave=False, disable=n <= batch):
        z = z_all[i:i + batch].to(device)
        labels = None if labels_all is None else labels_all[i:i + batch].to(device)
        out.append(fn(z, labels).float().cpu())
    return torch.cat(out), labels_all


def teacher_sampler(teacher, steps):
    """The teacher's reference sampler as fn(z, labels): Heun from x = sigma_max z, `steps` steps (18 -> 35 NFE)."""
    return lambda z, labels: heun_sample(teacher, z, labels, steps=steps)


def evaluate(args, info, fn, dist, run=None, step=None, tag="student", reference=None, batch=None):
    """Sample args.eval_samples points with fn(z, labels), score them against the exact mixture (toy2d, synthetic)
    and save a picture next to `reference` samples (e.g. the teacher's, from the same z); with --fid-samples, add the
    FID (every rank must call this then). Returns (metrics, x)."""
    x, labels = sample_many(fn, info, args.eval_samples, batch or max(args.batch, 256), dist.device, args.seed + 999,
                         desc=f"eval {tag}")
    metrics = mixture_metrics(x, info.mixture, labels) if info.mixture is not None else {}
    if args.fid_samples:
        metrics.update(fid(args, info, fn, dist))
    if run is not None and run.dist.is_main:
        name = f"{tag}-{step:06d}.png" if step is not None else f"{tag}.png"
        save_picture(run.file(name), info, x, reference)
    return metrics, x


# ==================================================================================================
# THE FRAME OF A METHOD SCRIPT: what sid.py, dmd2.py and add.py do before and after their own training
# ==================================================================================================

def start_method(args):
    """The start of every method's main(): processes and device, the dataset, the run folder (which refuses to
    overwrite an existing run) and the teacher. Returns (dist, info, run, teacher, teacher_net); with --bench,
    run is None and the teacher has random weights."""
    dist = init_distributed(args)
    info = dataset_info(args)
    if dist.is_main:
        print(json.dumps(vars(args), indent=1, sort_keys=True))
    if args.bench:  # a random-weight teacher, no run folder: --bench writes nothing
        return (dist, info, None, *bench_networks(args, info, dist))
    if args.fid_samples and not args.export:
        fid_reference(args, info, dist)  # fetch, verify and load the FID files now, not hours into training
        if dist.is_main:
            print(f"FID reference statistics: {fid_ref_label(args)} (--fid-ref {args.fid_ref})")
    if args.teacher not in ("auto", "analytic", "edm"):
        # a given teacher file is loaded (and checked against the run) before anything is written
        teacher, teacher_net = load_or_train_teacher(args, info, dist)
        run = Run(args, dist)
    else:
        # the run folder is checked before a teacher is trained (hours) or downloaded
        run = Run(args, dist)
        teacher, teacher_net = load_or_train_teacher(args, info, dist)
    return dist, info, run, teacher, teacher_net


def teacher_reference(args, info, teacher, run):
    """The teacher's Heun samples (--teacher-steps; 18 steps = 35 NFE) from the evaluation latents: the reference
    metrics (logged as teacher/*, printed) and the left half of every picture. Sampled once per teacher, sampler and
    evaluation settings and cached beside the teacher, so a restart or a --resume does not sample the teacher
    again (load_teacher_reference). Returns (metrics, samples, nfe)."""
    nfe, dist = heun_nfe(args.teacher_steps), run.dist
    cache = teacher_reference_cache(args, info, dist)  # (file, key)
    cached = load_teacher_reference(cache, dist)
    if cached is None:
        metrics, x = evaluate(args, info, teacher_sampler(unwrap(teacher), args.teacher_steps), dist, run=run,
                              tag=f"teacher-{nfe}nfe")
        save_teacher_reference(cache, dist, metrics, x)
    else:
        metrics, x = cached
        if dist.is_main:
            save_picture(run.file(f"teacher-{nfe}nfe.png"), info, x)
    if metrics:
        if not any('"teacher/' in line for line in run.kept_metrics or []):  # logged once per run, not per resume
            run.log({**{f"teacher/{k}": v for k, v in metrics.items()}, **fid_ref_record(args, metrics)})
        if dist.is_main:
            print(f"teacher ({nfe} NFE{', cached' if cached else ''}): "
                  + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + fid_note(args, metrics))
    return metrics, x, nfe


def describe(dist, method, trained, sigmas, iters):
    """One line at the start of training: the trained networks' sizes, the student's input sigmas, the length."""
    if dist.is_main:
        sizes = ", ".join(f"{k} {unet.count_params(v) / 1e6:.3g}M" for k, v in trained.items())
        sigmas = [round(float(x), 4) for x in sigmas]
        print(f"{method}: {sizes} parameters; student sigmas {sigmas}; {iters} iterations")


def generator_meta(args, info, sigmas, method=None):
    """What a generator.pt holds besides its weights, so that load_generator rebuilds and samples it with neither the
    run's flags nor its method file: the network's class and init arguments (unet.network_spec), sigma_data, the
    data's shape and classes, the student's input sigmas (its sampler: generate at these levels) and the method."""
    network, kwargs = unet.network_spec(args.preset, info.shape, info.label_dim)
    return {"network": network, "network_kwargs": kwargs, "sigma_data": SIGMA_DATA,
            "sigmas": [float(s) for s in sigmas], "shape": list(info.shape), "num_classes": info.num_classes,
            "cond": info.cond, "dataset": args.dataset, "method": method or args.method}


def save_generator(args, info, run, ema, sigmas):
    """The final (EMA) generator, alone, with generator_meta, as run.dir/generator.pt; load_generator reads it."""
    if run.dist.is_main:
        save_checkpoint(run.dir / "generator.pt", {"generator": ema}, args.iters, vars(args),
                        meta=generator_meta(args, info, sigmas))
    run.dist.barrier()


def init_generator(args, generator, ema):
    """--init-generator: load a saved generator's weights into the student and its EMA (not on --resume, whose
    checkpoint holds both). A generator of another preset, resolution or conditioning is a UserError."""
    if args.init_generator and not args.resume:
        ckpt = load_checkpoint(args.init_generator)
        restore({"generator": generator}, ckpt, args.init_generator)
        restore({"generator": ema}, ckpt, args.init_generator)


def load_generator(path, device="cpu"):
    """A saved generator.pt as (net, meta): the frozen EMA generator, rebuilt from what the file records (loaded with
    weights_only, so nothing in it runs), and generator_meta. Sample it as its method does:
        x = generate(net, z, labels, meta["sigmas"])      # z (B, *meta["shape"]), labels (B,) in 0..num_classes-1
    A file saved before generators recorded their meta is read through its run's config (legacy_generator_meta)."""
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta") or legacy_generator_meta(ckpt, path)
    if meta.get("network") not in unet.NETWORKS:
        raise UserError(f"{path}: its network {meta.get('network')!r} is not one of {sorted(unet.NETWORKS)}")
    try:
        net = EDMDenoiser(unet.NETWORKS[meta["network"]](**meta["network_kwargs"]), meta["sigma_data"])
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: its network cannot be built from the arguments it records ({_reason(e)})") from None
    restore({"generator": net}, ckpt, path)
    return net.to(device).eval().requires_grad_(False), meta


# ==================================================================================================
# CHECKPOINTS
# ==================================================================================================

def rng_state():
    """Every RNG's state in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))


def save_checkpoint(path, objects, step, config, meta=None, rng_ranks=None):
    """Write {name: state_dict} of nets (unwrapped, uncompiled), EMA, optimizers, + step, RNG states and config (and
    a generator's `meta`, generator_meta: plain data, as weights_only loading admits). rng_ranks: every rank's RNG
    states (Run.save gathers them), each rank's own restored on --resume; default: this process's. Atomic: written
    to a temporary file in the same folder, fsync'ed, then renamed over the old checkpoint, so a kill at any moment
    leaves either the old or the new checkpoint, never half of one."""
    path = Path(path)
    rng_ranks = rng_ranks or [rng_state()]
    state = {"format": 1, "step": step, "config": config, "rng": rng_ranks[0], "rng_ranks": rng_ranks,
             "state": {name: unwrap(obj).state_dict() for name, obj in objects.items()}}
    if meta is not None:
        state["meta"] = meta
    try:
        write_atomically(path, lambda tmp: torch.save(state, tmp), sync=True)
    except (OSError, RuntimeError) as e:  # disk full, quota, I/O error (torch's zip writer raises RuntimeError)
        free = shutil.disk_usage(path.parent).free
        raise UserError(f"could not write {path} ({_reason(e)}; {free / 2**20:.1f} MiB free on its disk); the file "
                        f"there before is unchanged") from None


def load_checkpoint(path):
    """torch.load with weights_only=True (no arbitrary unpickling); a clear UserError when missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint of this project ({_reason(e)}); "
                        f"replace it with a good copy or delete it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != 1 or "state" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project")
    return ckpt


def restore(objects, ckpt, path="checkpoint"):
    """Load each object's state from a checkpoint; a mismatch (other preset, resolution, classes) is a UserError."""
    for name, obj in objects.items():
        if name not in ckpt["state"]:
            raise UserError(f"{path} has no {name!r} (has {sorted(ckpt['state'])}); is it from another method?")
        try:
            unwrap(obj).load_state_dict(ckpt["state"][name])
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"{path}: {name!r} does not fit this configuration (other --preset, --resolution "
                            f"or --cond?): {_reason(e)}") from None


# ==================================================================================================
# THE TEACHER'S REFERENCE, CACHED
# ==================================================================================================

# The teacher's reference metrics come from its 35-NFE Heun sampler over --eval-samples and --fid-samples latents:
# for EDM's ImageNet-64 network at FID-50k about 20 minutes of an H100, at every start and every --resume. They
# depend only on the teacher, the sampler and the evaluation settings, so teacher_reference keeps them, with the
# samples drawn in the pictures, in a file beside the teacher, named by a hash of all of those.
def teacher_file(args):
    """The file the teacher's weights were loaded from (--teacher auto / analytic: the cached teacher.pt)."""
    if args.teacher == "edm":
        return Path(args.teacher_dir) / DOWNLOADS[edm_download_key(args)][0]
    if args.teacher in ("auto", "analytic"):
        return teacher_folder(args) / "teacher.pt"
    return Path(args.teacher)


def _file_identity(path):
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def teacher_reference_cache(args, info, dist):
    """(home/reference-<steps>steps-<hash of the key>.pt, key), home being the teacher's folder (for --teacher PATH,
    the file's), the key what the teacher's reference metrics and samples are a function of: the teacher (its file's
    path, size and modification time; the mixture itself with --teacher analytic), the sampler, the evaluation
    settings (samples, seed, batch, device) and, with --fid-samples, the detector's and the reference statistics'
    contents. Every rank calls it: checking the FID files is collective."""
    key = {"format": 1, "teacher": "analytic" if args.teacher == "analytic" else _file_identity(teacher_file(args)),
           "dataset": args.dataset, "resolution": args.resolution, "cond": bool(info.cond),
           "teacher_steps": args.teacher_steps, "eval_samples": args.eval_samples, "seed": args.seed,
           "batch": max(args.batch, 256), "device": dist.device.type}
    if args.fid_samples:
        _, detector_hash = fid_detector(args, dist)
        _, (mu, sigma) = fid_reference(args, info, dist)
        key["fid"] = {"samples": args.fid_samples, "detector": detector_hash,
                      "reference": hashlib.sha256(mu.tobytes() + sigma.tobytes()).hexdigest()}
    home = Path(args.teacher_dir) if args.teacher == "edm" else teacher_file(args).parent
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return home / f"reference-{args.teacher_steps}steps-{digest}.pt", key


def load_teacher_reference(cache, dist):
    """The cached (metrics, samples) of the teacher's reference, or None. Rank 0 reads the file and passes what it
    found to the others, so that all ranks agree on whether to sample the teacher (collective with a FID)."""
    path, key = cache
    found = None
    if dist.is_main:
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry.get("key") == key:
                found = (entry["metrics"], entry["samples"])
        except Exception:  # missing, unreadable or of another format: sample again
            found = None
    return dist.broadcast_object(found)


def save_teacher_reference(cache, dist, metrics, samples):
    """Rank 0 writes the teacher's reference (metrics, samples) beside the teacher, atomically; a folder it may not
    write in only costs the next start a new sampling."""
    path, key = cache
    if not dist.is_main:
        return
    entry = {"key": key, "metrics": dict(metrics), "samples": samples.float().cpu()}
    try:
        write_atomically(path, lambda tmp: torch.save(entry, tmp))
    except (OSError, RuntimeError) as e:
        print(f"note: the teacher's reference metrics were not cached in {path.parent} ({_reason(e)})")


# ==================================================================================================
# RUN FOLDER
# ==================================================================================================

_HELD_LOCKS = {}  # run folder -> the open file whose flock this process holds (released when the process ends)


def hold_folder(folder, create):
    """One live run per folder: hold an exclusive flock on folder/.lock for the rest of this process (the kernel
    drops it when the process ends, however it ends, so a lock left by a killed run never blocks --resume). The file
    holds the holder's pid, for the error a second process gets. With create=False (the folder may not be ours to
    write in yet) only an existing .lock is opened, and a folder without one is left as it is. Re-entrant within a
    process. Returns False where file locks are not available (not Linux / macOS)."""
    folder = Path(folder).resolve()
    path = folder / ".lock"
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a lock file (a folder?); remove it")
    if folder in _HELD_LOCKS or (not create and not path.is_file()):
        return True
    try:
        f = lock(path, wait=False)
    except OSError:
        pid = path.read_text().strip() or "?"
        raise UserError(f"{folder} is in use by another run (process {pid}); wait for it to end or stop it, or "
                        f"choose another --out-dir") from None
    if f is None:
        return False
    if create:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
    _HELD_LOCKS[folder] = f
    return True


def folder_problem(path):
    """Why `path` cannot be a folder this project writes into, or None: empty, a file, under a file, or not writable
    (a trial folder is made and removed again in the nearest existing parent, so /proc, read-only mounts and
    missing permissions are found before a run starts)."""
    if str(path).strip() == "":
        return "is empty; name a folder"
    path = Path(path)
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"is under {parent}, which is a file"
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".write-test-"))
    except OSError as e:
        return f"cannot be written in {parent} ({_reason(e)})"
    return None


# The files a run writes into its folder (its pictures are listed in RUN_MANIFEST as they are written): --overwrite
# removes these and nothing else.
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "generator.pt", "config.json")
RUN_MANIFEST = ".run-files"


class Run:
    """The run folder: config.json, metrics.jsonl, ckpt.pt, pictures. Only rank 0 writes, and only one process at a
    time: rank 0 holds the folder's lock (hold_folder) from before its first write until it ends.
    An existing run is never overwritten: continue it with --resume or discard it with --overwrite, which removes
    only the files a run writes. Everything a resume needs (the checkpoint, its flags, metrics.jsonl) is read and
    checked here, before anything is written."""

    def __init__(self, args, dist):
        self.dir, self.dist, self.args = Path(args.out_dir), dist, args
        self.ckpt_path, self.metrics_path = self.dir / "ckpt.pt", self.dir / "metrics.jsonl"
        self.saved_step, self.ckpt, self.kept_metrics = None, None, None
        if dist.is_main and self.dir.is_dir() and not args.export:  # an export only reads the run
            hold_folder(self.dir, create=False)  # a live run there stops this one now, before any work
        if args.resume and not self.ckpt_path.is_file():
            raise UserError(f"--resume: no checkpoint {self.ckpt_path} to continue from")
        # a folder holds a run once it has a checkpoint, a metrics log or a generator; a config.json alone (a run
        # that failed before its first log line, e.g. on missing data) is simply started again
        held = [f for f in (self.ckpt_path, self.metrics_path, self.dir / "generator.pt") if f.exists()]
        if not args.resume and held and not args.overwrite:
            raise UserError(f"{self.dir} already holds a run; pass --resume to continue it or --overwrite to start "
                            f"again (or choose another --out-dir)")
        if args.overwrite and not held and self.dir.is_dir():
            others = sorted(p.name for p in self.dir.iterdir() if p.name not in (*RUN_FILES, ".lock", RUN_MANIFEST)
                            and not p.name.endswith(".tmp"))
            if others:
                raise UserError(f"--overwrite: {self.dir} holds no run but other files ({', '.join(others[:3])}"
                                f"{', ...' if len(others) > 3 else ''}); choose an empty or new --out-dir")
        if args.resume:
            self.ckpt = load_checkpoint(self.ckpt_path)
            self.saved_step = self.ckpt["step"]
            check_resume_flags(self.ckpt["config"], args, self.dir)
            if dist.is_main:
                self.kept_metrics = self._metrics_until(self.saved_step)
        dist.barrier()  # every rank has checked before rank 0 writes anything
        self.opened = False

    def last_good(self):
        """The sentence every error that stops a run ends with: the checkpoint to continue from, if there is one."""
        if self.saved_step is not None and self.ckpt_path.is_file():
            return (f"The last good checkpoint is {self.ckpt_path} (iteration {self.saved_step}); continue with "
                    f"--resume.")
        return f"No checkpoint was saved in {self.dir}: there is nothing to resume."

    def open(self):
        """Create the folder, clear the old run's files with --overwrite, write config.json. Deferred until
        resume(), which every script calls once its data, teacher and checkpoint have loaded, so that input which
        fails earlier leaves nothing behind."""
        if self.opened:
            return
        self.opened = True
        if self.dist.is_main:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                hold_folder(self.dir, create=True)  # before the first write, and before --overwrite clears anything
                stale = [p for p in self.dir.glob("*.tmp") if p.name[:-4] in RUN_FILES]
                for p in stale:  # a kill or a full disk during a write left it (the file it was for is intact)
                    p.unlink()
                if stale:
                    print(f"removed {len(stale)} unfinished temporary file(s) in {self.dir}")
                if self.args.overwrite:  # the files a run writes (RUN_FILES, those listed in its manifest) alone
                    manifest = self.dir / RUN_MANIFEST
                    listed = manifest.read_text().split() if manifest.is_file() else []
                    for name in {*RUN_FILES, *listed}:
                        if "/" not in name:
                            (self.dir / name).unlink(missing_ok=True)
                    manifest.unlink(missing_ok=True)
                write_atomically(self.dir / "config.json", json.dumps(vars(self.args), indent=1, sort_keys=True) + "\n")
                if self.kept_metrics is not None:
                    write_atomically(self.metrics_path, "".join(line + "\n" for line in self.kept_metrics))
            except OSError as e:
                raise UserError(f"cannot write the run folder {self.dir} ({_reason(e)})") from None

    def file(self, name):
        """The path of a new file of this run (a picture): listed in the folder's manifest, so that --overwrite
        removes it, and only files like it."""
        self.open()
        if self.dist.is_main:
            manifest = self.dir / RUN_MANIFEST
            listed = manifest.read_text().split() if manifest.is_file() else []
            if name not in listed:
                with open(manifest, "a") as f:
                    f.write(name + "\n")
        return self.dir / name

    def log(self, record):
        self.open()
        if self.dist.is_main:
            record = {k: (float(v) if torch.is_tensor(v) else v) for k, v in record.items()}
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, objects, step):
        """Every rank calls it: rank 0 writes the checkpoint, with every rank's RNG states."""
        self.open()
        rng_ranks = self.dist.gather_object(rng_state())
        if self.dist.is_main:
            save_checkpoint(self.ckpt_path, objects, step, vars(self.args), rng_ranks=rng_ranks)
        self.saved_step = step

    def resume(self, objects):
        """Restore objects and RNG states from ckpt.pt when --resume; returns the step to continue from (0 if new)."""
        if not self.args.resume:
            self.open()
            return 0
        ckpt = self.ckpt
        restore(objects, ckpt, self.ckpt_path)
        if self.args.export:  # --export only reads the run: its folder is left as it is (--overwrite included)
            return ckpt["step"]
        self.open()  # config.json is written only now, after the checkpoint, its flags and the metrics were checked
        rng_ranks = ckpt.get("rng_ranks", [ckpt["rng"]])
        if len(rng_ranks) == self.dist.world:
            set_rng_state(rng_ranks[self.dist.rank])  # each rank its own
        elif self.dist.is_main:
            print(f"note: {self.ckpt_path} holds the RNG states of {len(rng_ranks)} processes and this run has "
                  f"{self.dist.world}; every rank keeps its fresh seed (--seed + rank)")
        if self.dist.is_main:
            print(f"resumed {self.dir} at iteration {ckpt['step']}")
        self.ckpt = None  # the tensors are in `objects` now
        return ckpt["step"]

    def _metrics_until(self, step):
        """The lines of metrics.jsonl that a resume at `step` keeps: a run killed after its last checkpoint logged
        iterations that the resumed run repeats, and a kill can leave a half-written last line; both are dropped,
        so that metrics.jsonl holds each iteration once. Any other line that is not a record is a UserError."""
        if not self.metrics_path.is_file():
            return []
        try:
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--resume: cannot read {self.metrics_path} ({_reason(e)}); repair or remove it") from None
        keep = []
        for n, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # the half-written last line of a killed run
                    continue
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("iter", 0), int):
                raise UserError(f"--resume: {self.metrics_path} line {n} is not a metrics record; repair or remove "
                                f"that line")
            if record.get("iter", 0) <= step:
                keep.append(line)
        return keep


# Flags whose change makes a resumed run another run: refused by --resume unless --allow-changed-flags.
RESUME_FIXED = ("dataset", "resolution", "preset", "cond", "method")
RESUME_CHECKED = ("batch", "teacher", "lr_decay", *TEACHER_KEYS[4:])
METHOD_FLAGS = {}  # method -> the dests of its own argument group (parse_args fills it)


def check_resume_flags(old, args, folder):
    """--resume continues the run the checkpoint holds: another dataset, network or method is refused; other flags that
    matter (batch, teacher, schedule and the method's own flags) are refused too, all differences listed, unless
    --allow-changed-flags or --export (which only samples). --iters, evaluation, logging and hardware flags are free."""
    for key in RESUME_FIXED:
        if old.get(key) != getattr(args, key):
            raise UserError(f"--resume: the run in {folder} has {key}={old.get(key)!r}, this command "
                            f"{key}={getattr(args, key)!r}")
    keys = [*RESUME_CHECKED, *METHOD_FLAGS.get(args.method, ())]
    changed = [f"--{k.replace('_', '-')} {old[k]!r} -> {getattr(args, k)!r}" for k in keys
               if k in old and hasattr(args, k) and old[k] != getattr(args, k)]
    if changed and not args.allow_changed_flags and not getattr(args, "export", 0):  # an export trains nothing
        raise UserError(f"--resume: this command changes the run's {', '.join(changed)}; repeat the run's flags "
                        f"(its config.json) or pass --allow-changed-flags")
    if changed and int(os.environ.get("RANK", "0")) == 0:
        print(f"--resume with changed flags: {', '.join(changed)}")


# ==================================================================================================
# ARGUMENTS
# ==================================================================================================

# Shared per-dataset defaults. A method script passes its own per-dataset defaults on top (see parse_args).
DATASET_DEFAULTS = {
    "toy2d": dict(resolution=None, preset="mlp", cond=False, batch=512, eval_samples=10000, eval_every=500,
                  fid_samples=0, teacher_iters=3000, teacher_batch=512, teacher_lr=2e-3, teacher_ema=5.0,
                  teacher_rampup=50.0, lr_decay="none"),
    "synthetic": dict(resolution=32, preset="small", cond=True, batch=64, eval_samples=1000, eval_every=500,
                      fid_samples=0, teacher_iters=2000, teacher_batch=64, teacher_lr=1e-3, teacher_ema=5.0,
                      teacher_rampup=10.0, lr_decay="none"),
    "cifar10": dict(resolution=32, preset="cifar10", cond=True, batch=256, eval_samples=100, eval_every=5000,
                    fid_samples=10000, teacher_iters=200000, teacher_batch=512, teacher_lr=1e-3, teacher_ema=500.0,
                    teacher_rampup=10000.0, lr_decay="none"),
    "imagenet64": dict(resolution=64, preset="imagenet64", cond=True, batch=256, eval_samples=100,
                       eval_every=5000, fid_samples=10000, teacher_iters=400000, teacher_batch=512, teacher_lr=2e-4,
                       teacher_ema=500.0, teacher_rampup=10000.0, lr_decay="none"),
}


def checked(kind, ok, must, limit=None, why="it is held in memory at once"):
    """An argparse type= for a number flag: parses `kind` (int or float) and refuses, as one line with exit
    code 2, a value that fails ok(value) ("--flag must be <must> (got X)") or one above `limit` (sizes that
    are held in memory at once, or `why`)."""
    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must} (got {text})")
        if limit is not None and value > limit:
            raise argparse.ArgumentTypeError(f"{text} is above this project's limit of {limit} ({why})")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


POSITIVE = checked(float, lambda v: 0 < v < math.inf, "a positive number")
BATCH = checked(int, lambda v: v > 0, "positive", limit=65536)
NONNEGATIVE = checked(float, lambda v: 0 <= v < math.inf, ">= 0")
FINITE = checked(float, math.isfinite, "a finite number")
COUNT = checked(int, lambda v: v > 0, "positive")  # an int >= 1
COUNT0 = checked(int, lambda v: v >= 0, ">= 0")  # an int >= 0
SEED = checked(int, lambda v: 0 <= v < 2 ** 31, "in 0 .. 2^31 - 1")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" except for defaults of None, which parse_args fills per dataset (and says so)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line and exit code 2 (not the whole usage block)."""

    def error(self, message):
        message = re.sub(r"^argument (--[\w-]+)(/-\w)?: ", r"\1 ", message)  # "--flag must be ..."
        print(f"error: {message} (--help lists every flag)", file=sys.stderr)
        sys.exit(2)


def base_parser(description, method):
    """The flags every script shares. Defaults of None are filled per dataset by parse_args()."""
    p = _Parser(description=description, formatter_class=_HelpFormatter)
    p.set_defaults(method=method)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="toy2d", choices=DATASETS,
                   help="toy2d: 2-D Gaussian mixture; synthetic: class-conditional Gaussian mixture of 10 smooth "
                        "template images (exact denoiser known); cifar10; imagenet64 (downsampled npz or folder)")
    g.add_argument("--data-dir", default="data", help="where cifar10 is downloaded / imagenet64 is read from")
    g.add_argument("--data-cache", default=None, metavar="DIR",
                   help="imagenet64 npz: where their one-time conversion into a memory-mapped .npy goes (15.7 GB for "
                        "the full train set; default: --data-dir itself)")
    g.add_argument("--resolution", type=int, default=None,
                   help="image side for 'synthetic' (8, 16, 32, 64); fixed at 32 for cifar10 and 64 for imagenet64")
    g.add_argument("--cond", action=argparse.BooleanOptionalAction, default=None, help="class-conditional networks")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", default="auto",
                   help="'auto': train the EDM teacher or load it from --teacher-dir; 'analytic': the exact "
                        "mixture denoiser (toy2d, synthetic); 'edm': NVIDIA's pretrained EDM network (cifar10 "
                        "cond/uncond DDPM++, imagenet64 cond ADM), downloaded into --teacher-dir and loaded without "
                        "running code from the pickle; or a path to a teacher .pt file or an EDM .pkl file")
    g.add_argument("--teacher-dir", default="runs/teachers", help="cache folder of trained teachers")
    g.add_argument("--preset", default=None, choices=sorted(unet.PRESETS),
                   help="network preset (unet.py) of the teacher, hence of every copy of it")
    g.add_argument("--teacher-iters", type=COUNT0, default=None, help="teacher training iterations")
    g.add_argument("--teacher-batch", type=BATCH, default=None, help="teacher batch size (global)")
    g.add_argument("--teacher-lr", type=POSITIVE, default=None, help="teacher Adam learning rate")
    g.add_argument("--teacher-ema", type=NONNEGATIVE, default=None, help="teacher EMA half-life in kimg")
    g.add_argument("--teacher-rampup", type=NONNEGATIVE, default=None, help="teacher lr warm-up in kimg")
    g.add_argument("--teacher-seed", type=SEED, default=0, help="seed of teacher training (part of its cache key)")
    g.add_argument("--teacher-steps", type=checked(int, lambda v: v > 0, "positive", 1000, "a Heun schedule"),
                   default=18, help="Heun steps of the teacher's reference sampler (18 steps = 35 NFE)")
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default=None, help="run folder (default runs/<dataset>-<method>)")
    g.add_argument("--seed", type=SEED, default=0, help="seeds python, numpy and torch (per rank: seed + rank)")
    g.add_argument("--iters", type=COUNT0, default=None, help="training iterations of this method")
    g.add_argument("--batch", type=BATCH, default=None, help="global batch size")
    g.add_argument("--batch-gpu", type=COUNT, default=None,
                   help="most samples per forward/backward pass on one device: each update (and the teacher's) "
                        "accumulates gradients over rounds of this many rows of the rank's share of --batch, with "
                        "DDP's all-reduce in the last round only (default: on CUDA, what fits the GPU's memory by "
                        "the README's estimate for the cifar10 / edm-* presets; else the whole share, one round)")
    g.add_argument("--lr-decay", default=None, choices=("none", "cosine"),
                   help="learning-rate schedule of the method's optimizers over --iters: constant, or cosine "
                        "decay to 0 (lr * (1 + cos(pi * step / iters)) / 2); the fake score (sid.py, dmd2.py) and the "
                        "discriminator (add.py) follow it unless --no-fake-lr-decay / --no-disc-lr-decay")
    g.add_argument("--eval-every", type=COUNT0, default=None, help="evaluate every N iterations (0: only at the end)")
    g.add_argument("--eval-samples", type=COUNT, default=None,
                   help="samples per evaluation: scored against the exact density (toy2d, synthetic) and drawn in "
                        "the picture")
    g.add_argument("--ckpt-every", type=COUNT, default=1000, help="checkpoint every N iterations (and at the end)")
    g.add_argument("--log-every", type=COUNT, default=50, help="log losses every N iterations")
    g.add_argument("--max-skips", type=COUNT, default=20,
                   help="stop when this many consecutive steps were skipped for a non-finite loss or gradient "
                        "(the last checkpoint is kept)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="start again in an existing --out-dir (removes only the files a run writes there); with "
                        "--export, replace another generator's export files and an existing --export-npz")
    g.add_argument("--allow-changed-flags", action="store_true",
                   help="let --resume continue with flags that change the run (batch, teacher, schedule, the "
                        "method's own flags); without it such a resume is refused and the differences listed")
    if method != "teacher":
        g.add_argument("--init-generator", default=None, metavar="PATH",
                       help="start the generator (and its EMA) from a saved generator instead of a copy of the "
                            "teacher network: a run's generator.pt, or the regression-*.pt of `common.py --regress` "
                            "(a one-step map from input noise 2.5: a start for sid, and for dmd2's 1-step toy "
                            "student); the other networks start as they always do")
    g = p.add_argument_group("fid")
    g.add_argument("--fid-samples", type=checked(int, lambda v: v >= 0, ">= 0", limit=10 ** 6), default=None,
                   help="generated images per FID, logged as e.g. fid10k (0: no FID). Report FID-50k (50000); "
                        "smaller counts are for monitoring and read higher")
    g.add_argument("--fid-detector", default="auto",
                   help="'auto': download NVIDIA's TorchScript Inception (inception-2015-12-05.pt) into --fid-dir; "
                        "or a path to it (offline machines)")
    g.add_argument("--fid-ref", default="auto",
                   help="reference statistics of the FID: 'edm' EDM's published ones (cifar10-32x32.npz, "
                        "imagenet-64x64.npz: the papers' FID), downloaded into --fid-dir; 'data' the training data's, "
                        "computed once and cached in --fid-dir; 'auto' EDM's where they describe the teacher's data "
                        "(cifar10; imagenet64 with an EDM teacher, trained on EDM's own crops of ImageNet), else the "
                        "data's; or a path to an npz with mu, sigma")
    g.add_argument("--fid-dir", default="data/fid", help="cache folder of the FID detector and reference statistics")
    g = p.add_argument_group("export (after training)")
    if method == "teacher":
        g.add_argument("--generator", default=None, metavar="PATH",
                       help="a saved generator.pt to --export: the file describes itself, so no other flag is needed")
    g.add_argument("--export", type=checked(int, lambda v: v >= 0, ">= 0", 10 ** 7, "50,000 is the papers' FID"),
                   default=0, metavar="N",
                   help="write the samples of seeds 0..N-1 (in batches of --batch) and exit, without training: of "
                        "--generator (common.py), or of the run's EMA generator (a method script, with --resume). "
                        "Image i comes from seed i whatever the number of processes; a re-run completes an "
                        "interrupted export")
    g.add_argument("--export-dir", default=None, metavar="DIR",
                   help="one PNG per seed, DIR/000000/000123.png (EDM's generate.py layout, read by EDM's fid.py, "
                        "clean-fid, torch-fidelity with --samples-find-deep), and DIR/export.json, what wrote them "
                        "(a re-run completes only the same generator's export); toy2d: DIR/points.npz")
    g.add_argument("--export-npz", default=None, metavar="FILE",
                   help="the samples in one .npz, as the ADM evaluator reads them: arr_0 uint8 N x H x W x 3 "
                        "(toy2d: float32 N x 2 points), arr_1 the labels when conditional (an existing file is "
                        "replaced only with --overwrite)")
    g.add_argument("--class", dest="class_label", type=COUNT0, default=None, metavar="K",
                   help="export class K only (default: class-balanced, seed i has class i mod the number of classes)")
    g = p.add_argument_group("benchmark")
    g.add_argument("--bench", action="store_true",
                   help="time training iterations and samplers on a random-weight teacher, print one JSON line, "
                        "write nothing (on CUDA also fp32 vs bf16 and eager vs --compile)")
    g.add_argument("--bench-iters", type=COUNT, default=20, help="timed training iterations of --bench")
    g.add_argument("--bench-warmup", type=COUNT0, default=5, help="untimed iterations before --bench times")
    g.add_argument("--bench-compare", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, --bench also measures the fp32, bf16 and compiled variants in the same process")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="mixed precision: auto = bf16 autocast on GPUs with native bf16 (compute capability >= 8.0), "
                        "fp32 on older GPUs and the CPU; fp16 uses a GradScaler")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the trained networks")
    g.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend with --compile: 'inductor' (generates kernels), or e.g. 'aot_eager' "
                        "(graph capture and AOT autograd without code generation: for debugging, and the tests)")
    g.add_argument("--workers", type=checked(int, lambda v: v >= 0, ">= 0", 256, "processes"), default=4,
                   help="data-loader workers (image folders only)")
    return p


def add_fake_sigma_flag(group, default):
    """--fake-sigma, the same flag in sid.py and dmd2.py (their defaults differ: each is its authors')."""
    group.add_argument("--fake-sigma", default=default, choices=("lognormal", "grid", "loss", "generator"),
                       help="noise levels of the fake score's EDM loss: 'lognormal' EDM's ln sigma ~ N(-1.2, 1.2^2) "
                            "(SiD's authors'); 'grid' index ~ U{0..999} of the 1000-point Karras grid (DMD2's "
                            "authors'); 'loss' the generator loss's own noise levels ('generator' is the same)")


def parse_args(parser, method_defaults=None, argv=None):
    """Parse, fill per-dataset defaults (method's first, then shared), validate. Bad values exit 2 via parser.error.
    The help text of every flag filled per dataset lists its per-dataset values."""
    per_dataset = {d: {**DATASET_DEFAULTS[d], **(method_defaults or {}).get(d, {})} for d in DATASETS}
    for action in parser._actions:
        values = [(d, v[action.dest]) for d, v in per_dataset.items() if v.get(action.dest) is not None]
        if action.default is None and values and "per dataset" not in (action.help or ""):
            listed = ", ".join(f"{d} {v:g}" if isinstance(v, float) else f"{d} {v}" for d, v in values)
            action.help = f"{action.help} (per dataset: {listed})"
    args = parser.parse_args(argv)
    own = [g for g in parser._action_groups if g.title == args.method]
    METHOD_FLAGS[args.method] = [a.dest for g in own for a in g._group_actions]
    if args.teacher == "edm":
        if args.dataset not in EDM_PRESETS:
            parser.error(f"--teacher edm: NVIDIA published EDM networks for cifar10 and imagenet64, not {args.dataset}")
        if args.preset is None:
            args.preset = EDM_PRESETS[args.dataset]
        elif args.preset != EDM_PRESETS[args.dataset]:
            parser.error(f"--teacher edm builds --preset {EDM_PRESETS[args.dataset]} for {args.dataset} "
                         f"(got --preset {args.preset})")
        if args.dataset == "imagenet64" and args.cond is False:
            parser.error("--teacher edm: the ImageNet-64 EDM network is class-conditional; drop --no-cond")
    for k, v in per_dataset[args.dataset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.resolution = {"cifar10": 32, "imagenet64": 64}.get(args.dataset, args.resolution)
    if args.out_dir is None:
        args.out_dir = f"runs/{args.dataset}-{args.method}"
    if getattr(args, "fake_sigma", None) == "generator":  # the flag's earlier name for 'loss'
        args.fake_sigma = "loss"
    if args.device != "auto":
        try:
            torch.device(args.device)
        except (RuntimeError, ValueError):
            parser.error(f"--device {args.device!r} is not a device ('auto', 'cpu', 'cuda', 'cuda:1', ...)")
    for flag, value in (("--out-dir", args.out_dir), ("--teacher-dir", args.teacher_dir)):
        problem = folder_problem(value)
        if problem:
            parser.error(f"{flag} {value!r} {problem}")
    # the flags' own ranges are checked by their type= (checked); what depends on other flags, here. Samples held
    # in memory at once are refused here with one line rather than by the allocator hours later.
    limit = 10 ** 6 if args.dataset == "toy2d" else 100000
    if args.eval_samples > limit:
        parser.error(f"--eval-samples {args.eval_samples} is above this project's limit of {limit} (it is held "
                     f"in memory at once)")
    if args.dataset in ("toy2d", "synthetic") and args.eval_samples < 16:
        parser.error(f"--eval-samples must be >= 16 on {args.dataset}: its metrics need a covariance of the "
                     f"samples (got {args.eval_samples})")
    if args.dataset == "synthetic" and args.resolution not in (8, 16, 32, 64):
        parser.error(f"--resolution for synthetic must be 8, 16, 32 or 64 (got {args.resolution})")
    if args.teacher == "analytic" and args.dataset not in ("toy2d", "synthetic"):
        parser.error("--teacher analytic needs a dataset with a known density: toy2d or synthetic")
    if args.teacher not in ("auto", "analytic", "edm") and not Path(args.teacher).is_file():
        parser.error(f"--teacher {args.teacher}: no such file (use 'auto', 'analytic', 'edm', a teacher .pt path or "
                     f"an EDM .pkl path)")
    if getattr(args, "init_generator", None) and not args.resume and not Path(args.init_generator).is_file():
        parser.error(f"--init-generator {args.init_generator}: no such file")
    if args.resume and args.overwrite and not args.export:  # --export --overwrite: the export's files
        parser.error("--resume and --overwrite contradict each other; pick one")
    generator = getattr(args, "generator", None)
    if args.export:
        if not (args.export_dir or args.export_npz):
            parser.error(f"--export {args.export}: say where, with --export-dir DIR and / or --export-npz FILE")
        if args.method == "teacher" and not generator:
            parser.error("--export: pass the generator.pt to export with --generator PATH")
        if args.method != "teacher" and not args.resume:
            parser.error("--export: a method script exports its run's generator; add --resume (or use "
                         "`python common.py --generator RUN/generator.pt --export N`)")
        problem = args.export_dir is not None and folder_problem(args.export_dir)
        if problem:
            parser.error(f"--export-dir {args.export_dir!r} {problem}")
        npz = Path(args.export_npz) if args.export_npz is not None else None
        if npz is not None and npz.is_dir():
            parser.error(f"--export-npz {args.export_npz!r} is a folder; name a file (e.g. samples.npz)")
        if npz is not None and npz.exists() and not args.overwrite:
            parser.error(f"--export-npz {args.export_npz} exists; pass --overwrite to replace it")
        problem = npz is not None and folder_problem(npz.parent)
        if problem:
            parser.error(f"--export-npz {args.export_npz!r}: its folder {npz.parent} {problem}")
    elif args.export_dir or args.export_npz or args.class_label is not None or generator:
        parser.error("--generator, --export-dir, --export-npz and --class go with --export N")
    if generator and not Path(generator).is_file():
        parser.error(f"--generator {generator}: no such file")
    if args.fid_samples and args.dataset == "toy2d":
        parser.error("--fid-samples: FID scores images; toy2d is scored against its exact density instead")
    for flag, value in (("--fid-detector", args.fid_detector), ("--fid-ref", args.fid_ref)):
        if value not in ("auto", "edm", "data") and not Path(value).is_file():
            parser.error(f"{flag} {value}: no such file ('auto' downloads it into --fid-dir)")
    if args.fid_ref == "auto":  # resolved here, so that config.json records which reference the FIDs used
        edm_data = args.dataset == "cifar10" or (args.dataset == "imagenet64" and (args.teacher == "edm" or
                                                                                  is_edm_pickle(args.teacher)))
        args.fid_ref = "edm" if edm_data else "data"
    if args.fid_ref == "edm" and args.dataset not in EDM_PRESETS:
        parser.error(f"--fid-ref edm: EDM published FID statistics for cifar10 and imagenet64, not {args.dataset}")
    if args.compile and args.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        parser.error(f"--compile-backend {args.compile_backend}: not a torch.compile backend (choose from "
                     f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))})")
    if unet.is_point_preset(args.preset) != (args.dataset == "toy2d"):
        parser.error(f"--preset {args.preset} does not fit --dataset {args.dataset} (the mlp presets are for toy2d "
                     f"only)")
    return args


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ==================================================================================================
# DISTRIBUTED
# ==================================================================================================

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    group: object = None  # a gloo group of the processes (NCCL runs) for the small agreements below, made on the host
    # so that they never wait for the GPU; None: the default group (gloo already on the CPU)

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast_object(self, obj):
        """Rank 0's obj, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather_object(self, obj):
        """Every rank's obj, in rank order, on rank 0 (None on the others)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0, group=self.group)
        return out

    def max(self, value):
        """The largest of the ranks' integers, on every rank (one all_reduce of one number)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return int(t)


def resolve_device(args, world=1, local_rank=0):
    """--device as a torch.device with its index: 'auto' is CUDA where there is a GPU, else the CPU; under torchrun on
    CUDA each process takes the GPU of its LOCAL_RANK. A CUDA device this machine does not have is a UserError."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    index = local_rank if world > 1 else (device.index if device.index is not None else 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s)"
                        + (f" and LOCAL_RANK is {local_rank}" if world > 1 else ""))
    return torch.device("cuda", index)


def init_distributed(args):
    """One process per GPU under torchrun (NCCL), or per CPU process (gloo); plain single-process otherwise. On CUDA:
    the process's GPU made current (so that streams and events are its own), TF32 and fp16-reduced reductions off as
    EDM's training loop (training_loop.py:55-57: fp32 stays fp32), cuDNN's autotuner on."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = resolve_device(args, world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        torch.backends.cudnn.benchmark = True
    if world > 1 and not torch.distributed.is_initialized():  # bench_compare calls main() again
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    group = torch.distributed.new_group(backend="gloo") if world > 1 and device.type == "cuda" else None
    seed_everything(args.seed + rank)
    if args.batch % world or args.teacher_batch % world:
        raise UserError(f"--batch {args.batch} / --teacher-batch {args.teacher_batch} must divide by the "
                        f"{world} processes")
    if args.batch_gpu is None:  # the default, now that the device is known (config.json records the value)
        args.batch_gpu = fitting_batch_gpu(args, device, world)
        if args.batch_gpu and rank == 0:
            print(f"--batch-gpu {args.batch_gpu}: the rows per round that fit this GPU's memory (estimate)")
    return Dist(rank=rank, world=world, device=device, group=group)


def wrap(net, args, dist, compile=True):
    """The module used for training forward passes: DDP-wrapped when distributed, compiled with --compile (unless
    compile=False, for networks whose losses need a double backward, which torch.compile does not support).
    Keep the plain module for EMA, checkpoints and frozen (no-grad-to-parameters) uses."""
    if dist.world > 1:
        # Buffers not sent before every forward (SiD's authors: broadcast_buffers=False, training/sid_training_loop.py):
        # the networks' only buffers are fixed resampling filters, equal on every rank. torch >= 2.14 calls the flag
        # forward_sync_buffers.
        ddp = nn.parallel.DistributedDataParallel
        flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else \
            "broadcast_buffers"
        net = ddp(net, device_ids=[dist.device] if dist.device.type == "cuda" else None, **{flag: False})
    if args.compile and compile:
        net = torch.compile(net, backend=args.compile_backend)
    return net


def frozen(net, args):
    """A frozen network for its passes inside a training iteration (no gradient to its parameters; gradients may
    flow to its inputs): compiled with --compile like the trained networks (no DDP: nothing to synchronise)."""
    return torch.compile(net, backend=args.compile_backend) if args.compile and isinstance(net, nn.Module) else net


def unwrap(net):
    """The plain module under torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net)


# ==================================================================================================
# PICTURES (no plotting dependency: torchvision's save_image)
# ==================================================================================================

def render_scatter(points, lim=1.3, size=192, colour=(0.1, 0.3, 0.9)):
    """A 2-D point set as a (3, size, size) image: log-density histogram on [-lim, lim]^2, white background."""
    p = points.detach().double().cpu()
    ij = ((p + lim) / (2 * lim) * size).floor().long()
    keep = ((ij >= 0) & (ij < size)).all(1)
    ij = ij[keep]
    hist = torch.zeros(size * size, dtype=torch.float64)
    hist.index_add_(0, (size - 1 - ij[:, 1]) * size + ij[:, 0], torch.ones(len(ij), dtype=torch.float64))
    dens = torch.log1p(hist.reshape(size, size))
    dens = dens / dens.max().clamp_min(1e-8)
    c = torch.tensor(colour, dtype=torch.float64)[:, None, None]
    return (1 - dens[None] * (1 - c)).float()


def save_picture(path, info, x, reference=None, true=None):
    """toy2d: scatter panels [true density | reference | x]; images: a grid with reference rows above x rows."""
    from torchvision.utils import save_image
    if len(info.shape) == 1:
        if true is None and info.mixture is not None:
            true, _ = info.mixture.sample(len(x), generator=torch.Generator().manual_seed(0))
        panels = [render_scatter(true, colour=(0.2, 0.2, 0.2))] if true is not None else []
        if reference is not None:
            panels.append(render_scatter(reference, colour=(0.1, 0.5, 0.1)))
        panels.append(render_scatter(x, colour=(0.8, 0.1, 0.1)))
        gap = torch.ones(3, panels[0].shape[1], 6)
        img = torch.cat([t for p in panels for t in (p, gap)][:-1], dim=2)
        save_image(img, path)
        return
    imgs = [x[:64]] if reference is None else [reference[:64], x[:64]]  # 8 rows of 8 each
    save_image(torch.cat(imgs).clamp(-1, 1), path, nrow=8, normalize=True, value_range=(-1, 1), padding=1)


def side_by_side(out, panels, gap=6, label_height=14):
    """Compose a labelled figure from toy2d evaluation pictures: `panels` is a list of (label, png, index), taking
    the index-th square panel (0 = true density, 1 = teacher, 2 = student) of a picture that save_picture wrote.
    Example: side_by_side("assets/toy2d.png", [("data", "runs/r/sid/sid-001000.png", 0), ...])."""
    from PIL import Image, ImageDraw
    crops = []
    for label, png, index in panels:
        img = Image.open(png).convert("RGB")
        size = (img.width - 2 * gap) // 3  # three square panels separated by `gap` columns
        if img.height != size:
            raise UserError(f"{png} is not a toy2d evaluation picture (three {img.height}px panels)")
        left = index * (size + gap)
        crops.append((label, img.crop((left, 0, left + size, size))))
    size = crops[0][1].width
    fig = Image.new("RGB", (len(crops) * size + (len(crops) - 1) * gap, size + label_height), "white")
    draw = ImageDraw.Draw(fig)
    for i, (label, crop) in enumerate(crops):
        x = i * (size + gap)
        draw.text((x + 2, 1), label, fill=(0, 0, 0))
        fig.paste(crop, (x, label_height))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.save(out)


# ==================================================================================================
# FID: the standard Inception detector, reference statistics; downloads with checksums
# ==================================================================================================

# FID as the papers report it (StyleGAN2-ADA / EDM / SiD / DMD2 protocol): NVIDIA's TorchScript port of the 2015
# TensorFlow Inception-v3 takes uint8 NCHW images (any size; it resizes to 299 inside) and returns 2048-d pool
# features; mean and covariance are accumulated in float64; FID = frechet_distance(mu_gen, cov_gen, mu_ref, cov_ref).
# The number depends on the sample count (it is biased upward for small counts), so it is always logged with its
# count: fid10k, fid50k. Papers report FID-50k.

# Files downloaded on first use: key -> (file name, URL, what to pass instead on an offline machine).
DOWNLOADS = {
    "detector": ("inception-2015-12-05.pt",
                 "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
                 "--fid-detector PATH (or --fid-samples 0: train without FID)"),
    # EDM's published FID reference statistics (--fid-ref edm), by dataset
    "cifar10": ("cifar10-32x32.npz", "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz",
                "--fid-ref PATH (or --fid-samples 0: train without FID)"),
    "imagenet64": ("imagenet-64x64.npz", "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz",
                   "--fid-ref PATH (or --fid-samples 0: train without FID)"),
    # NVIDIA's pretrained EDM networks (--teacher edm)
    "edm-cifar10-cond": ("edm-cifar10-32x32-cond-vp.pkl",
                         "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl",
                         "--teacher PATH.pkl"),
    "edm-cifar10-uncond": ("edm-cifar10-32x32-uncond-vp.pkl",
                           "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl",
                           "--teacher PATH.pkl"),
    "edm-imagenet64-cond": ("edm-imagenet-64x64-cond-adm.pkl",
                            "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl",
                            "--teacher PATH.pkl"),
}


# SHA-256 pins of the files above. Their publishers list none next to them, and this code was written without network
# access, so none is pinned yet: the first download records its hash in NAME.sha256 beside the file and every later
# use checks the file against it (a changed or corrupt file is refused). Pin a hash here to also check the download.
SHA256_PINS = {}


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verified_file(path, expected=None):
    """path, after checking its SHA-256 against `expected`, else against a PATH.sha256 file beside it if there is
    one (sha256sum format: the hash first). A missing or mismatching file is a UserError naming what to do."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist. Let it be downloaded ('auto' / 'edm'), or pass the path of a copy")
    sidecar = path.with_name(path.name + ".sha256")
    source = "the pinned hash"
    if expected is None and sidecar.is_file():
        expected, source = sidecar.read_text().split()[0].lower(), str(sidecar)
    if expected is not None:
        actual = sha256_of(path)
        if actual != expected:
            raise UserError(f"file {path} has SHA-256 {actual[:16]}... but {source} says {expected[:16]}...: "
                            f"the file is corrupt or was changed. Replace it with a good copy, or delete it (and "
                            f"{sidecar.name}) and let it be downloaded again")
    return path


def fetch(key, folder, dist):
    """The file DOWNLOADS[key] in `folder`, downloaded on first use (rank 0 only; with a progress bar), its hash
    checked against SHA256_PINS or recorded beside it, and verified on every later use."""
    name, url, instead = DOWNLOADS[key]
    path = Path(folder) / name
    if dist.is_main and not path.is_file():
        import urllib.request
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = None

        def download(tmp):
            nonlocal digest
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                    size = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                        for chunk in iter(lambda: response.read(1 << 20), b""):
                            f.write(chunk)
                            bar.update(len(chunk))
            except Exception as e:  # no network, HTTP error, full disk
                raise UserError(f"could not download {url} ({_reason(e)}). Download it on a machine with "
                                f"network access and put it at {path}, or pass {instead}") from None
            digest = sha256_of(tmp)
            if key in SHA256_PINS and digest != SHA256_PINS[key]:
                raise UserError(f"downloaded {url} has SHA-256 {digest} but {SHA256_PINS[key]} is pinned; refused")
            path.with_name(name + ".sha256").write_text(f"{digest}  {name}\n")

        write_atomically(path, download)
        print(f"downloaded {path} (SHA-256 {digest}, recorded in {name}.sha256)")
    dist.barrier()
    return verified_file(path, SHA256_PINS.get(key))


def to_uint8(x):
    """Images in [-1, 1] -> uint8 0..255, rounded to nearest (the PNG files EDM's FID reads), 3 channels."""
    x = (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


class FeatureStats:
    """Running float64 sums of detector features: n, sum f, sum f f^T. Ranks add theirs with all_reduce."""

    def __init__(self):
        self.n, self.sum, self.outer = 0, None, None

    def add(self, features):
        f = features.detach().double()
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def reduce(self, dist, device):
        if dist.world > 1:
            # a rank that drew no batch (fewer batches than ranks) adds zeros of the agreed feature size
            dim = torch.tensor([0 if self.sum is None else len(self.sum)], device=device)
            torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
            if self.sum is None:
                self.sum = torch.zeros(int(dim), dtype=torch.float64, device=device)
                self.outer = torch.zeros(int(dim), int(dim), dtype=torch.float64, device=device)
            n = torch.tensor([float(self.n)], dtype=torch.float64, device=device)
            for t in (n, self.sum, self.outer):
                torch.distributed.all_reduce(t)
            self.n = int(n.item())
        return self

    def mean_cov(self):
        """Mean and unbiased covariance (N - 1), as numpy float64."""
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), cov.cpu().numpy()


_FID_CACHE = {}  # detector path -> (detector, its SHA-256); run key -> reference (mu, sigma)


def fid_detector(args, dist):
    """The TorchScript detector (verified, loaded once per process) and its SHA-256, which is part of the reference
    statistics' cache key."""
    path = fetch("detector", args.fid_dir, dist) if args.fid_detector == "auto" else verified_file(args.fid_detector)
    key = str(Path(path).resolve())
    if key not in _FID_CACHE:
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format the detector ships in
                warnings.simplefilter("ignore", FutureWarning)
                detector = torch.jit.load(str(path), map_location=dist.device).eval()
        except Exception as e:
            raise UserError(f"cannot load {path} as a TorchScript detector ({_reason(e)}); pass NVIDIA's "
                            f"inception-2015-12-05.pt with --fid-detector") from None
        _FID_CACHE[key] = (detector, sha256_of(path))
    return _FID_CACHE[key]


def _fid_batches(n, batch, dist):
    """The global batches [start, stop) of n samples, dealt round-robin to the ranks: rank r takes batch r, r+W..."""
    starts = list(range(0, n, batch))[dist.rank::dist.world]
    return [(s, min(s + batch, n)) for s in starts]


@torch.no_grad()
def training_images(args, info, dist, batch):
    """One ordered pass over the training images as uint8 (B, 3, H, W) batches, sharded across ranks; for the
    mixtures (synthetic), max(--fid-samples, 10000) fixed draws. What the reference statistics are made of."""
    if info.mixture is not None:
        n = max(args.fid_samples, 10000)
        for s, e in _fid_batches(n, batch, dist):
            x, _ = info.mixture.sample(e - s, generator=torch.Generator().manual_seed(10_000_019 + s))
            yield to_uint8(x.reshape(-1, *info.shape))
        return
    root = Path(args.data_dir)
    if args.dataset == "cifar10":
        images, _ = load_cifar10(args.data_dir)
        for s, e in _fid_batches(len(images), batch, dist):
            yield images[s:e]
        return
    if any(root.glob("*.npz")):
        images, _ = load_imagenet64_npz(root, args.data_cache)
        for s, e in _fid_batches(len(images), batch, dist):  # this rank's shard: the only rows it reads
            yield torch.from_numpy(_read_rows(images, np.arange(s, e), np.empty((e - s, *images.shape[1:]), np.uint8)))
        return
    real_batches(args, info, dist)  # the same checks and messages as training (missing folder, no images)
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    tf = T.Compose([_center_crop_square, T.Resize(64, interpolation=T.InterpolationMode.LANCZOS), T.PILToTensor()])
    ds = ImageFolder(root, transform=tf)
    ds = torch.utils.data.Subset(ds, range(dist.rank, len(ds), dist.world))
    for x, _ in torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=args.workers):
        yield x


def fid_reference(args, info, dist):
    """(detector, (mu, sigma) of the reference set) for --fid-ref (resolved by parse_args): 'edm' EDM's published
    statistics, downloaded and verified; 'data' the training data's, computed once with this detector and cached in
    --fid-dir; or a given file."""
    detector, detector_hash = fid_detector(args, dist)
    if args.fid_ref == "edm":
        path = fetch(args.dataset, args.fid_dir, dist)
    elif args.fid_ref != "data":
        path = verified_file(args.fid_ref)
    else:
        # keyed by what the statistics are made of: the mixture draws, or the data folder; and the detector
        made_of = f"n{max(args.fid_samples, 10000)}" if info.mixture is not None else \
            data_identity(args.data_dir)[:8]  # the files, not the folder's name
        path = Path(args.fid_dir) / f"ref-{args.dataset}-{info.shape[-1]}-{made_of}-{detector_hash[:12]}.npz"
        if not path.is_file():
            stats = FeatureStats()
            bar = tqdm(desc=f"FID reference statistics of {args.dataset}", unit="img", disable=not dist.is_main)
            with torch.no_grad():
                for images in training_images(args, info, dist, 250):
                    stats.add(detector(images.to(dist.device), return_features=True))
                    bar.update(len(images) * dist.world)
            bar.close()
            mu, sigma = stats.reduce(dist, dist.device).mean_cov()
            if dist.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                def save(tmp):
                    with open(tmp, "wb") as f:
                        np.savez(f, mu=mu, sigma=sigma)
                    path.with_name(path.name + ".sha256").write_text(f"{sha256_of(tmp)}  {path.name}\n")

                write_atomically(path, save)
                print(f"FID reference statistics of {stats.n} images cached in {path}")
            dist.barrier()
        path = verified_file(path)
    key = ("ref", str(path.resolve()))
    if key not in _FID_CACHE:
        try:
            with np.load(path, allow_pickle=False) as ref:
                mu, sigma = np.asarray(ref["mu"], np.float64), np.asarray(ref["sigma"], np.float64)
        except Exception as e:
            raise UserError(f"cannot read FID reference statistics (mu, sigma) from {path} "
                            f"({_reason(e)}); pass an npz with mu and sigma with --fid-ref") from None
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and
                                                                      np.isfinite(sigma).all()):
            raise UserError(f"{path}: not FID reference statistics (mu {mu.shape}, sigma {sigma.shape}, both finite "
                            f"expected: mu (D,), sigma (D, D)); pass a good npz with --fid-ref")
        _FID_CACHE[key] = (mu, sigma)
    return detector, _FID_CACHE[key]


def fid_ref_label(args):
    """Which reference statistics the FIDs use, in words, for the log (resolved --fid-ref)."""
    if args.fid_ref == "edm":
        return f"EDM's {DOWNLOADS[args.dataset][0]}"
    return f"the {args.dataset} training data" if args.fid_ref == "data" else args.fid_ref


def fid_ref_record(args, metrics):
    """{"fid_ref": resolved --fid-ref} for a log record whose metrics hold a FID, else {}."""
    return {"fid_ref": args.fid_ref} if any(k.startswith("fid") for k in metrics) else {}


def fid_note(args, metrics):
    """The end of a printed line whose metrics hold a FID: which reference it used."""
    return f" (FID against {fid_ref_label(args)})" if fid_ref_record(args, metrics) else ""


def fid_label(n):
    """fid10k, fid50k, fid2500: the count is part of the name, since FID depends on it."""
    return f"fid{n // 1000}k" if n % 1000 == 0 else f"fid{n}"


@torch.no_grad()
def fid(args, info, fn, dist, n=None):
    """FID of a sampler fn(z, labels) over n (--fid-samples) images against fid_reference(). Every rank must call it:
    the batches are dealt round-robin across ranks, and image i has the noise of seed i (seed_noise: its latent, and
    a student sampler's re-noising) and class i mod K, so the images do not depend on the rank count, and they are
    those --export N writes. Returns {fid_label(n): value}."""
    n = n or args.fid_samples
    detector, (mu_ref, sigma_ref) = fid_reference(args, info, dist)
    batch = max(args.batch, 256)
    stats = FeatureStats()
    for start, stop in tqdm(_fid_batches(n, batch, dist), desc=f"{fid_label(n)} sampling", leave=False,
                            disable=not dist.is_main):
        z, eps = seed_noise(range(start, stop), info.shape, getattr(fn, "levels", 1))
        labels = balanced_labels(info, stop - start, dist.device, offset=start)
        x = fn(z.to(dist.device), labels, [e.to(dist.device) for e in eps]) if eps else fn(z.to(dist.device), labels)
        stats.add(detector(to_uint8(x), return_features=True))  # fp32, outside autocast, as the reference was made
    mu, sigma = stats.reduce(dist, dist.device).mean_cov()
    if mu.shape != mu_ref.shape:
        raise UserError(f"the FID reference has {mu_ref.shape[0]}-d statistics but the detector gives "
                        f"{mu.shape[0]}-d features: they were not made with the same detector")
    # the matrix square root of 2048 x 2048 (about 20 s) once, on rank 0, and its result sent to the others
    value = frechet_distance(mu, sigma, mu_ref, sigma_ref) if dist.is_main else None
    return {fid_label(n): dist.broadcast_object(value)}


# ==================================================================================================
# EXPORT: a generator's samples as files for other evaluators (EDM's fid.py, clean-fid, torch-fidelity: a folder of
# PNGs; the ADM evaluator: an .npz)
# ==================================================================================================

# Image i comes from seed i: its latent z, then (a multi-step student) the re-noising eps of each later level, drawn in
# that order from torch.Generator().manual_seed(i), as EDM's generate.py gives each seed its own generator; its label
# is i mod K, or --class. So the files depend neither on the batches nor on the number of processes, and fid() scores
# the same images: `--resume --fid-samples N` and `--export N` see seeds 0..N-1 alike.
def seed_noise(seeds, shape, levels=1):
    """Each seed's own noise: z (B, *shape), and a list of levels - 1 re-noising eps (B, *shape) for generate()."""
    draws = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        draws.append(torch.stack([torch.randn(*shape, generator=g) for _ in range(levels)]))
    draws = torch.stack(draws)  # (B, levels, *shape)
    return draws[:, 0], [draws[:, k] for k in range(1, levels)]


def export_labels(meta, seeds, class_label=None):
    """The labels (B,) of `seeds` for a conditional generator: seed mod K (class-balanced), or all class_label."""
    if not meta["cond"]:
        return None
    seeds = torch.as_tensor(list(seeds), dtype=torch.long)
    return seeds % meta["num_classes"] if class_label is None else torch.full_like(seeds, class_label)


def seed_png(folder, seed):
    """EDM's generate.py layout: DIR/<the seed's thousand, 6 digits>/<seed, 6 digits>.png."""
    return Path(folder) / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


def write_png(path, image):
    """A uint8 (H, W, 3) image as a PNG (Pillow: the same image gives the same bytes), atomically."""
    from PIL import Image
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def read_png(path):
    from PIL import Image
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))  # (H, W, 3) uint8


def write_npz(path, arrays):
    """np.savez's format (a zip of NAME.npy members, what np.load and the ADM evaluator read) with fixed member
    timestamps, so that the same arrays give the same bytes; atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, a in arrays.items():
                member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(member, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)
    write_atomically(path, write)


EXPORT_MANIFEST = "export.json"  # in --export-dir: what wrote its files (EDM's fid.py and clean-fid read images only)


def export_identity(args, net, meta, device):
    """What an export's files are a function of: the generator (a hash of its meta and its weights), --class and
    --amp (the sampler's precision); with meta, the sampler's sigmas and the image shape. Written into the export
    folder, so that a re-run completes only an export of the same generator and settings."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name, t in unwrap(net).state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp_dtype(args, device)]
    return {"format": 1, "generator": h.hexdigest(), "method": meta["method"], "sigmas": meta["sigmas"],
            "shape": meta["shape"], "class": args.class_label, "amp": amp, "files": "png"}


def _export_files(folder):
    """The files an export writes into `folder`: seed PNGs in their thousands' subfolders (and their .tmp), the
    toy2d points, the manifest."""
    folder = Path(folder)
    return [p for p in folder.glob("[0-9]" * 6 + "/*") if re.fullmatch(r"\d{6}\.png(\.tmp)?", p.name)] + \
        [p for p in (folder / "points.npz", folder / EXPORT_MANIFEST) if p.exists()]


def claim_export_dir(args, identity):
    """Rank 0, before any sampling: --export-dir holds no export, or one of this generator and these settings (which
    a re-run completes); another generator's files are refused with one line, or removed with --overwrite (its
    files alone). Then the folder's manifest records this export."""
    folder = Path(args.export_dir)
    manifest = folder / EXPORT_MANIFEST
    found = None
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text())
        except (OSError, ValueError):
            found = {"generator": "unreadable"}
    elif _export_files(folder):
        found = {"generator": "unknown (no export.json)"}
    if found is not None and found != identity:
        if not args.overwrite:
            wrote = ", ".join(f"{k} {found.get(k)}" for k in ("method", "generator", "class", "amp"))
            raise UserError(f"--export-dir {folder} holds the samples of another generator or other settings "
                            f"({wrote[:160]}); pass --overwrite to replace its files, or choose another --export-dir")
        for p in _export_files(folder):
            p.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(manifest, json.dumps(identity, indent=1) + "\n")


@torch.no_grad()
def export_samples(args, net, meta, dist):
    """--export N: the samples of seeds 0..N-1 of a generator (net, meta as load_generator returns them), sampled as
    evaluate() and fid() do (student_sampler: generate at meta's sigmas, under --amp), written as one PNG per seed
    into --export-dir (toy2d: DIR/points.npz) and / or all of them into --export-npz. Batches of --batch seeds are
    dealt round-robin to the ranks, made one at a time (memory does not grow with N); each rank writes its own
    seeds' PNGs and its rows of the .npz's array into a shared memory-mapped file, from which rank 0 writes the .npz
    (nothing goes through the process group; several nodes need a shared filesystem). Every file is written
    atomically; a batch whose PNGs all exist (an interrupted export, run again) is not sampled again, when the
    folder's manifest (claim_export_dir) says that this generator wrote them. Returns a summary dict."""
    if args.class_label is not None and not (meta["cond"] and args.class_label < meta["num_classes"]):
        raise UserError(f"--class {args.class_label}: the generator is " + (
            f"conditional on {meta['num_classes']} classes, 0..{meta['num_classes'] - 1}" if meta["cond"] else
            "unconditional"))
    n, sigmas, device, images = args.export, meta["sigmas"], dist.device, len(meta["shape"]) == 3
    npz = [Path(args.export_npz)] if args.export_npz else []
    if not images and args.export_dir:
        npz.append(Path(args.export_dir) / "points.npz")
    row_shape, row_dtype = ((*meta["shape"][1:], 3), np.uint8) if images else (tuple(meta["shape"]), np.float32)
    copies = (len(npz) + 1 if npz else 0) + bool(images and args.export_dir)  # the rows, the .npz files, the PNGs
    need = n * math.prod(row_shape) * np.dtype(row_dtype).itemsize * copies
    problem = None
    if dist.is_main:
        try:
            first = next((p for p in [*npz, Path(args.export_dir or ".")] if p), Path("."))
            parent = next(p for p in [first, *first.parents] if p.exists())
            if shutil.disk_usage(parent).free < need:
                raise UserError(f"--export {n} needs about {need / 2 ** 30:.1f} GiB in {parent}, which has "
                                f"{shutil.disk_usage(parent).free / 2 ** 30:.1f} GiB free")
            if args.export_dir:
                claim_export_dir(args, export_identity(args, net, meta, device))
        except (UserError, OSError) as e:
            problem = str(e) if isinstance(e, UserError) else f"--export-dir {args.export_dir}: {_reason(e)}"
    problem = dist.broadcast_object(problem)  # every rank stops before sampling, or none does
    if problem:
        raise UserError(problem)
    sample = student_sampler(net.to(device), sigmas, args, device)  # what evaluate() and fid() sample with
    rows = Path(str(npz[0]) + ".rows.tmp") if npz else None  # (N, *row_shape), filled in place by every rank
    if rows is not None and dist.is_main:
        np.lib.format.open_memmap(rows, mode="w+", dtype=row_dtype, shape=(n, *row_shape)).flush()
    dist.barrier()
    held = np.load(rows, mmap_mode="r+") if rows is not None else None
    try:
        bar = tqdm(total=n, unit="img", desc=f"export {meta['method']}", disable=not dist.is_main, dynamic_ncols=True)
        for start in range(dist.rank * args.batch, n, dist.world * args.batch):  # one batch at a time
            seeds = range(start, min(start + args.batch, n))
            pngs = [seed_png(args.export_dir, s) for s in seeds] if images and args.export_dir else []
            if pngs and all(p.is_file() for p in pngs):  # written by an earlier, interrupted export
                x = np.stack([read_png(p) for p in pngs]) if held is not None else None
            else:
                z, eps = seed_noise(seeds, meta["shape"], len(sigmas))
                labels = export_labels(meta, seeds, args.class_label)
                x = sample(z.to(device), labels if labels is None else labels.to(device), [e.to(device) for e in eps])
                x = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy() if images else x.cpu().numpy()
                for path, image in zip(pngs, x):
                    write_png(path, image)
            if held is not None:
                held[seeds.start:seeds.stop] = x
            round_start = start - dist.rank * args.batch  # this round's first seed, over all ranks
            bar.update(min(n, round_start + dist.world * args.batch) - round_start)
        bar.close()
        if held is not None:
            held.flush()
        dist.barrier()
        if npz and dist.is_main:
            arrays = {"arr_0": held}
            if meta["cond"]:
                arrays["arr_1"] = export_labels(meta, range(n), args.class_label).numpy()
            for path in npz:
                write_npz(path, arrays)
        dist.barrier()
    finally:
        del held
        if rows is not None and dist.is_main:
            rows.unlink(missing_ok=True)
    written = [str(p) for p in npz] + ([args.export_dir] if images and args.export_dir else [])
    if dist.is_main:
        print(f"exported {n} samples of {meta['method']} ({len(sigmas)} step{'s' * (len(sigmas) > 1)}): "
              f"{', '.join(written)}")
    return {"export": n, "files": written, "sigmas": sigmas}


def legacy_generator_meta(ckpt, path):
    """generator_meta of a generator.pt saved before generator files recorded it, from the run's config that it
    holds: the network of its --preset and its method's student_sigmas (sid.py, dmd2.py or add.py is imported; no
    other module is). Refused, with one line saying how to re-save it, when that config does not rebuild it."""
    cfg = ckpt.get("config") or {}
    method = cfg.get("method")
    try:
        args = argparse.Namespace(**cfg)
        if method == "teacher":  # common.py --regress: regression_reference's one-step map from input noise 2.5
            sigmas = [2.5]
        elif method in ("sid", "dmd2", "add"):
            sigmas = importlib.import_module(method).student_sigmas(args)
        else:
            raise ValueError(f"no method recorded (config method={method!r})")
        return generator_meta(args, dataset_info(args), sigmas)
    except (AttributeError, ImportError, KeyError, TypeError, ValueError) as e:
        script = f"{method}.py" if method in ("sid", "dmd2", "add") else "sid.py (or dmd2.py, add.py)"
        raise UserError(f"{path} predates self-describing generator files and cannot be rebuilt from its config "
                        f"({_reason(e)}); re-save it from its run folder: `python {script} --resume` with the run's "
                        f"flags (its config.json) rewrites generator.pt") from None


# ==================================================================================================
# BENCHMARK (--bench)
# ==================================================================================================

# Speed is measured here, not in tests. Every number of one --bench line comes from the same process, so the ratios
# in it (iteration vs teacher step, one-step student vs 35-NFE teacher, bf16 vs fp32, compiled vs eager) hold even on
# a noisy machine where the absolute numbers drift.
def bench_networks(args, info, dist):
    """--bench's teacher: a random-weight network of the preset (speed does not depend on the weights; also for
    --teacher edm, so nothing is downloaded), or the --teacher file, or the exact denoiser with --teacher analytic.
    Nothing is trained, cached or written. Returns (teacher, teacher_net) like load_or_train_teacher."""
    if is_edm_pickle(args.teacher):
        net = load_edm_pickle(args.teacher, args, info)
    elif args.teacher not in ("auto", "analytic", "edm"):
        net = load_teacher_file(args.teacher, args, info)
    else:
        net = build_denoiser(args, info)
    teacher_net = net.to(dist.device).eval().requires_grad_(False)
    teacher = AnalyticDenoiser(info.mixture, info.shape, cond=info.cond) if args.teacher == "analytic" else teacher_net
    return teacher, teacher_net


def _peak_memory_mb(device):
    """CUDA: the most memory tensors held since the last reset; CPU: the process's peak resident set (Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _seconds_per_call(fn, calls, device):
    """Mean wall time of fn(i) over `calls` calls, with the device synchronised at both ends."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    sync()
    return (time.perf_counter() - t0) / calls


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operator calls (aten ops, forward and backward) dispatched while it is active, and among them the
    host reads: calls that read a tensor's values on the host (.item(), bool(), nonzero, masked_select, indexing with
    a boolean mask) or make a tensor from host data (torch.tensor of Python numbers). On CUDA each host read of a
    device tensor is a sync; a blocking copy between host and device is one too, and is not seen here."""
    HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.lift_fresh",
                  "aten.is_nonzero")

    def __init__(self):
        super().__init__()
        self.calls, self.host_reads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        name = str(func)
        self.host_reads += name.startswith(self.HOST_READS) or (  # x[mask], x[mask] = y: a nonzero on the host
            name.startswith(("aten.index.", "aten.index_put")) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]))
        return func(*args, **(kwargs or {}))


def _dispatch_counts(fn, device):
    """ops_per_iter: the operator calls of one call of fn (each a kernel launch on a GPU, unless compiled or a mere
    view); host_reads_per_iter: those that read values on the host (see _OpCounter; on the CPU they include foreach
    Adam's reads of its step counters, which are host tensors: CUDA's fused Adam has none); on CUDA also
    syncs_per_iter: the host-device synchronisations of one more call, from torch's sync debug mode."""
    with _OpCounter() as counter:
        fn()
    out = {"ops_per_iter": counter.calls, "host_reads_per_iter": counter.host_reads}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["syncs_per_iter"] = sum("synchroniz" in str(w.message) for w in caught)
    return out


def bench(args, info, dist, step_fn, sample, teacher, teacher_net, nets, ema=None, student_nfe=1):
    """Time --bench-iters training iterations step_fn(step) after --bench-warmup untimed ones, one EDM teacher
    training step at the same batch (the unit of cost: how many teacher steps one iteration costs), and the student
    sampler sample(z, labels) against the teacher's Heun sampler (--teacher-steps) on one batch of the same latents.
    step_fn / sample may be None (common.py benchmarks the teacher alone). With `ema`, each timed iteration also
    updates it from nets["generator"], as the training loop does. Prints and returns one JSON-able dict."""
    device, batch = dist.device, args.batch // dist.world
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp_dtype(args, device)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    out = {"bench": args.method, "dataset": args.dataset, "resolution": args.resolution, "preset": args.preset,
           "device": name, "device_type": device.type, "amp": amp, "compile": bool(args.compile),
           "batch": args.batch, "world": dist.world, "timed_iters": args.bench_iters,
           "params": {k: unet.count_params(v) for k, v in nets.items()}, "batch_gpu": args.batch_gpu,
           "compare": args.bench_compare}
    if args.method in GRAPHS:  # update_memory's estimate, to hold against the measured peak (CUDA)
        out["estimated_peak_mb"] = update_memory(args, args.batch_gpu or batch) / 2 ** 20
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if step_fn is not None and ema is not None:
        train = step_fn

        def step_fn(i):  # the training loop's body: the iteration, then the EMA of the generator
            train(i)
            ema_update(ema, nets["generator"], args.ema, args.batch, nimg=(i + 1) * args.batch, rampup_ratio=0.05)
    if step_fn is not None:
        for i in range(args.bench_warmup):
            step_fn(i)
        s = _seconds_per_call(lambda i: step_fn(args.bench_warmup + i), args.bench_iters, device)
        out.update(ms_per_iter=1e3 * s, images_per_s=args.batch / s, peak_mem_mb=_peak_memory_mb(device))
        out.update(_dispatch_counts(lambda: step_fn(args.bench_warmup + args.bench_iters), device))

    # One EDM teacher training step (Adam, same AMP and --compile) on random images: the cost unit.
    net = copy.deepcopy(teacher_net)
    opt = optimizer([net], args, dist, lr=1e-4)

    def teacher_step(i):
        x0 = torch.rand(batch, *info.shape, device=device) * 2 - 1
        minimize(opt, edm_loss, x0=x0, labels=sample_labels(info, batch, device), sigma=edm_sigma(batch, device),
                 eps=torch.randn_like(x0))

    for i in range(args.bench_warmup):
        teacher_step(i)
    s = _seconds_per_call(teacher_step, args.bench_iters, device)
    out.update(teacher_step_ms=1e3 * s, teacher_images_per_s=args.batch / s)
    if step_fn is not None:
        out["iter_vs_teacher_step"] = out["ms_per_iter"] / out["teacher_step_ms"]
    else:
        out["peak_mem_mb"] = _peak_memory_mb(device)
    del net, opt

    # Sampling one batch: the student (student_nfe network evaluations) vs the teacher's Heun sampler.
    z = torch.randn(batch, *info.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    labels = balanced_labels(info, batch, device)
    heun = teacher_sampler(unwrap(teacher), args.teacher_steps)  # eager, as evaluations sample it
    with torch.no_grad(), autocast(args, device):
        heun(z, labels)  # warm-up
        s = _seconds_per_call(lambda i: heun(z, labels), 2, device)
    out.update(teacher_nfe=heun_nfe(args.teacher_steps), teacher_sample_ms=1e3 * s)
    if sample is not None:
        with torch.no_grad():
            sample(z, labels)
            calls = max(3, min(50, round(out["teacher_sample_ms"] / 50)))
            s = _seconds_per_call(lambda i: sample(z, labels), calls, device)
        out.update(student_nfe=student_nfe, student_sample_ms=1e3 * s,
                   sampling_speedup=out["teacher_sample_ms"] / (1e3 * s))
    out = {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}
    if dist.is_main:
        print(json.dumps(out), flush=True)
    return out


BENCH_VARIANTS = {"fp32": ["--amp", "fp32", "--no-compile"], "bf16": ["--amp", "bf16", "--no-compile"],
                  "bf16_compile": ["--amp", "bf16", "--compile"]}


def bench_compare(main, argv, base):
    """On CUDA, --bench also runs the same script in this process as fp32 eager, bf16 eager and bf16 compiled
    (whichever of them the first measurement was not) and prints one more JSON line with the three and the ratios
    bf16 / fp32 and compiled / eager of images per second. A variant that fails is reported, not fatal."""
    runs, argv = {}, list(argv) + ["--no-bench-compare"]  # the variants do not compare again
    for name, flags in BENCH_VARIANTS.items():
        if base.get("amp") == name.split("_")[0] and base.get("compile") == name.endswith("compile"):
            runs[name] = base
            continue
        gc.collect()
        torch.cuda.empty_cache()
        try:
            runs[name] = main(list(argv) + flags)
        except Exception as e:  # e.g. a torch.compile failure: report it and go on
            runs[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    keys = ("ms_per_iter", "images_per_s", "peak_mem_mb", "teacher_step_ms", "teacher_sample_ms", "student_sample_ms",
            "error")
    out = {"bench_compare": base.get("bench"), "device": base.get("device"),
           **{name: {k: r[k] for k in keys if k in r} for name, r in runs.items()}}
    speed = {name: r.get("images_per_s") or r.get("teacher_images_per_s") for name, r in runs.items()}
    if speed["fp32"] and speed["bf16"]:
        out["bf16_vs_fp32"] = round(speed["bf16"] / speed["fp32"], 3)
    if speed["bf16"] and speed["bf16_compile"]:
        out["compile_vs_eager"] = round(speed["bf16_compile"] / speed["bf16"], 3)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out), flush=True)
    return out


# ==================================================================================================
# MAIN: train or load the teacher, evaluate it with the 35-NFE sampler
# ==================================================================================================

def regression_reference(args, info, dist, teacher, teacher_net, iters, sigma_init=2.5, lr=1e-3, save=None):
    """What one step of the students' network can reach at all: the one-step generator G(z) = D_G(sigma_init z;
    sigma_init), initialised from the teacher network as every student is, regressed (L2) directly onto the
    teacher's Heun samples from the same latents z (fresh z every iteration, Adam(0.9, 0.999) at lr with cosine decay
    to 0, --batch, `iters` iterations), then evaluated like a student. No distillation method can beat this network's
    one-step optimum, so it is the reference row of the toy tables (`python common.py --regress 3000`). With `save`,
    the regressed generator is also written there, as a generator.pt (a start for --init-generator)."""
    generator = copy.deepcopy(teacher_net).train().requires_grad_(True)
    opt = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.9, 0.999))
    target = teacher_sampler(teacher, args.teacher_steps)
    for step in tqdm(range(iters), desc="regression", disable=not dist.is_main, dynamic_ncols=True):
        z = torch.randn(args.batch, *info.shape, device=dist.device)
        labels = torch.randint(info.num_classes, (args.batch,), device=dist.device) if info.cond else None
        with torch.no_grad():
            x_teacher = target(z, labels)
        for group in opt.param_groups:
            group["lr"] = lr * lr_decay_factor("cosine", step, iters)
        loss = (generate(generator, z, labels, [sigma_init]) - x_teacher).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if save is not None and dist.is_main:
        save_checkpoint(save, {"generator": generator}, iters, vars(args),
                        meta=generator_meta(args, info, [sigma_init], method="regression"))
    return evaluate(args, info, student_sampler(generator.eval(), [sigma_init], args, dist.device), dist,
                    tag="regression")[0]


def main(argv=None):
    parser = base_parser("Train (or load) the EDM teacher and evaluate its Heun sampler.", method="teacher")
    parser.add_argument_group("reference").add_argument(
        "--regress", type=COUNT0, default=0, metavar="ITERS",
        help="also regress a one-step copy of the teacher network onto the teacher's samples for ITERS iterations and "
             "evaluate it: the best one step of this network can do (regression_reference); the regressed generator "
             "is saved beside the teacher as regression-<analytic|teacher>-<ITERS>-seed<S>.pt (for --init-generator)")
    args = parse_args(parser, argv=argv)
    dist = init_distributed(args)
    if args.generator:  # --generator PATH --export N: a saved generator's samples as files, and nothing else
        net, meta = load_generator(args.generator, dist.device)
        return export_samples(args, net, meta, dist)
    info = dataset_info(args)
    if dist.is_main:
        print(json.dumps(vars(args), indent=1, sort_keys=True))
    if args.bench:  # the teacher's own training step and sampler, on random weights
        teacher, teacher_net = bench_networks(args, info, dist)
        return bench(args, info, dist, None, None, teacher, teacher_net, {"teacher": teacher_net}, student_nfe=None)
    if args.fid_samples:
        fid_reference(args, info, dist)
    t0 = time.time()
    teacher, teacher_net = load_or_train_teacher(args, info, dist)
    out = teacher_file(args).parent  # the teacher's folder (--teacher edm: --teacher-dir)
    nfe = heun_nfe(args.teacher_steps)
    metrics, x = evaluate(args, info, teacher_sampler(teacher_net, args.teacher_steps), dist, tag=f"teacher-{nfe}nfe")
    result = {"teacher": metrics, "nfe": nfe, "params": unet.count_params(teacher_net),
              "wall_s": round(time.time() - t0, 1), **fid_ref_record(args, metrics)}
    x_exact = None
    if info.mixture is not None:
        result["analytic"], x_exact = evaluate(args, info, teacher_sampler(
            AnalyticDenoiser(info.mixture, info.shape, info.cond), args.teacher_steps), dist, tag="analytic")
    if args.regress:  # the regressed generator, named by its target, length and seed
        kind = "analytic" if args.teacher == "analytic" else "teacher"
        result["regression"] = regression_reference(args, info, dist, teacher, teacher_net, args.regress,
                                                    save=out / f"regression-{kind}-{args.regress}-seed{args.seed}.pt")
    if dist.is_main:
        save_picture(out / f"teacher-{nfe}nfe.png", info, x, reference=x_exact)
        (out / f"eval-{nfe}nfe.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
        print(f"picture: {out / f'teacher-{nfe}nfe.png'}")
    return result


if __name__ == "__main__":
    run_main(main)
