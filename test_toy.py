"""Numerical checks of the maths on exact Gaussian mixtures, toy-scale convergence runs, and smoke runs of every
script. Run with `python -m pytest -q` (a few minutes on 2 CPU cores).

The identities are numbered as at the end of ../shared/METHODS.md.
"""

import pytest
import torch

import common

torch.set_num_threads(2)

# A shorter teacher than the default (3000 iterations) keeps the suite fast; it is still close to exact.
TOY_TEACHER_ITERS = 1500


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory):
    """Train the toy2d teacher once per session. Returns (flags that reuse it, common.main's result dict)."""
    d = tmp_path_factory.mktemp("teachers")
    flags = ["--dataset", "toy2d", "--teacher-dir", str(d), "--teacher-iters", str(TOY_TEACHER_ITERS)]
    result = common.main(flags)
    return flags, result
