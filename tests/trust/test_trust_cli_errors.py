"""One error boundary (issue 10, item 8): every user-caused failure is one ``error:`` line and
exit 2, never a traceback; a property-based test throws random text at every option that
parses user text."""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from phalanx import Ensemble, create_model
from phalanx.ensembles import save_ensemble


@pytest.fixture(scope="module")
def ckpt(tiny_mlp_pair: Ensemble, tmp_path_factory: Any) -> Path:
    path = tmp_path_factory.mktemp("ck") / "pair.pt"
    save_ensemble(Ensemble(list(tiny_mlp_pair.members), "mean-logits"), path, dataset="digits")
    return path


def _one_error_line(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_empty_eps_lists(ckpt: Path, tmp_path: Path, capsys: Any) -> None:
    for argv in (["evaluate", str(ckpt), "--eps", ","], ["verify", "ensemble", str(ckpt), "--eps", ""],
                 ["export-vnnlib", str(ckpt), "--eps", " "], ["train", "--eps", ""]):
        code, _, err = run_cli([*argv, "--out", str(tmp_path / "r")], capsys)
        _one_error_line(code, err, "--eps expects at least one number")


def test_randomized_attack_with_foreign_checkpoints(ckpt: Path, tmp_path: Path, capsys: Any) -> None:
    mnist = tmp_path / "mnist.pt"
    save_ensemble(Ensemble([create_model("mlp", (1, 28, 28), 10, widths=[4])]), mnist, dataset="mnist")
    code, _, err = run_cli(["randomized-attack", str(ckpt), str(mnist), "--eps", "1"], capsys)
    _one_error_line(code, err, f"different datasets ({ckpt}: digits, {mnist}: mnist)")
    code, _, err = run_cli(["randomized-attack", str(mnist), "--dataset", "digits", "--eps", "1"], capsys)
    _one_error_line(code, err, "trained on dataset 'mnist', not 'digits'")
    relabelled = tmp_path / "relabelled.pt"
    save_ensemble(Ensemble([create_model("mlp", (1, 28, 28), 10, widths=[4])]), relabelled, dataset="digits")
    code, _, err = run_cli(["randomized-attack", str(relabelled), "--eps", "1"], capsys)
    _one_error_line(code, err, "classifier 0 expects inputs (1, 28, 28); dataset 'digits' has (1, 8, 8)")


def test_mnist_images_replaced_by_labels(tmp_path: Path, capsys: Any) -> None:
    from phalanx.data.files import write_idx

    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    labels, images = rng.integers(0, 10, 12).astype(np.uint8), rng.integers(0, 255, (12, 28, 28)).astype(np.uint8)
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    write_idx(folder / "train-images-idx3-ubyte.gz", labels)  # the mistake
    code, _, err = run_cli(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"),
                            "--no-progress"], capsys)
    _one_error_line(code, err, "train-images-idx3-ubyte.gz holds labels [12], expected images; is the file misnamed?")


def test_mistyped_data_dir_creates_nothing(tmp_path: Path, capsys: Any) -> None:
    typo = tmp_path / "dtaa"
    code, _, err = run_cli(["train", "--dataset", "mnist", "--data-dir", str(typo), "--out", str(tmp_path / "r"),
                            "--no-progress"], capsys)
    _one_error_line(code, err, f"data folder {typo} does not exist")
    assert not typo.exists()


def test_internal_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import phalanx.cli.commands as commands

    def broken(*a: Any, **k: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(commands, "load_config", broken)
    from phalanx.cli.main import main

    with pytest.raises(KeyError):
        main(["train", "--no-progress"])


def test_os_errors_are_classified() -> None:
    import errno

    from phalanx.cli.main import user_os_error

    assert user_os_error(OSError(errno.ENOSPC, "No space left on device")) == "cannot access: No space left on device"
    assert user_os_error(PermissionError(errno.EACCES, "Permission denied", "/x")) == \
        "cannot access /x: Permission denied"
    assert user_os_error(OSError(errno.EPIPE, "Broken pipe")) is None


# -- property-based: random text at every option that parses user text ----------------------

# (command argv with a cheap configuration, options whose values are user text)
CHEAP = {
    "train": (["train", "--model", "mlp", "--members", "1", "--epochs", "1", "--limit", "20", "--eps", "0",
               "--set", "model.widths=[4]"],
              ["--set", "--dataset", "--data-dir", "--limit", "--model", "--members", "--method", "--epochs",
               "--batch-size", "--lr", "--seed", "--eps", "--device", "--config", "--init", "--resume"]),
    "evaluate": (["evaluate", "{ckpt}", "--limit", "4", "--eps", "0", "--steps", "1", "--no-sanity"],
                 ["--set", "--protocol", "--dataset", "--data-dir", "--limit", "--eps", "--attack", "--loss",
                  "--steps", "--restarts", "--param", "--transfer-sets", "--surrogates", "--train-surrogates",
                  "--surrogate-epochs", "--transfer-steps", "--seed", "--device"]),
    "attack": (["attack", "{ckpt}", "--limit", "4", "--eps", "0", "--steps", "1"],
               ["--set", "--dataset", "--limit", "--attack", "--eps", "--loss", "--steps", "--restarts", "--param",
                "--member", "--transfer-steps", "--seed"]),
    "verify-ensemble": (["verify", "ensemble", "{ckpt}", "--points", "1", "--eps", "0.01", "--backend", "bounds"],
                        ["--eps", "--points", "--backend", "--complete", "--timeout", "--workers", "--members",
                         "--seed", "--combiner", "--data-dir"]),
    "verify-pairs": (["verify", "pairs", "{ckpt}", "--points", "1", "--eps", "0.01", "--backend", "bounds"],
                     ["--label", "--subset-size", "--split", "--members"]),
    "select": (["select", "{ckpt}", "-k", "1", "--points", "1", "--eps", "0.01", "--backend", "bounds",
                "--max-iters", "1"], ["-k", "--label", "--initial", "--max-iters", "--time-budget", "--validate"]),
    "randomized-attack": (["randomized-attack", "{ckpt}", "--eps", "0.1", "--points", "1", "--num-attacks", "1",
                           "--no-compare", "--time-limit", "5"],
                          ["--members", "--dataset", "--pair", "--points", "--indices", "--num-attacks", "--eps",
                           "--alpha", "--time-limit", "--margin", "--norm", "--objective", "--backend"]),
    "export-vnnlib": (["export-vnnlib", "{ckpt}", "--eps", "0.01"], ["--eps", "--index", "--members", "--kind"]),
}
CASES = [(name, opt) for name, (_, opts) in CHEAP.items() for opt in opts]
TRICKY = st.sampled_from(["", " ", "nan", "inf", "-1", "0", "1e999", "true", "[", "[0,9]", "a=b", "x.y=z", ",",
                          "0,", "../", "é", "--", "{}", "1,2,3", "train.lr=", "=1", "0.5"])
# no NUL: a command line cannot carry one (argv entries are C strings)
TEXT = st.one_of(TRICKY, st.text(alphabet=string.printable + "éß", max_size=10))
_counter = itertools.count()


@pytest.mark.parametrize("name,option", CASES, ids=[f"{n}{o}" for n, o in CASES])
@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=TEXT)
def test_random_text_is_refused_in_one_line_or_accepted(name: str, option: str, value: str, ckpt: Path,
                                                        tmp_path: Path, capsys: Any) -> None:
    base, _ = CHEAP[name]
    argv = [a.replace("{ckpt}", str(ckpt)) for a in base]
    out = tmp_path / f"run{next(_counter)}"
    code, _, err = run_cli([*argv, option, value, "--out", str(out), "--no-progress"], capsys)
    assert "Traceback" not in err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.strip(), "an error must say what was wrong"
        last = err.strip().splitlines()[-1]
        assert last.startswith(("error: ", "Error: ")), err  # ours, or click's usage error


# -- also seen: quiet logs, honest reports --------------------------------------------------


def test_highs_banner_does_not_reach_stdout() -> None:
    import subprocess
    import sys

    from conftest import REPO

    code = "from phalanx.verification.milp import quiet_highs; quiet_highs(); quiet_highs(); print('only this')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "only this\n" and "HiGHS" not in out.stderr


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path: Path, capsys: Any) -> None:
    code, _, err = run_cli(["train", "--model", "mlp", "--members", "1", "--epochs", "2", "--limit", "40", "--eps",
                            "0", "--set", "model.widths=[4]", "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert "\r" not in err and "step/s" not in err and "it/s" not in err


def test_unreadable_transfer_sets_do_not_advise_unsafe_loading(ckpt: Path, tmp_path: Path, capsys: Any) -> None:
    import pickle

    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "sets.pt").write_bytes(pickle.dumps({"x": object()}, protocol=2))
    code, _, err = run_cli(["evaluate", str(ckpt), "--protocol", "blackbox", "--transfer-sets", str(sets),
                            "--out", str(tmp_path / "e")], capsys)
    _one_error_line(code, err, "is not a readable phalanx transfer-set file")
    assert "weights_only" not in err


def test_blackbox_options_need_the_blackbox_protocol(ckpt: Path, tmp_path: Path, capsys: Any) -> None:
    code, _, err = run_cli(["evaluate", str(ckpt), "--surrogates", "a.pt", "--out", str(tmp_path / "e")], capsys)
    _one_error_line(code, err, "--surrogates do not apply to the whitebox protocol")


def test_reports_state_dataset_and_examples(ckpt: Path, tmp_path: Path, capsys: Any) -> None:
    code, _, err = run_cli(["evaluate", str(ckpt), "--limit", "7", "--eps", "0", "--no-sanity",
                            "--out", str(tmp_path / "e")], capsys)
    assert code == 0, err
    assert "Dataset `digits`, 7 test examples." in (tmp_path / "e" / "report.md").read_text()
    code, _, err = run_cli(["attack", str(ckpt), "--limit", "5", "--eps", "0.05", "--steps", "1",
                            "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert "Dataset `digits`, 5 test examples." in (tmp_path / "a" / "report.md").read_text()


def test_select_keeps_the_checkpoint_combiner_and_says_what_it_validated(tiny_mlp_pair: Ensemble, tmp_path: Path,
                                                                        capsys: Any) -> None:
    from phalanx.ensembles import checkpoint_info

    three = Ensemble([*tiny_mlp_pair.members, tiny_mlp_pair.members[0]], "mean-prob")
    path = tmp_path / "mp.pt"
    save_ensemble(three, path, dataset="digits")
    code, _, err = run_cli(["select", str(path), "-k", "2", "--points", "2", "--eps", "0.01", "--backend", "milp",
                            "--max-iters", "1", "--validate", "2", "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    assert checkpoint_info(tmp_path / "s" / "selected.pt")["combiner"] == "mean-prob"
    report = (tmp_path / "s" / "report.md").read_text()
    assert "Validation verifies the `mean-logits` combination" in report and "`mean-prob`" in report
    assert json.loads((tmp_path / "s" / "selection.json").read_text())["validation"]["combiner"] == "mean-logits"
