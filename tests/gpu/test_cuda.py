"""CUDA checks (run by benchmarks/gpu_check.py on a GPU machine; skipped without a GPU): training
and attacks on the GPU agree with the CPU, and engine tasks that ask for a GPU get one."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _ensemble(digits):
    from phalanx import Ensemble, create_model

    torch.manual_seed(0)
    return Ensemble([create_model("mlp", digits.in_shape, 10, mean=digits.mean, std=digits.std, widths=[16])
                     for _ in range(2)])


def test_training_on_cuda_matches_cpu(digits):
    from phalanx import TrainConfig, create_method, fit

    weights = {}
    for dev in ("cpu", "cuda"):
        ens = _ensemble(digits)
        fit(ens, create_method("baseline"), digits, TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=0, device=dev),
            progress=False)
        weights[dev] = {k: v.cpu() for k, v in ens.state_dict().items()}
    for k in weights["cpu"]:
        torch.testing.assert_close(weights["cuda"][k], weights["cpu"][k], rtol=1e-3, atol=1e-4)


def test_pgd_on_cuda_stays_in_the_ball_and_matches_cpu(digits, mlp_ensemble):
    from phalanx.attacks import create_attack
    from phalanx.types import Norm, ThreatModel

    threat = ThreatModel(Norm.LINF, 0.1)
    x, y = digits.test.x[:64], digits.test.y[:64]
    acc = {}
    for dev in ("cpu", "cuda"):
        ens = mlp_ensemble.to(dev)
        adv = create_attack("pgd", steps=20)(ens, x.to(dev), y.to(dev), threat)
        assert float((adv.cpu() - x).abs().max()) <= 0.1 + 1e-6
        with torch.no_grad():
            acc[dev] = float((ens(adv).argmax(-1).cpu() == y).float().mean())
    mlp_ensemble.to("cpu")
    assert abs(acc["cpu"] - acc["cuda"]) <= 0.05


def test_local_engine_gives_a_gpu_task_its_device():
    from phalanx.engines import LocalEngine, Task, probes

    with LocalEngine(workers=2) as eng:
        out = {o.key: o for o in eng.run([Task("gpu", probes.cuda_info, gpus=1), Task("cpu", probes.cuda_info)])}
    assert out["gpu"].ok and out["gpu"].value["available"] and out["gpu"].value["count"] == 1
    assert out["gpu"].value["sum"] == 4.0
    assert out["cpu"].ok and not out["cpu"].value["available"]  # CPU tasks see no GPU
