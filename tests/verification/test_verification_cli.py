"""CLI: verify pairs (with resumption), verify ensemble, select, export-vnnlib."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from phalanx.cli.main import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, digits):
    from phalanx import Ensemble, TrainConfig, create_method, create_model, fit
    from phalanx.ensembles import save_ensemble

    torch.manual_seed(3)
    ens = Ensemble([create_model("mlp", digits.in_shape, 10, mean=digits.mean, std=digits.std, widths=[8])
                    for _ in range(3)], "mean-logits")
    fit(ens, create_method("baseline"), digits, TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=3, device="cpu"),
        progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "cands.pt"
    save_ensemble(ens.eval(), path, dataset="digits")
    mp = tmp_path_factory.mktemp("ckpt") / "meanprob.pt"
    save_ensemble(Ensemble(list(ens.members), "mean-prob"), mp, dataset="digits")
    return path, mp


def test_verify_pairs_and_resume(checkpoint, tmp_path, capsys) -> None:
    path, _ = checkpoint
    args = ["verify", "pairs", str(path), "--points", "3", "--eps", "0.05,0.15", "--members", "0,1,2",
            "--out", str(tmp_path), "--no-progress", "--timeout", "30"]
    main(args)
    res = json.loads((tmp_path / "verify_pairs.json").read_text())
    assert res["summary"]["queries"] == 3 * 3 * 2
    assert res["attack_comparison"]["attack_sat_on_unsat"] == 0
    assert set(res["scores"]["uniqueness"]) == {"0.05", "0.15"}
    assert "table V" in (tmp_path / "report.md").read_text()
    n_lines = len((tmp_path / "queries.jsonl").read_text().splitlines())
    main(args)  # a second run finds every query in the store
    assert len((tmp_path / "queries.jsonl").read_text().splitlines()) == n_lines


def test_verify_ensemble_and_mean_prob_error(checkpoint, tmp_path, capsys) -> None:
    path, mp = checkpoint
    main(["verify", "ensemble", str(path), "--points", "4", "--eps", "0.05", "--out", str(tmp_path / "a"),
          "--no-progress"])
    rows = json.loads((tmp_path / "a" / "verify_ensemble.json").read_text())["robustness"]["rows"]
    assert rows[0]["verified_robust_accuracy"] <= rows[0]["pgd_robust_accuracy"] + 1e-9
    with pytest.raises(SystemExit) as exc:
        main(["verify", "ensemble", str(mp), "--points", "2", "--out", str(tmp_path / "b"), "--no-progress"])
    assert exc.value.code == 2
    assert "not piecewise linear" in capsys.readouterr().err


def test_select(checkpoint, tmp_path) -> None:
    path, _ = checkpoint
    main(["select", str(path), "-k", "2", "--points", "3", "--eps", "0.1", "--max-iters", "2", "--validate", "3",
          "--out", str(tmp_path), "--no-progress"])
    sel = json.loads((tmp_path / "selection.json").read_text())
    assert len(sel["selection"]["final"]) == 2 and sel["selection"]["steps"]
    assert (tmp_path / "selected.pt").is_file() and "validation" in sel


def test_export_vnnlib_matches_pytorch(checkpoint, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    path, _ = checkpoint
    main(["export-vnnlib", str(path), "--members", "0,2", "--eps", "0.05", "--out", str(tmp_path)])
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    text = open(meta["property"]).read()
    assert "(declare-const X_63 Real)" in text and "(declare-const Y_19 Real)" in text
    assert text.count("(assert (or") == 2  # one disjunction per member
    from phalanx.verification.vnnlib import parse_vnnlib

    prop = parse_vnnlib(text)  # the strict reader: every bound is a plain decimal (no np.float64(...))
    assert (prop.n_inputs, prop.n_outputs, len(prop.regions[0].groups)) == (64, 20, 2)
    lo, hi = prop.regions[0].lower, prop.regions[0].upper
    x0 = np.asarray(meta["x0"])
    np.testing.assert_array_equal(lo, np.clip(x0 - 0.05, 0, 1))
    np.testing.assert_array_equal(hi, np.clip(x0 + 0.05, 0, 1))
    x = np.asarray(meta["x0"], dtype=np.float32).reshape(1, 1, 8, 8)
    onnx_out = ort.InferenceSession(meta["network"]).run(None, {"X": x})[0]
    from phalanx.ensembles import load_ensemble

    ens = load_ensemble(path)
    with torch.no_grad():
        ref = torch.cat([ens.members[0](torch.as_tensor(x)), ens.members[2](torch.as_tensor(x))], -1).numpy()
    assert np.allclose(onnx_out, ref, atol=1e-5)


def test_killed_verify_pairs_resumes(checkpoint, tmp_path) -> None:
    """SIGKILL a `verify pairs` process once it has written some results; the rerun keeps them and
    solves only the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path, _ = checkpoint
    args = ["verify", "pairs", str(path), "--points", "6", "--eps", "0.05,0.1,0.15,0.2", "--members", "0,1,2",
            "--backend", "milp", "--out", str(tmp_path), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from phalanx.cli.main import main; main()", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = tmp_path / "queries.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if store.is_file() and len(store.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [json.loads(ln)["qid"] for ln in store.read_text().splitlines() if ln.endswith("}")]
    assert done, "the run was killed before it wrote anything"
    main(args)
    lines = [json.loads(ln) for ln in store.read_text().splitlines() if ln.endswith("}")]
    qids = [d["qid"] for d in lines]
    assert len(set(qids)) == 3 * 6 * 4 == len(qids)  # every query exactly once
    assert qids[:len(done)] == done  # finished queries were kept, not redone
