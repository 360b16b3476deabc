"""Tip-Adapter-F (Zhang et al., ECCV 2022): Tip-Adapter whose cache keys are fine-tuned, then alpha and beta searched.

The model, the cache, the logits and the validation-only search are Tip-Adapter's (:mod:`coopipe.methods.tipadapter`);
here the keys (N, D) are a learned parameter, trained with cross-entropy on the Tip-Adapter logits at the initial
alpha and beta, and the search runs once on the trained keys after the last epoch (``gaopengcuhk/Tip-Adapter:
main.py``, ``run_tip_adapter_F``: ``adapter.weight`` initialised to the keys, then ``search_hp(..., adapter=adapter)``).

Paper setting (``main.py`` and ``configs/*.yaml``): AdamW, lr 0.001 (``lr``), eps 1e-4, weight decay 0.01 (AdamW's
default: the repository passes none), batch 256 (``train_loader_F``), no warm-up, cosine decay to 0 over the run;
20 epochs (``train_epoch``; EuroSAT's config: 100). One cached augmented view per image per epoch stands for the
repository's fresh random crop. Departures: the cosine is stepped per epoch, not per batch (equal while a split holds
at most 256 images: one batch per epoch); the result is the last epoch's keys, not the epoch of the best TEST
accuracy the repository keeps (that choice reads the test split).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from coopipe.methods.registry import Optimization, epochs_for
from coopipe.methods.tipadapter import TipAdapter

__all__ = ["TIP_F_EPOCHS", "TipAdapterF"]

TIP_F_EPOCHS = 20  # configs/*.yaml: train_epoch
TIP_F_EPOCHS_BY_DATASET = {"eurosat": 100}  # configs/eurosat.yaml


class TipAdapterF(TipAdapter):
    name = "tipadapterf"
    title = "Tip-Adapter-F"
    paper = ("Tip-Adapter-F, Tip-Adapter with fine-tuned cache keys (Zhang et al., Tip-Adapter: Training-free "
             "Adaption of CLIP for Few-shot Classification, ECCV 2022)")
    trains = True

    def epochs(self, shots: int, dataset: str | None = None) -> int:
        epochs_for(shots, dataset)  # validates shots
        return TIP_F_EPOCHS_BY_DATASET.get((dataset or "").lower(), TIP_F_EPOCHS)

    def train_setting(self, shots: int, dataset: str | None = None) -> dict[str, Any]:
        return {**super().train_setting(shots, dataset), "lr": 1e-3, "warmup_epoch": 0, "weight_decay": 0.01}

    def optimizer(self, params: Mapping[str, nn.Parameter], opt: Optimization) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(params.values()), lr=opt.lr, eps=1e-4, weight_decay=opt.weight_decay)
