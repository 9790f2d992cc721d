"""Binary digits classifiers shaped like Gross et al.'s benchmarks (section 6.1): small ReLU
networks on 8x8 images of two digit classes (e.g. 0-vs-1, 3-vs-6, 7-vs-8), trained with the one
training loop (``phalanx.training.fit``), and the labelled points X an experiment attacks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from phalanx.data import DatasetSplits, Split, load_dataset
from phalanx.ensembles import Ensemble
from phalanx.errors import PhalanxError


def _binary_split(split: Split, pair: tuple[int, int]) -> Split:
    keep = (split.y == pair[0]) | (split.y == pair[1])
    return Split(split.x[keep].clone(), (split.y[keep] == pair[1]).long())


def binary_pair(ds: DatasetSplits, pair: Sequence[int]) -> DatasetSplits:
    """``ds`` restricted to two classes, relabelled ``pair[0] -> 0`` and ``pair[1] -> 1``."""
    if len(pair) != 2:
        raise PhalanxError(f"pair must name two classes, got {list(pair)}")
    a, b = (int(v) for v in pair)
    if a == b or not (0 <= a < ds.num_classes and 0 <= b < ds.num_classes):
        raise PhalanxError(f"pair must be two different classes in 0..{ds.num_classes - 1}, got {list(pair)}")
    return DatasetSplits(f"{ds.name}_{a}_{b}", _binary_split(ds.train, (a, b)), _binary_split(ds.val, (a, b)),
                         _binary_split(ds.test, (a, b)), (ds.class_names[a], ds.class_names[b]), ds.mean, ds.std,
                         meta={"pair": [a, b]})


def binary_digits(pair: tuple[int, int] = (0, 1), *, seed: int = 0) -> DatasetSplits:
    """The 8x8 digits restricted to two digits (the paper's ``mnist_x_y`` benchmarks' shape)."""
    return binary_pair(load_dataset("digits", seed=seed), pair)


def train_binary_classifiers(data: DatasetSplits, *, num: int = 3, widths: Sequence[int] = (10,),
                             member_widths: Sequence[Sequence[int]] | None = None,
                             epochs: int = 15, seed: int = 0, progress: bool = False) -> Ensemble:
    """``num`` MLPs (64 -> widths -> 2), each trained from its own seed with Adam (the paper
    trains its classifiers with Adam or SGD); ``member_widths`` gives each member its own hidden
    widths (then ``num`` is its length). Returned in eval mode."""
    from phalanx.models import create_model
    from phalanx.training import TrainConfig, create_method, fit

    shapes = [list(w) for w in member_widths] if member_widths is not None else [list(widths)] * num
    if not shapes:
        raise PhalanxError("need at least one classifier")
    members = []
    for k, w in enumerate(shapes):
        torch.manual_seed(seed * 1000 + k)
        m = create_model("mlp", data.in_shape, data.num_classes, widths=w, mean=data.mean, std=data.std)
        ens = Ensemble([m])
        fit(ens, create_method("baseline"), data,
            TrainConfig(epochs=epochs, batch_size=32, optimizer="adam", lr=1e-2, weight_decay=0.0,
                        schedule="constant", seed=seed * 1000 + k, device="cpu"), progress=progress)
        members.append(m.eval())
    return Ensemble(members).eval()


def attack_points(split: Split, classifiers: Sequence[torch.nn.Module], num: int, *,
                  balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num`` points of ``split`` that every classifier gets right (alternating the
    two labels when ``balanced``), so that eps alone decides the attack's success."""
    with torch.no_grad():
        ok = torch.stack([m(split.x).argmax(-1) == split.y for m in classifiers]).all(0)
    idx = np.flatnonzero(ok.numpy())
    if balanced:
        by = [idx[split.y.numpy()[idx] == c] for c in (0, 1)]
        order = [int(v) for pair in zip(*by, strict=False) for v in pair]
        idx = np.array(order + [int(v) for v in idx if int(v) not in order], dtype=np.int64)
    if idx.size < num:
        raise PhalanxError(f"only {idx.size} points are classified correctly by every classifier; asked for {num}")
    sel = torch.as_tensor(idx[:num])
    return split.x[sel].clone(), split.y[sel].clone()
