from __future__ import annotations

import pytest
import torch

from phalanx.ensembles import Ensemble, checkpoint_info, load_ensemble, save_ensemble
from phalanx.errors import CheckpointError, PhalanxError
from phalanx.models import create_model


def _ens():
    torch.manual_seed(0)
    return Ensemble([create_model("small-cnn", (1, 8, 8), 10, mean=[0.3], std=[0.4]),
                     create_model("mlp", (1, 8, 8), 10, widths=[7], activation="leaky_relu"),
                     create_model("resnet20", (1, 8, 8), 10, width=4)], "max-prob").eval()


def test_roundtrip_bit_identical(tmp_path):
    ens = _ens()
    path = save_ensemble(ens, tmp_path / "e.pt", dataset="digits", extra={"note": 1})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    back = load_ensemble(path)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(ens(x), back(x))
        assert torch.equal(ens.member_logits(x), back.member_logits(x))
    info = checkpoint_info(path)
    assert info["dataset"] == "digits" and info["combiner"] == "max-prob"
    assert [m["name"] for m in info["members"]] == ["small-cnn", "mlp", "resnet20"]
    assert info["normalization"] == {"mean": [0.3], "std": [0.4]}
    # loadable with plain weights_only torch.load
    assert torch.load(path, weights_only=True)["format"] == "phalanx-ensemble"


def test_corrupted_and_foreign_files(tmp_path):
    path = save_ensemble(_ens(), tmp_path / "e.pt")
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_ensemble(tmp_path / "trunc.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a phalanx ensemble"):
        load_ensemble(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_ensemble(tmp_path / "missing.pt")


def test_architecture_mismatch(tmp_path):
    ens = _ens()
    state = torch.load(save_ensemble(ens, tmp_path / "e.pt"), weights_only=True)
    state["members"][1]["config"] = state["members"][1]["config"].replace('"widths": [7]', '"widths": [8]')
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not match architecture 'mlp'"):
        load_ensemble(tmp_path / "bad.pt")


def test_members_without_config_cannot_be_saved(tmp_path):
    with pytest.raises(PhalanxError, match="no model config"):
        save_ensemble(Ensemble([torch.nn.Linear(2, 2)]), tmp_path / "x.pt")
