"""Contract tests for every registered training method, plus method-specific properties."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from phalanx import Ensemble, create_model
from phalanx.ensembles import save_ensemble
from phalanx.errors import PhalanxError
from phalanx.training import METHODS, Batch, StepContext, TrainConfig, create_method, fit
from phalanx.training.common import generation_mode, member_input_gradients
from phalanx.training.dverge import DVERGE, cross_member_loss, epoch_layers
from phalanx.training.trs import smoothness_pgd, trs_eps

FAST: dict[str, dict[str, Any]] = {
    "baseline": {},
    "adp": {},
    "gal": {"noise_std": 0.05},
    "trs": {"steps": 2},
    "smd": {},
    "dverge": {"steps": 3},
    "dverge+advt": {"steps": 3, "adv_steps": 2},
    "smd+": {"steps": 3},
    "advt": {"eps": 0.1, "step_size": 0.05, "steps": 2},
    "eat": {"eps": 0.1, "step_size": 0.05, "steps": 2},
    "igat": {"base": "adp", "eps": 0.1, "step_size": 0.05, "steps": 2},
}


def _ensemble(digits: Any, m: int, seed: int = 0, model: str = "mlp", **opts: Any) -> Ensemble:
    torch.manual_seed(seed)
    if model == "mlp":
        opts = {"widths": [24], "activation": "leaky_relu", **opts}
    return Ensemble([create_model(model, digits.in_shape, digits.num_classes, mean=digits.mean, std=digits.std,
                                  **opts) for _ in range(m)])


@pytest.fixture(scope="module")
def source_ckpt(digits: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eat") / "source.pt"
    save_ensemble(_ensemble(digits, 2, seed=99).eval(), path, dataset="digits")
    return path


def _method(name: str, source_ckpt: Path) -> Any:
    opts = dict(FAST[name])
    if name == "eat":
        opts["sources"] = [str(source_ckpt)]
    return create_method(name, **opts)


def _batch(digits: Any, n: int = 48, offset: int = 0) -> Batch:
    x, y = digits.train.x[offset:offset + n], digits.train.y[offset:offset + n]
    xt, yt = digits.train.x[offset + n:offset + 2 * n], digits.train.y[offset + n:offset + 2 * n]
    return Batch(x, y, xt, yt)


def _ctx(seed: int = 0) -> StepContext:
    return StepContext(0, 0, 0, 10, 4, torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_every_registered_method_is_covered() -> None:
    assert set(METHODS.names()) == set(FAST)


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("name", sorted(FAST))
def test_finite_loss_and_gradients(digits: Any, source_ckpt: Path, name: str, m: int) -> None:
    ens = _ensemble(digits, m).train()
    method = _method(name, source_ckpt)
    ctx = _ctx()
    method.start_epoch(ens, ctx)
    out = method.loss(ens, _batch(digits), ctx)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for i, member in enumerate(ens.members):
        grads = [p.grad for p in member.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), f"member {i}"
        assert any(g.abs().sum() > 0 for g in grads if g is not None), f"member {i} gets no gradient"
    assert all(torch.isfinite(v).all() for v in out.metrics.values())


@pytest.mark.parametrize("name", sorted(FAST))
def test_loss_decreases_on_a_fixed_batch(digits: Any, source_ckpt: Path, name: str) -> None:
    ens = _ensemble(digits, 3, seed=1).train()
    method = _method(name, source_ckpt)
    batch = _batch(digits, 64)
    opt = torch.optim.Adam(ens.parameters(), lr=3e-3)

    def value() -> torch.Tensor:
        ctx = _ctx(5)  # the same random draws each time: the loss is a function of the weights
        method.start_epoch(ens, ctx)
        return method.loss(ens, batch, ctx).loss

    first = value().item()
    for _ in range(15):
        opt.zero_grad()
        value().backward()
        opt.step()
    assert value().item() < first


def test_variants_are_settings_and_reject_unknown_options() -> None:
    smd_plus = create_method("smd+")
    assert isinstance(smd_plus, DVERGE) and smd_plus.smd_lambda == 1.0 and not smd_plus.plus_adv
    advt = create_method("dverge+advt", lam=0.5)
    assert isinstance(advt, DVERGE) and advt.plus_adv and advt.lam == 0.5
    assert advt.describe()["variant"] == "dverge+advt"
    with pytest.raises(PhalanxError, match="accepted"):
        create_method("smd+", lamda=2)
    with pytest.raises(PhalanxError, match="accepted"):
        create_method("adp", gamma=1)
    with pytest.raises(PhalanxError):
        create_method("igat", base="igat")
    with pytest.raises(PhalanxError):
        create_method("igat", rule="uniform")
    with pytest.raises(PhalanxError, match="source"):
        create_method("eat")
    with pytest.raises(PhalanxError):
        create_method("dverge", generation="test")


def test_igat_wraps_its_base(digits: Any) -> None:
    m = create_method("igat", base="dverge", base_options={"steps": 2}, combiner="max-prob")
    assert m.needs_target_batch and m.base_method.steps == 2  # type: ignore[attr-defined]
    d = m.describe()
    assert d["name"] == "igat" and d["base_method"]["name"] == "dverge"
    assert not create_method("igat", base="adp").needs_target_batch


def test_dverge_cross_member_loss_equals_reference_form(digits: Any) -> None:
    ens = _ensemble(digits, 3)
    y = digits.train.y[:16]
    dist = [digits.train.x[16 * i:16 * (i + 1)] for i in range(3)]
    got = cross_member_loss(ens.members, dist, y)
    ce = torch.nn.functional.cross_entropy
    for i, mem in enumerate(ens.members):
        want = sum(ce(mem(d), y) for j, d in enumerate(dist) if j != i)
        assert got[i].detach().item() == pytest.approx(want.detach().item(), rel=1e-5)  # type: ignore[union-attr]


def test_dverge_layers_per_epoch() -> None:
    layers = [epoch_layers([4, 4, 4], torch.Generator().manual_seed(s)) for s in range(200)]
    assert all(len(set(ls)) == 1 for ls in layers)  # one layer for all members, as the reference
    assert {ls[0] for ls in layers} == {1, 2, 3, 4}
    hetero = epoch_layers([2, 20], torch.Generator().manual_seed(3))
    assert 1 <= hetero[0] <= 2 and 1 <= hetero[1] <= 20


def test_dverge_trains_through_fit_and_records_layers(digits: Any) -> None:
    ens = _ensemble(digits, 2, model="small-cnn")
    seen: list[int] = []
    method = DVERGE(steps=2)
    orig = method.start_epoch

    def spy(e: Ensemble, ctx: StepContext) -> None:
        orig(e, ctx)
        seen.append(ctx.epoch_state["dverge_layers"][0])

    method.start_epoch = spy  # type: ignore[method-assign]
    data = dataclasses.replace(digits, train=digits.train.subset(200), val=digits.val.subset(50))
    res = fit(ens, method, data, TrainConfig(epochs=2, batch_size=50, lr=0.01, device="cpu"), progress=False)
    assert len(seen) == 2 and all(1 <= s <= ens.members[0].num_feature_layers for s in seen)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in res.history)


def test_generation_mode_restores_every_module() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Dropout())
    net.train()
    net[1].eval()
    with generation_mode(net, "eval"):
        assert not any(m.training for m in net.modules())
    assert net.training and not net[1].training and net[2].training
    with generation_mode(net, "train"):
        assert all(m.training for m in net.modules())
    assert not net[1].training


def test_trs_pgd_stays_in_ball_and_increases_gradient_magnitude(digits: Any) -> None:
    ens = _ensemble(digits, 2)
    x, y = digits.train.x[:32], digits.train.y[:32]
    adv = smoothness_pgd(ens, x, y, 0.2, steps=6, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.2 + 1e-6 and adv.min() >= 0 and adv.max() <= 1

    def magnitude(inp: torch.Tensor) -> float:
        g, _ = member_input_gradients(ens.members, inp, y, create_graph=False)
        return float(g.pow(2).sum())

    assert magnitude(adv) > magnitude(x)
    assert trs_eps(0, 10, 0.1, 0.2) == pytest.approx(0.1) and trs_eps(5, 10, 0.1, 0.2) == pytest.approx(0.15)


def test_smd_saliency_kinds(digits: Any) -> None:
    ens = _ensemble(digits, 2)
    x, y = digits.train.x[:4], digits.train.y[:4]
    g_logit, _z = member_input_gradients(ens.members, x, y, kind="logit", create_graph=False)
    g_prob, _ = member_input_gradients(ens.members, x, y, kind="prob", create_graph=False)
    # d softmax_y / dx = p_y (d z_y/dx - sum_k p_k dz_k/dx): checked against autograd per example
    xi = x[:1].clone().requires_grad_(True)
    p = torch.softmax(ens.members[0](xi), -1)[0, y[0]]
    want, = torch.autograd.grad(p, xi)
    assert torch.allclose(g_prob[0, :1], want, atol=1e-6)
    assert g_logit.shape == g_prob.shape == (2, *x.shape)


@pytest.mark.parametrize("model", ["mlp", "lenet5", "mnist-convnet", "small-cnn", "resnet20"])
@pytest.mark.parametrize("name", ["smd+", "igat"])
def test_feature_and_saliency_methods_on_every_model(digits: Any, model: str, name: str) -> None:
    from phalanx.models import MODELS

    assert model in MODELS
    torch.manual_seed(0)
    # 8x8 digits upsampled to 28x28 so every architecture (LeNet-5, mnist-convnet) fits
    x = torch.nn.functional.interpolate(digits.train.x[:8], size=(28, 28), mode="bilinear").clamp(0, 1)
    y = digits.train.y[:8]
    ens = Ensemble([create_model(model, (1, 28, 28), 10) for _ in range(2)]).train()
    opts = {"steps": 1} if name == "smd+" else {"base": "dverge", "base_options": {"steps": 1}, "steps": 1,
                                                "eps": 0.1, "step_size": 0.1}
    method = create_method(name, **opts)
    ctx = _ctx()
    method.start_epoch(ens, ctx)
    out = method.loss(ens, Batch(x, y, x.flip(0), y.flip(0)), ctx)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in ens.parameters())
