from __future__ import annotations

import json

import pytest

from conftest import run_cli


@pytest.mark.parametrize("argv,needle", [
    (["train", "--dataset", "nope"], "unknown dataset 'nope'; known:"),
    (["train", "--model", "vgg"], "unknown model 'vgg'; known:"),
    (["train", "--method", "magic"], "unknown training method 'magic'; known:"),
    (["train", "--epochs", "0"], "epochs must be a positive integer"),
    (["train", "--batch-size", "0"], "batch_size must be a positive integer"),
    (["train", "--eps", "1.5"], "exceeds the input range"),
    (["train", "--eps", "-0.1"], "eps must be >= 0"),
    (["train", "--set", "train.nosuch=1"], "unknown config key train.nosuch"),
    (["train", "--set", "nosection.x=1"], "unknown config section"),
    (["train", "--dataset", "mnist", "--data-dir", "/nonexistent-dir"], "t10k-images-idx3-ubyte.gz"),
    (["evaluate", "/nonexistent.pt"], "does not exist"),
])
def test_cli_errors_are_one_line_exit_2(argv, needle, capsys, tmp_path):
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "r"), "--no-progress"] if argv[0] == "train" else argv, capsys)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1


def test_cli_corrupted_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    code, _, err = run_cli(["evaluate", str(bad)], capsys)
    assert code == 2 and "corrupted" in err


def test_cli_train_writes_run_folder_and_resumes(capsys, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nname = "mlp"\nmembers = 2\nwidths = [8]\n[train]\nbatch_size = 256\n[eval]\nlimit = 40\nsteps = 2\n')
    code, stdout, _ = run_cli(["train", "--config", str(cfg), "--epochs", "1", "--set", "train.lr=0.05",
                           "--eps", "0,0.1", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, stdout
    for name in ("config.json", "environment.json", "metrics.jsonl", "results.json", "report.md",
                 "robust_accuracy.png", "ensemble.pt", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == 1 and results["kind"] == "train"
    assert [p["eps"] for p in results["evaluation"]["curve"]] == [0.0, 0.1]
    env = json.loads((out / "environment.json").read_text())
    assert env["seed"] == 0 and "torch" in env
    assert json.loads((out / "config.json").read_text())["model"]["widths"] == [8]
    # resume a finished run with more epochs: continues from epoch 1
    code, _, _ = run_cli(["train", "--resume", str(out), "--epochs", "2", "--no-progress"], capsys)
    assert code == 0
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    # resuming with a different architecture is refused
    code, _, err = run_cli(["train", "--resume", str(out), "--model", "small-cnn", "--no-progress"], capsys)
    assert code == 2 and "differs from the saved config" in err
    # evaluate the checkpoint
    code, _, _ = run_cli(["evaluate", str(out / "ensemble.pt"), "--limit", "30", "--eps", "0.05", "--steps", "2",
                      "--out", str(tmp_path / "ev"), "--no-progress"], capsys)
    assert code == 0 and (tmp_path / "ev" / "report.md").is_file()


def test_cli_info_lists_registries(capsys):
    code, out, _ = run_cli(["info", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and "digits" in info["datasets"] and "lenet5" in info["models"] and "pgd" in info["attacks"]
