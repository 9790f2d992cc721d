"""Shared fixtures: tiny CPU models on the embedded digits data, and real MNIST when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)  # the cores are shared and noisy: one thread avoids oversubscription

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"


def mnist_available() -> bool:
    return (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


requires_mnist = pytest.mark.skipif(not mnist_available(), reason="real MNIST not found in ../shared/data/mnist")


@pytest.fixture(scope="session")
def digits():
    from phalanx.data import load_dataset

    return load_dataset("digits", seed=0)


def _train(digits, model: str, members: int, epochs: int, seed: int, **opts):
    from phalanx import Ensemble, TrainConfig, create_method, create_model, fit

    torch.manual_seed(seed)
    ens = Ensemble([create_model(model, digits.in_shape, digits.num_classes, mean=digits.mean, std=digits.std, **opts)
                    for _ in range(members)])
    fit(ens, create_method("baseline"), digits,
        TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=seed, device="cpu"), progress=False)
    return ens.eval()


@pytest.fixture(scope="session")
def mlp_ensemble(digits):
    """3 trained digits MLPs (64-32 -> 10), ~95% clean accuracy. Do not modify in tests."""
    return _train(digits, "mlp", 3, 8, 0, widths=[32])


@pytest.fixture(scope="session")
def cnn_ensemble(digits):
    """3 trained digits small CNNs, ~98% clean accuracy. Do not modify in tests."""
    return _train(digits, "small-cnn", 3, 6, 1)


@pytest.fixture(scope="session")
def tiny_mlp_pair(digits):
    """2 trained digits MLPs with one hidden layer of 10 units (small enough for exact solvers)."""
    return _train(digits, "mlp", 2, 10, 2, widths=[10])


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    """Run ``phalanx ARGV`` in-process; return (exit code, stdout, stderr)."""
    from phalanx.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


class ScaledLogits(torch.nn.Module):
    """A member whose logits are multiplied by ``factor`` (one member dominating an average)."""

    def __init__(self, member: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.member, self.factor = member, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member(x) * self.factor  # type: ignore[no-any-return]


def assert_child_dies_with_driver(code: str, mark: Path) -> None:
    """Run ``code`` in a driver process whose child writes its pid to ``mark`` and then sleeps;
    SIGKILL the driver and assert that the child ends too."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while not (mark.is_file() and mark.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(mark.read_text())
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, 9)
    raise AssertionError("a child process outlived its driver")
