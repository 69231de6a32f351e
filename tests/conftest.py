"""Shared test setup.

Without CUDA, the Triton kernels run on CPU tensors under Triton's interpreter. The variable must
be set before anything imports triton, so it is set here, when pytest loads this file, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
