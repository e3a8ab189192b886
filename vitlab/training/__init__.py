"""Training: MNIST data and batches, the optimiser recipe, one step, the loop (``fit``), checkpoints and
the shipped model. The command lines on top of it are ``vitlab.train`` and ``vitlab.evaluate``."""
