"""Clean accuracy of an ensemble and of each member, and member agreement."""

from __future__ import annotations

from typing import Any

import torch

from phalanx.data import Split, iterate_batches
from phalanx.ensembles import Ensemble


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_clean(ensemble: Ensemble, split: Split, batch_size: int = 500) -> dict[str, Any]:
    """Accuracy of the ensemble and each member, and the fraction where all members agree.
    For a randomized ensemble the accuracy is the exact expectation over the draw.
    Runs in eval mode and restores the previous mode."""
    was_training = ensemble.training
    ensemble.eval()
    device = model_device(ensemble)
    correct = torch.zeros((), dtype=torch.float64)
    member_correct = torch.zeros(len(ensemble), dtype=torch.long)
    agree = torch.zeros((), dtype=torch.long)
    pair_agree = torch.zeros(len(ensemble), len(ensemble), dtype=torch.long)
    for x, y in iterate_batches(split, batch_size):
        x, y = x.to(device), y.to(device)
        logits = ensemble.member_logits(x)
        correct += ensemble.correct_probability(logits, y).sum().double().cpu()
        mpred = logits.argmax(-1)
        member_correct += (mpred == y).sum(1).cpu()
        agree += (mpred == mpred[:1]).all(0).sum().cpu()
        pair_agree += (mpred[:, None] == mpred[None]).sum(-1).cpu()
    ensemble.train(was_training)
    n = max(len(split), 1)
    return {"accuracy": correct.item() / n, "member_accuracy": (member_correct.double() / n).tolist(),
            "agreement": agree.item() / n, "pairwise_agreement": (pair_agree.double() / n).tolist(),
            "n": len(split)}
