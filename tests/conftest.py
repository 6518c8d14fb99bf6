"""Test-session settings: one torch thread per pytest-xdist worker (the workers already fill the cores;
more threads than cores only slows every worker down)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
