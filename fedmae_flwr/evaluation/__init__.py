"""Downstream and reconstruction evaluation: model-agnostic, on tensors and ``nn.Module``s.

- :mod:`~fedmae_flwr.evaluation.reconstruction`: masked-pixel PSNR, the mean-fill baseline, and
  PNG grids of original / masked / reconstructed images.
- :mod:`~fedmae_flwr.evaluation.features`: frozen-feature extraction.
- :mod:`~fedmae_flwr.evaluation.linear_probe`: MAE's linear probe (its lr chosen on a
  validation share: ``tuned_linear_probe``) and DINO's weighted kNN.
- :mod:`~fedmae_flwr.evaluation.finetune`: end-to-end fine-tuning with a fresh linear head.
- :mod:`~fedmae_flwr.evaluation.protocol`: fine-tuning over K disjoint label subsets (mean, std,
  each subset), the lr chosen on a validation share, the test set scored once.
"""

from fedmae_flwr.evaluation.features import extract_features
from fedmae_flwr.evaluation.finetune import FinetuneResult, finetune
from fedmae_flwr.evaluation.linear_probe import (
    ProbeResult,
    knn_accuracy,
    linear_probe,
    tuned_linear_probe,
)
from fedmae_flwr.evaluation.reconstruction import (
    masked_psnr,
    mean_fill_baseline,
    save_reconstruction_grid,
)

__all__ = [
    "FinetuneResult",
    "ProbeResult",
    "extract_features",
    "finetune",
    "knn_accuracy",
    "linear_probe",
    "masked_psnr",
    "mean_fill_baseline",
    "save_reconstruction_grid",
    "tuned_linear_probe",
]
