"""``phalanx randomized-attack``: optimal randomized attacks on classifier ensembles and
(eps, alpha)-robustness proofs (Gross et al. 2022)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from typing import Any

import click

from phalanx.cli.common import mismatch_option, out_option, progress_option, run_dir_for
from phalanx.errors import PhalanxError


def _ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PhalanxError(f"{flag} expects comma-separated integers, got {text!r}") from None


@click.command("randomized-attack")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--members", default=None, help="Comma-separated member indices (over all checkpoints, in order).")
@click.option("--dataset", default=None, help="Dataset (default: the one stored in the first checkpoint).")
@click.option("--data-dir", default=None, help="Folder with dataset files (or $PHALANX_DATA_DIR).")
@click.option("--pair", default=None, help="Two classes 'a,b' relabelled 0/1 (binary classifiers, as the paper).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test")
@click.option("--points", type=int, default=4, show_default=True,
              help="|X|: the first N points every classifier gets right (labels alternating).")
@click.option("--indices", default=None, help="Explicit point indices in the split (overrides --points).")
@click.option("--num-attacks", type=int, default=None, help="|A| (default: a count sufficient by Prop. 1).")
@click.option("--eps", type=float, required=True, help="Attack budget (L1 by default, in [0, 1] pixel units).")
@click.option("--norm", type=click.Choice(["l1", "linf"]), default="l1", show_default=True)
@click.option("--alpha", type=float, default=1.0, show_default=True, help="Robustness threshold on Val.")
@click.option("--objective", type=click.Choice(["max-min", "max-sum", "feasibility"]), default="max-min",
              show_default=True, help="max-min: optimal Val; max-sum: the paper's MaxMILP; feasibility: Val >= alpha.")
@click.option("--backend", type=click.Choice(["decomposition", "milp", "smt"]), default="decomposition",
              show_default=True)
@click.option("--time-limit", type=float, default=300.0, show_default=True, help="Seconds for the whole query.")
@click.option("--margin", type=float, default=1e-3, show_default=True, help="Logit margin of returned attacks.")
@click.option("--unbounded", is_flag=True, help="No [0, 1] input box (the paper's setting).")
@click.option("--compare/--no-compare", default=True, help="Also run the uniform and best deterministic attackers.")
@mismatch_option
@out_option
@progress_option
def randomized_attack_cmd(checkpoints: tuple[str, ...], members: str | None, dataset: str | None,
                          data_dir: str | None, pair: str | None, split: str, points: int, indices: str | None,
                          num_attacks: int | None, eps: float, norm: str, alpha: float, objective: str, backend: str,
                          time_limit: float, margin: float, unbounded: bool, compare: bool,
                          allow_dataset_mismatch: bool, out: str | None, overwrite: bool, progress: bool) -> None:
    """Find an optimal randomized attack (A, P) on the classifiers or prove (eps, alpha)-robustness.

    CHECKPOINTS are ensemble checkpoints; all their members form the classifier set C. Writes
    results.json (value, attacks, probabilities, verdict, time), report.md and attacks.png."""
    import torch

    from phalanx.data import load_dataset
    from phalanx.ensembles import check_dataset, checkpoint_info, load_ensemble
    from phalanx.randomized.attack import RandomizedAttackConfig, comparison_attackers, randomized_attack
    from phalanx.randomized.digits import attack_points, binary_pair
    from phalanx.randomized.report import plot_attacks, render_report

    config = RandomizedAttackConfig(eps=eps, alpha=alpha, num_attacks=num_attacks, norm=norm,
                                    bounds=None if unbounded else (0.0, 1.0), objective=objective,
                                    backend=backend, time_limit_s=time_limit, margin=margin)
    models: list[torch.nn.Module] = []
    for ck in checkpoints:
        models += list(load_ensemble(ck).members)
    chosen = _ints(members, "--members")
    if chosen is not None:
        if not chosen or any(not 0 <= i < len(models) for i in chosen):
            raise PhalanxError(f"--members must be indices in 0..{len(models) - 1}, got {members!r}")
        models = [models[i] for i in chosen]
    stored_sets = {ck: checkpoint_info(ck).get("dataset") for ck in checkpoints}
    if len({d for d in stored_sets.values() if d is not None}) > 1:
        raise PhalanxError("the checkpoints were trained on different datasets ("
                           + ", ".join(f"{ck}: {d}" for ck, d in stored_sets.items()) + "); give checkpoints of one")
    trained_on = next((d for d in stored_sets.values() if d is not None), None)
    name = str(dataset or trained_on or "digits")
    pr = _ints(pair, "--pair")
    if dataset is not None and trained_on is not None:
        want = dataset if not pr else f"{dataset}_{'_'.join(map(str, pr))}"
        if trained_on not in (dataset, want):  # digits_3_6 is digits with --pair 3,6
            check_dataset(trained_on, want, ", ".join(checkpoints), allow=allow_dataset_mismatch)
    stored = re.fullmatch(r"(.+)_(\d+)_(\d+)", name)  # a binary dataset such as digits_3_6
    if stored is not None and pr is None:
        name, pr = stored.group(1), [int(stored.group(2)), int(stored.group(3))]
    data = load_dataset(name, data_dir=data_dir)
    if pr is not None:
        data = binary_pair(data, pr)
    for i, m in enumerate(models):
        k = int(getattr(m, "num_classes", data.num_classes))
        if k != data.num_classes:
            raise PhalanxError(f"classifier {i} has {k} outputs but the data has {data.num_classes} classes"
                               + ("" if pr else "; pass --pair a,b for binary classifiers"))
        shape = tuple(getattr(m, "in_shape", ()) or data.in_shape)
        if shape != tuple(data.in_shape):
            raise PhalanxError(f"classifier {i} expects inputs {shape}; dataset {data.name!r} has {tuple(data.in_shape)}")
    sp = data.split(split)
    idx = _ints(indices, "--indices")
    if idx is not None:
        if not idx or any(not 0 <= i < len(sp) for i in idx):
            raise PhalanxError(f"--indices must be in 0..{len(sp) - 1}, got {indices!r}")
        x, y = sp.x[idx], sp.y[idx]
    else:
        if points < 1:
            raise PhalanxError(f"--points must be >= 1, got {points}")
        x, y = attack_points(sp, [m.eval() for m in models], points)
    run_dir = run_dir_for(out, "randomized-attack", overwrite=overwrite)
    res = randomized_attack(models, x, y, config, progress=progress)
    doc: dict[str, Any] = {
        "result": res.to_json(), "config": {**asdict(config), "norm": res.norm},
        "num_classifiers": len(models), "classifier_sources": [str(c) for c in checkpoints],
        "members": chosen, "dataset": data.name, "split": split, "num_points": int(x.shape[0]),
        "points": x.double().numpy().tolist(), "labels": y.tolist(),
    }
    if compare:
        names = {"uniform": "uniform attacker (UA)", "best_deterministic": "best deterministic attacker (BDA)"}
        doc["comparison"] = {names[k_]: r.to_json() for k_, r in comparison_attackers(models, x, y, config).items()}
    (run_dir / "results.json").write_text(json.dumps(doc, indent=1))
    img = plot_attacks(doc["result"], x.double().numpy(), run_dir / "attacks.png",
                       labels=[data.class_names[int(v)] for v in y])
    (run_dir / "report.md").write_text(render_report(doc, image=img.name if img else None))
    val = "-" if res.value is None else f"{res.value:.4f}"
    click.echo(f"verdict {res.verdict.value}; Val {val}; upper bound {res.upper_bound}; "
               f"{res.wall_time_s:.1f} s; report {run_dir / 'report.md'}")


def register(group: click.Group) -> None:
    group.add_command(randomized_attack_cmd)
