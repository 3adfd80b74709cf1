"""SimCLR (Chen et al. 2020) on CIFAR-10, one module per stage.

Stages: data, augment, models, loss, optim, train, evaluate, viz; `jobs` and `cli` tie them together.
"""

__version__ = "0.1.0"
