"""Files from users never run code (SECURITY.md): checkpoints, transfer sets and training
sources through ``torch.load(weights_only=True)``, config files through TOML. Each payload
below runs code under a plain ``pickle``/``torch.load(weights_only=False)``; phalanx must refuse
it with one error line, and the marker file must never appear."""

from __future__ import annotations

import pickle

import pytest
import torch

from conftest import run_cli
from phalanx.ensembles import load_ensemble, save_ensemble
from phalanx.errors import PhalanxError
from phalanx.evaluation import load_surrogates, load_transfer_sets


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture
def evil_pt(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil" / "ensemble.pt"
    path.parent.mkdir()
    torch.save({"format": "phalanx-ensemble", "members": _Payload(str(marker))}, path)
    torch.load(path, weights_only=False)  # the payload is live ...
    assert marker.exists()
    marker.unlink()  # ... and gone again before phalanx reads it
    return path, marker


def test_library_readers_refuse_code_in_pt_files(evil_pt, tmp_path) -> None:
    path, marker = evil_pt
    for read in (load_ensemble, load_transfer_sets, lambda p: load_surrogates([p])):
        with pytest.raises(PhalanxError, match="not a readable phalanx") as exc:
            read(path)
        assert "weights_only=False" not in str(exc.value)  # never advise the unsafe load
    assert not marker.exists()


def test_cli_refuses_code_in_checkpoints_and_transfer_sets(evil_pt, mlp_ensemble, capsys, tmp_path) -> None:
    path, marker = evil_pt
    good = tmp_path / "good" / "ensemble.pt"
    save_ensemble(mlp_ensemble, good, dataset="digits")
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "sets.pt").write_bytes(path.read_bytes())
    runs = [
        ["evaluate", str(path), "--limit", "8"],
        ["attack", str(path), "--limit", "8"],
        ["attack", str(good), str(path), "--transfer-sets", "--limit", "8"],
        ["evaluate", str(good), "--protocol", "blackbox", "--surrogates", str(path), "--limit", "8"],
        ["evaluate", str(good), "--protocol", "blackbox", "--transfer-sets", str(sets), "--limit", "8"],
    ]
    for i, argv in enumerate(runs):
        code, _, err = run_cli([*argv, "--out", str(tmp_path / f"o{i}"), "--no-progress"], capsys)
        assert code == 2 and "Traceback" not in err, (argv, err)
        assert "not a readable phalanx" in err, (argv, err)
    assert not marker.exists()


def test_config_files_are_data(tmp_path, capsys) -> None:
    """A config is TOML: text that would be code elsewhere is at most a bad value."""
    marker = tmp_path / "pwned"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nname = "__import__(\'os\').system(\'touch {marker}\')"\n')
    code, _, err = run_cli(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2 and "Traceback" not in err
    (tmp_path / "p.toml").write_bytes(pickle.dumps(_Payload(str(marker))))
    code, _, err = run_cli(["train", "--config", str(tmp_path / "p.toml"), "--out", str(tmp_path / "r2")], capsys)
    assert code == 2 and "Traceback" not in err
    assert not marker.exists()
