"""Shared test settings."""

import torch

# The tests run tiny models, where intra-op threads only add synchronisation: on a busy
# two-core machine a 16-wide Linear took 18 ms with two threads and 0.1 ms with one.
torch.set_num_threads(1)
