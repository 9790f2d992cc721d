"""Sweeps: spec validation, resume after a killed driver, failure isolation, the folder lock,
and tables that equal a hand computation from the cells' results.json."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phalanx.errors import PhalanxError
from phalanx.workflows.sweep import read_manifest, run_sweep
from phalanx.workflows.sweep_spec import load_sweep_spec, parse_sweep_spec

REPO = Path(__file__).resolve().parents[2]

# 2 methods x 2 seeds x 2 member counts on digits: 8 cells of a second or two each
GRID_2X2X2 = """
[sweep]
name = "grid"
seeds = [0, 1]
eval_epochs = [1]
[base.data]
dataset = "digits"
limit = 300
[base.model]
name = "mlp"
widths = [16]
[base.train]
epochs = 2
batch_size = 64
optimizer = "adam"
lr = 0.01
schedule = "constant"
device = "cpu"
[grid]
"model.members" = [2, 3]
[method.baseline]
[method.adp]
[[evaluation]]
name = "wb"
attacks = ["fgsm", "pgd"]
eps = [0.05, 0.1]
steps = 3
limit = 40
"""


def write_spec(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def spec_tree(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


# ------------------------------------------------------------------ bad input: one error first

@pytest.mark.parametrize("patch, match", [
    (lambda t: t["sweep"].update(typo=1), "unknown key 'typo' in \\[sweep\\]"),
    (lambda t: t["base"]["train"].update(epochz=1), "unknown config key train.epochz"),
    (lambda t: t["method"].update(bogus={}), "\\[method.bogus\\]: unknown training method 'bogus'"),
    (lambda t: t["method"]["adp"].update(options={"alphaa": 1}), "method 'adp' has no such option"),
    (lambda t: t["method"]["adp"].update(init="nowhere"), "init = 'nowhere' is not a method"),
    (lambda t: t["evaluation"][0].update(attacks=["nope"]), "unknown attack 'nope'"),
    (lambda t: t["evaluation"][0].update(protocol="psychic"), "unknown protocol 'psychic'"),
    (lambda t: t["evaluation"][0].update(limt=3), "unknown key 'limt' in \\[\\[evaluation\\]\\]"),
    (lambda t: t["sweep"].update(seeds=[]), "zero cells \\(sweep.seeds is empty\\)"),
    (lambda t: t["grid"].update({"model.members": []}), "zero cells \\(grid axis 'model.members' is empty\\)"),
    (lambda t: t.pop("method"), "zero cells \\(no \\[method"),
    (lambda t: t["sweep"].update(timeout_s=-1), "timeout_s must be a positive number"),
    (lambda t: t["sweep"].update(gpus_per_cell=-1), "gpus_per_cell must be an integer >= 0, got -1"),
    (lambda t: t["grid"].update({"train.seed": [1]}), "cannot vary 'train.seed'"),
])
def test_bad_specs_fail_with_one_error(patch, match) -> None:
    tree = spec_tree(GRID_2X2X2)
    patch(tree)
    with pytest.raises(PhalanxError, match=match):
        parse_sweep_spec(tree)


def test_dependency_cycle_is_reported() -> None:
    tree = spec_tree(GRID_2X2X2)
    tree["method"]["baseline"]["init"] = "adp"
    tree["method"]["adp"]["init"] = "baseline"
    with pytest.raises(PhalanxError, match=r"cycle in method dependencies \(init\): (baseline -> adp -> baseline|"
                                           r"adp -> baseline -> adp)"):
        parse_sweep_spec(tree)


def test_cli_bad_spec_is_one_error_line_and_runs_nothing(tmp_path, capsys) -> None:
    from conftest import run_cli

    spec = write_spec(tmp_path, GRID_2X2X2.replace("[method.adp]", "[method.adp]\ninit = \"adp\""))
    code, _, err = run_cli(["sweep", str(spec), "--out", str(tmp_path / "s")], capsys)
    assert code == 2
    assert err.strip().splitlines() == ["error: cycle in method dependencies (init): adp -> adp"]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("name", ["digits-quick", "smd-table1-mnist", "smd-table1-mnist-cpu"])
def test_example_specs_parse(name: str) -> None:
    spec = load_sweep_spec(REPO / "examples" / "sweeps" / f"{name}.toml")
    cells = spec.cells()
    keys = [c.key for c in cells]
    for c in cells:  # an init cell always comes before the cells that start from it
        if c.depends_on is not None:
            assert keys.index(c.depends_on) < keys.index(c.key)
    if name.startswith("smd-table1"):
        assert {c.method for c in cells} == {"baseline", "adp", "gal", "smd", "dverge", "smd+"}
        table1 = spec.evaluations[0]
        assert table1.attacks == ("fgsm", "rfgsm", "pgd", "bim", "mim") and table1.eps == (0.3,)
        assert table1.steps == 10 and table1.attack_params == {"pgd": {"step_size": 0.1}}


# ------------------------------------------------------------------ kill the driver, resume

def _mtimes(folder: Path, keys: list[str]) -> dict[str, tuple[int, int]]:
    return {k: ((folder / "cells" / k / "results.json").stat().st_mtime_ns,
                (folder / "cells" / k / "checkpoints" / "last.pt").stat().st_mtime_ns) for k in keys}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The 2x2x2 sweep, its driver SIGKILLed once two cells are done, then resumed."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec = write_spec(tmp, GRID_2X2X2)
    folder = tmp / "grid"
    from phalanx.engines import ENGINES

    engine = "local" if "local" in ENGINES.names() else "serial"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "phalanx.cli.main", "sweep", str(spec), "--out", str(folder),
                             "--engine", engine, "--no-progress"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done: list[str] = []
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (folder / "manifest.json").is_file():
                try:
                    man = read_manifest(folder)
                except PhalanxError:
                    continue  # replaced while we read it
                done = [k for k, c in man["cells"].items() if c["state"] == "done"]
                if len(done) >= 2:
                    break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and any worker it started
        proc.wait()
    assert 2 <= len(done) < 8, f"could not kill mid-way (done: {done}; stderr: {proc.stderr.read()[-500:]!r})"
    before = read_manifest(folder)
    assert json.loads((folder / ".phalanx" / "run.json").read_text())["status"] == "running"  # died mid-run
    times = _mtimes(folder, done)
    result = run_sweep(spec, folder, engine=engine, progress=False)
    return folder, spec, before, done, times, result


def test_resume_after_kill_recomputes_no_finished_cell(killed_and_resumed) -> None:
    folder, _, before, done, times, result = killed_and_resumed
    after = read_manifest(folder)
    assert len(after["cells"]) == 8
    assert all(c["state"] == "done" for c in after["cells"].values())
    assert set(result.ran) == set(after["cells"]) - set(done)  # the finished cells were not run again
    assert _mtimes(folder, done) == times  # neither their results nor their checkpoints were rewritten
    for key in done:
        assert after["cells"][key]["attempts"] == 1
        assert after["cells"][key]["finished"] == before["cells"][key]["finished"]
    interrupted = [k for k, c in before["cells"].items() if c["state"] == "running"]
    for key in interrupted:  # started before the kill, finished after: a second attempt
        assert after["cells"][key]["attempts"] == 2
    assert json.loads((folder / ".phalanx" / "run.json").read_text())["status"] == "finished"
    # a third run has nothing to do
    again = run_sweep(folder.parent / "spec.toml", folder, engine="serial", progress=False)
    assert again.ran == [] and again.counts["done"] == 8


def test_table_mean_std_equals_hand_computation(killed_and_resumed, capsys) -> None:
    from conftest import run_cli
    from phalanx.reports.tables import collect, method_table, to_csv, to_markdown

    folder = killed_and_resumed[0]
    hand: dict[tuple[str, str], list[float]] = {}
    for cell_dir in sorted((folder / "cells").iterdir()):
        res = json.loads((cell_dir / "results.json").read_text())
        ev = res["evaluations"]["2"]["wb"]
        label = f"{res['method']} (members={res['axes']['model.members']})"
        hand.setdefault((label, "Clean"), []).append(ev["clean"]["accuracy"])
        pgd = [p for p in ev["whitebox"]["curves"]["pgd"] if p["eps"] == 0.1]
        hand.setdefault((label, "PGD"), []).append(pgd[0]["accuracy"])
    t = method_table(collect([folder]), evaluation="wb", eps=0.1)
    assert sorted(t.rows) == sorted({k[0] for k in hand})
    for (label, col), vals in hand.items():
        assert len(vals) == 2  # two seeds
        mean, std = t.mean_std(t.rows.index(label), t.columns.index(col))
        assert mean == pytest.approx((vals[0] + vals[1]) / 2)
        assert std == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)  # sample std of two values
        assert std == pytest.approx(statistics.stdev(vals))
    md = to_markdown(t)
    label = "adp (members=3)"
    vals = hand[(label, "PGD")]
    cell = f"{100 * statistics.fmean(vals):.1f} ± {100 * statistics.stdev(vals):.1f}"
    assert cell in next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
    # the best mean of each column is bold, and only it (unless tied)
    for c, col in enumerate(t.columns):
        means = {r: round(100 * statistics.fmean(hand[(r, col)]), 1) for r in t.rows if (r, col) in hand}
        if means:
            top = max(means.values())
            assert t.best(c) == {t.rows.index(r) for r, m in means.items() if m == top}
    csv_rows = to_csv(t).splitlines()
    assert csv_rows[0].startswith("method,seeds,Clean mean,Clean std,Clean best")
    code, out, _ = run_cli(["table", str(folder), "--eps", "0.1", "--format", "latex", "--out",
                            str(folder / "tables")], capsys)
    assert code == 0 and "\\textbf{" in out and "$\\pm$" in out
    for f in ("table.md", "table.csv", "table.tex", "robust_accuracy_vs_eps.png", "learning_curves.png"):
        assert (folder / "tables" / f).stat().st_size > 0


def test_table_at_an_intermediate_epoch_differs_from_the_final(killed_and_resumed) -> None:
    from phalanx.reports.tables import collect, method_table

    recs = collect([killed_and_resumed[0]])
    t1 = method_table(recs, evaluation="wb", epoch=1)
    t2 = method_table(recs, evaluation="wb", epoch=2)
    assert t1.values != t2.values  # one more epoch of training changes the ensembles
    with pytest.raises(PhalanxError, match="no cell has evaluation 'wb' at epoch 7"):
        method_table(recs, evaluation="wb", epoch=7)
    with pytest.raises(PhalanxError, match=r"no results at eps 0\.3"):
        method_table(recs, evaluation="wb", eps=0.3)
    folder = killed_and_resumed[0]
    with pytest.raises(PhalanxError, match=r"adp \(members=2\) seed 0 is given twice"):
        collect([folder, folder / "cells" / "adp-seed0-members=2"])
    assert len(collect([folder / "cells" / "adp-seed0-members=2", folder / "cells" / "adp-seed1-members=2"])) == 2


def test_changed_cell_in_the_same_folder_is_refused(killed_and_resumed, tmp_path) -> None:
    folder = killed_and_resumed[0]
    spec = write_spec(tmp_path, GRID_2X2X2.replace("epochs = 2", "epochs = 3"))
    with pytest.raises(PhalanxError, match="was run with a different config"):
        run_sweep(spec, folder, progress=False)


# ------------------------------------------------------------------ faults

DIVERGE = """
[sweep]
seeds = [0]
[base.data]
dataset = "digits"
limit = 200
[base.model]
name = "mlp"
widths = [8]
members = 2
[base.train]
epochs = 1
device = "cpu"
[method.baseline]
[method.blowup]
name = "baseline"
set = { "train.lr" = 1e30, "train.momentum" = 0.0 }
[method.after]
name = "baseline"
init = "blowup"
[[evaluation]]
attacks = ["fgsm"]
eps = [0.1]
limit = 20
"""


def test_diverging_cell_fails_alone_with_the_reason(tmp_path) -> None:
    spec = write_spec(tmp_path, DIVERGE)
    folder = tmp_path / "s"
    res = run_sweep(spec, folder, engine="serial", progress=False)
    man = read_manifest(folder)["cells"]
    assert man["baseline-seed0"]["state"] == "done"
    assert man["blowup-seed0"]["state"] == "failed"
    assert "training diverged at epoch 1" in man["blowup-seed0"]["error"]
    assert man["after-seed0"]["state"] == "skipped" and "blowup-seed0" in man["after-seed0"]["error"]
    assert (folder / "cells" / "blowup-seed0" / "error.txt").read_text().startswith("PhalanxError: training diverged")
    assert not res.ok
    # a re-run keeps the failure; --retry-failed runs it (and the skipped cell) again
    again = run_sweep(spec, folder, engine="serial", progress=False)
    assert again.ran == [] and read_manifest(folder)["cells"]["blowup-seed0"]["attempts"] == 1
    retried = run_sweep(spec, folder, engine="serial", progress=False, retry_failed=True)
    assert retried.ran == ["blowup-seed0"]
    man = read_manifest(folder)["cells"]
    assert man["blowup-seed0"]["attempts"] == 2 and man["after-seed0"]["state"] == "skipped"
    assert man["baseline-seed0"]["attempts"] == 1


def test_second_sweep_on_the_same_folder_refuses(tmp_path) -> None:
    from phalanx.runs import Reuse, open_run

    spec = write_spec(tmp_path, DIVERGE)
    folder = tmp_path / "s"
    with open_run(folder, "sweep", reuse=Reuse.CONTINUE):  # a live driver holds the folder
        with pytest.raises(PhalanxError, match=r"run folder .* is in use by another phalanx process \(pid \d+"):
            run_sweep(spec, folder, engine="serial", progress=False)
    assert not (folder / "manifest.json").exists()


def test_folder_of_another_command_is_refused(tmp_path) -> None:
    from phalanx.runs import open_run

    folder = tmp_path / "s"
    with open_run(folder, "train"):
        pass
    with pytest.raises(PhalanxError, match="already holds a finished train run"):
        run_sweep(write_spec(tmp_path, DIVERGE), folder, engine="serial", progress=False)


def test_folder_grows_with_more_seeds(tmp_path) -> None:
    one = write_spec(tmp_path, DIVERGE.replace("[method.blowup]", "[method.unused]\nname = \"adp\"\n[method.blowup]")
                     .replace("[sweep]", "[sweep]\nmethods = [\"baseline\"]"))
    folder = tmp_path / "s"
    assert run_sweep(one, folder, engine="serial", progress=False).ran == ["baseline-seed0"]
    two = write_spec(tmp_path, (tmp_path / "spec.toml").read_text().replace("seeds = [0]", "seeds = [0, 1]"),
                     "two.toml")
    assert run_sweep(two, folder, engine="serial", progress=False).ran == ["baseline-seed1"]


def test_cli_status_dry_run_and_resume_from_the_folder(killed_and_resumed, capsys) -> None:
    from conftest import run_cli

    folder, spec = killed_and_resumed[0], killed_and_resumed[1]
    code, out, _ = run_cli(["sweep", str(folder), "--status"], capsys)
    assert code == 0 and out.startswith(f"{folder}: 8/8 done, 0 running, 0 pending, 0 failed, 0 skipped; ETA 0m00s")
    code, out, _ = run_cli(["sweep", str(spec), "--dry-run"], capsys)
    assert code == 0 and out.splitlines()[0] == "sweep grid: 8 cells, evaluations: wb"
    assert "  adp-seed1-members=3: 2 epochs, evaluated after [1, 2]" in out.splitlines()
    before = read_manifest(folder)
    code, out, _ = run_cli(["sweep", str(folder), "--engine", "serial", "--no-progress"], capsys)  # the stored spec
    assert code == 0 and "8/8 done" in out
    assert read_manifest(folder)["cells"] == before["cells"]


@pytest.mark.parametrize("ensemble_pt_written", [True, False])
def test_evaluation_interrupted_after_its_checkpoint_is_recovered_on_resume(tmp_path, ensemble_pt_written) -> None:
    """The driver dies after epoch 1's checkpoint, before epoch 1's evaluation was written (also
    between ``checkpoints/last.pt`` and ``ensemble.pt``, so the latter still lags): the resumed
    cell evaluates the epoch-1 weights, equal to an uninterrupted run's."""
    from phalanx.workflows.sweep import run_cell

    spec = parse_sweep_spec(spec_tree(GRID_2X2X2))
    cell = next(c for c in spec.cells() if c.key == "adp-seed0-members=2")
    evals = [e.to_dict() for e in spec.evaluations]
    whole = run_cell(cell.to_dict(), str(tmp_path / "whole"), evals)
    first = cell.to_dict()
    first["config"] = {**first["config"], "train": {**first["config"]["train"], "epochs": 1}}
    first["eval_epochs"] = [1]
    run_cell(first, str(tmp_path / "cut"), evals)  # trains epoch 1 and checkpoints it
    assert not (tmp_path / "cut" / "evals" / "epoch-1.json").exists()  # epoch 1 was its final epoch
    if not ensemble_pt_written:
        (tmp_path / "cut" / "ensemble.pt").unlink()  # the kill came before epoch 1's ensemble.pt
    resumed = run_cell(cell.to_dict(), str(tmp_path / "cut"), evals)
    assert resumed["resumed_from_epoch"] == 1
    assert resumed["evaluations"]["1"] == whole["evaluations"]["1"]
    assert resumed["evaluations"]["2"]["wb"]["whitebox"]["curves"] == whole["evaluations"]["2"]["wb"]["whitebox"]["curves"]


def test_rerun_recomputes_a_cell_and_its_dependents_from_scratch(tmp_path) -> None:
    spec = write_spec(tmp_path, DIVERGE.replace('set = { "train.lr" = 1e30, "train.momentum" = 0.0 }', ""))
    folder = tmp_path / "s"
    assert run_sweep(spec, folder, engine="serial", progress=False).ok
    first = json.loads((folder / "cells" / "blowup-seed0" / "results.json").read_text())
    with pytest.raises(PhalanxError, match="--rerun names 'nope', which is not a cell"):
        run_sweep(spec, folder, engine="serial", progress=False, rerun=["nope"])
    res = run_sweep(spec, folder, engine="serial", progress=False, rerun=["blowup-seed0"])
    assert res.ran == ["blowup-seed0", "after-seed0"]  # and the cell that starts from it
    man = read_manifest(folder)["cells"]
    assert man["blowup-seed0"]["attempts"] == 2 and man["baseline-seed0"]["attempts"] == 1
    again = json.loads((folder / "cells" / "blowup-seed0" / "results.json").read_text())
    assert again["resumed_from_epoch"] == 0  # from scratch, not from the old checkpoint
    assert again["evaluations"] == first["evaluations"]  # deterministic: the same results
