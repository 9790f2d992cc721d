"""``phalanx attack`` (make and save adversarial examples or transfer sets) and
``phalanx evaluate`` (the white-box, black-box, transferability and diversity protocols)."""

from __future__ import annotations

from typing import Any

import click

from phalanx.cli.common import (
    SEED,
    config_options,
    device_option,
    mismatch_option,
    out_option,
    parse_eps_list,
    progress_option,
    run_dir_for,
    shortcut,
)
from phalanx.config import checkpoint_sections, load_config, parse_value
from phalanx.errors import PhalanxError

PROTOCOLS = ("whitebox", "blackbox", "transferability", "diversity", "card")


def parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    """``--param key=value`` pairs (TOML values: numbers, booleans, [lists])."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise PhalanxError(f"--param expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        val = parse_value(v.strip())
        out[k.strip()] = tuple(val) if isinstance(val, list) else val
    return out


def parse_names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_ints(text: str | None, flag: str) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PhalanxError(f"{flag} expects comma-separated integers, got {text!r}") from None


def _load(checkpoint: str, config_path: str | None, overrides: tuple[str, ...], dataset: str | None,
          data_dir: str | None, limit: int | None, eps: str | None, device: str | None,
          allow_mismatch: bool = False) -> tuple[Any, Any, Any, Any]:
    """Config (recording the checkpoint's data, model and method), ensemble, data, test split."""
    from phalanx.ensembles import check_dataset, checkpoint_info
    from phalanx.workflows.experiment import load_data, load_for_eval

    info = checkpoint_info(checkpoint)
    tree = checkpoint_sections(info)
    tree.setdefault("data", {"dataset": "digits"})
    for sec, key, val in [("data", "dataset", dataset), ("data", "data_dir", data_dir), ("eval", "limit", limit),
                          ("eval", "eps", parse_eps_list(eps)), ("train", "device", device)]:
        shortcut(tree, sec, key, val)
    cfg = load_config(config_path, overrides, base=tree)
    check_dataset(info.get("dataset"), cfg.data.dataset, checkpoint, allow=allow_mismatch)
    ens = load_for_eval(checkpoint, cfg.train.device)
    data = load_data(cfg.data)
    if tuple(data.in_shape) != tuple(ens.in_shape) or data.num_classes != ens.num_classes:
        raise PhalanxError(f"checkpoint expects inputs {ens.in_shape} with {ens.num_classes} classes; "
                           f"dataset {cfg.data.dataset!r} has {data.in_shape} with {data.num_classes}")
    return cfg, ens, data, data.test.subset(cfg.eval.limit)


@click.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@config_options
@click.option("--dataset", default=None, help="Dataset (default: the one stored in the checkpoint).")
@click.option("--data-dir", default=None)
@click.option("--limit", type=int, default=None, help="Attack at most N test examples.")
@click.option("--attack", "attack_name", default="pgd", show_default=True, help="Attack name (see `phalanx info`).")
@click.option("--eps", default=None, help="eps (L-inf, in [0, 1]); a comma list with --transfer-sets.")
@click.option("--loss", default=None, help="Attack loss where the attack has a choice: ce, cw, dlr.")
@click.option("--steps", type=int, default=None)
@click.option("--restarts", type=int, default=None)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Any other attack setting (repeatable), e.g. --param n_queries=500 --param members=[0,1].")
@click.option("--member", type=int, default=None, help="Attack only this member of the ensemble.")
@click.option("--transfer-sets", is_flag=True,
              help="Treat the checkpoints as surrogates and write DVERGE transfer sets for every eps.")
@click.option("--transfer-steps", type=int, default=100, show_default=True)
@click.option("--seed", type=SEED, default=0)
@mismatch_option
@device_option
@out_option
@progress_option
def attack(checkpoints: tuple[str, ...], config_path: str | None, overrides: tuple[str, ...], dataset: str | None,
           data_dir: str | None, limit: int | None, attack_name: str, eps: str | None, loss: str | None,
           steps: int | None, restarts: int | None, params: tuple[str, ...], member: int | None,
           transfer_sets: bool, transfer_steps: int, seed: int, allow_dataset_mismatch: bool, device: str | None,
           out: str | None, overwrite: bool, progress: bool) -> None:
    """Make adversarial examples against a saved ensemble (adversarial.pt, results, image grid),
    or with --transfer-sets, transfer sets from surrogate ensembles for `evaluate --protocol blackbox`."""
    import torch

    from phalanx.attacks import configure_attack
    from phalanx.evaluation import generate_transfer_sets, transfer_attacks
    from phalanx.evaluation.whitebox import describe_attack
    from phalanx.reports import pct, plot_adversarial_grid, scope_line, table
    from phalanx.runs import environment, write_json, write_results
    from phalanx.types import Norm, ThreatModel

    cfg, ens, _data, split = _load(checkpoints[0], config_path, overrides, dataset, data_dir, limit, eps, device,
                                   allow_dataset_mismatch)
    run_dir = run_dir_for(out, "attack", overwrite=overwrite)
    write_json(run_dir / "environment.json", environment(seed, cfg.train.device))
    gen = torch.Generator().manual_seed(seed)
    if transfer_sets:
        from phalanx.evaluation import load_surrogates
        from phalanx.training.loop import resolve_device

        sources, identities = load_surrogates(checkpoints, map_location=resolve_device(cfg.train.device))
        eps_list = [e for e in cfg.eval.eps if e > 0] if eps is not None or cfg.eval.eps else []
        folder = generate_transfer_sets(sources, split, eps_list, run_dir / "transfer_sets",
                                        attacks=transfer_attacks(steps=transfer_steps,
                                                                 restarts=restarts or 3),
                                        batch_size=cfg.eval.batch_size, generator=gen, progress=progress,
                                        identities=identities)
        write_results(run_dir, "transfer-sets", {"sources": identities, "eps": eps_list, "n": len(split),
                                                 "folder": folder})
        click.echo(f"transfer sets for {len(sources)} surrogate(s), eps {eps_list}: {folder}")
        for label, ident in identities.items():
            click.echo(f"  {label}: {', '.join(ident['paths'])} (sha256 {ident['sha256'][:12]})")
        return
    if len(checkpoints) > 1:
        raise PhalanxError("give one checkpoint (several only with --transfer-sets)")
    eps_vals = parse_eps_list(eps) or [0.1]
    if len(eps_vals) != 1:
        raise PhalanxError(f"--eps takes one value here (a list only with --transfer-sets), got {eps}")
    atk = configure_attack(attack_name, parse_params(params), steps=steps, restarts=restarts, loss=loss)
    model: Any = ens
    if member is not None:
        if not 0 <= member < len(ens):
            raise PhalanxError(f"--member {member} out of range; accepted: 0..{len(ens) - 1}")
        model = ens.members[member]
    threat = ThreatModel(Norm.LINF, eps_vals[0])
    from phalanx.data import iterate_batches
    from phalanx.evaluation import model_device

    dev = model_device(ens)
    advs = []
    batches: Any = iterate_batches(split, cfg.eval.batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(split) // cfg.eval.batch_size), desc=attack_name)
    for x, y in batches:
        advs.append(atk(model, x.to(dev), y.to(dev), threat, generator=gen).cpu())
    x_adv = torch.cat(advs)
    with torch.no_grad():
        clean_pred = torch.cat([model(x.to(dev)).argmax(-1).cpu() for x, _ in iterate_batches(split, 500)])
        adv_pred = torch.cat([model(x.to(dev)).argmax(-1).cpu() for x, _ in iterate_batches(
            type(split)(x_adv, split.y), 500)])
    tmp = run_dir / ".adversarial.pt.tmp"
    torch.save({"x": split.x, "x_adv": x_adv, "y": split.y, "clean_pred": clean_pred, "adv_pred": adv_pred,
                "eps": threat.eps, "attack": attack_name}, tmp)
    tmp.replace(run_dir / "adversarial.pt")
    clean_acc = float((clean_pred == split.y).float().mean())
    rob_acc = float((adv_pred == split.y).float().mean())
    k = min(8, len(split))
    plot_adversarial_grid(split.x[:k], x_adv[:k], split.y[:k].tolist(), clean_pred[:k].tolist(),
                          adv_pred[:k].tolist(), run_dir / "adversarial_examples.png",
                          title=f"{attack_name} at eps {threat.eps:g}")
    target = "ensemble" if member is None else f"member {member}"
    write_results(run_dir, "attack", {"checkpoint": checkpoints[0], "target": target, "eps": threat.eps,
                                      "attack": describe_attack(atk), "n": len(split), "clean_accuracy": clean_acc,
                                      "robust_accuracy": rob_acc, "seed": seed, "file": "adversarial.pt"})
    (run_dir / "report.md").write_text("\n".join([
        f"# phalanx attack: {attack_name} on {checkpoints[0]}", "", scope_line(_data.name, len(split)), "",
        table(["target", "eps", "examples", "clean", "adversarial"],
              [[target, f"{threat.eps:g}", len(split), pct(clean_acc), pct(rob_acc)]]), "",
        "Adversarial examples: `adversarial.pt` (x, x_adv, y, predictions).", "",
        "![adversarial examples](adversarial_examples.png)", ""]))
    click.echo(f"{target}: clean {clean_acc:.4f}, under {attack_name} eps {threat.eps:g}: {rob_acc:.4f}; "
               f"saved {run_dir / 'adversarial.pt'}")


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@config_options
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="whitebox", show_default=True,
              help="Evaluation protocol.")
@click.option("--dataset", default=None, help="Dataset (default: the one stored in the checkpoint).")
@click.option("--data-dir", default=None)
@click.option("--limit", type=int, default=None, help="Evaluate on at most N test examples.")
@click.option("--eps", default=None, help="Comma-separated eps list (L-inf, in [0, 1]).")
@click.option("--attack", default=None, help="Attack(s) for the curves, comma-separated (default pgd).")
@click.option("--loss", default=None, help="Attack loss where the attack has a choice: ce, cw, dlr.")
@click.option("--steps", type=int, default=None)
@click.option("--restarts", type=int, default=None)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Extra attack setting (repeatable).")
@click.option("--transfer-sets", "transfer_sets", type=click.Path(file_okay=False), default=None,
              help="blackbox: score these saved transfer sets (from `phalanx attack --transfer-sets`).")
@click.option("--surrogates", default=None, help="blackbox: comma-separated surrogate ensemble checkpoints.")
@click.option("--train-surrogates", default=None, help="blackbox: train baseline surrogates of these sizes (3,5,8).")
@click.option("--surrogate-epochs", type=int, default=10, show_default=True)
@click.option("--transfer-steps", type=int, default=100, show_default=True)
@click.option("--no-sanity", is_flag=True, help="Skip the gradient-masking sanity checks.")
@click.option("--quick", is_flag=True, help="card: reduced attack budgets instead of the published defaults.")
@click.option("--seed", type=SEED, default=0)
@mismatch_option
@device_option
@out_option
@progress_option
def evaluate(checkpoint: str, config_path: str | None, overrides: tuple[str, ...], protocol: str,
             dataset: str | None, data_dir: str | None, limit: int | None, eps: str | None, attack: str | None,
             loss: str | None, steps: int | None, restarts: int | None, params: tuple[str, ...],
             transfer_sets: str | None, surrogates: str | None, train_surrogates: str | None,
             surrogate_epochs: int, transfer_steps: int, no_sanity: bool, quick: bool, seed: int,
             allow_dataset_mismatch: bool, device: str | None, out: str | None, overwrite: bool,
             progress: bool) -> None:
    """Evaluate a saved ensemble with a protocol: white-box curves (several attacks, worst case,
    members), black-box transfer sets, the transferability matrix, DVERGE's diversity, or the
    robustness card (AutoAttack, MORA, transfer from a standard ensemble; ARC and EOT for
    randomized ensembles; per-example worst case and gradient-masking flags)."""
    from phalanx.reports import scope_line
    from phalanx.reports.evaluation_report import write_evaluation_report
    from phalanx.runs import environment, write_json, write_results
    from phalanx.workflows.evaluation import EvaluationSpec, run_evaluation

    extra: list[str] = list(overrides)
    for key, val in (("attack", attack), ("steps", steps), ("restarts", restarts)):
        if val is not None:
            extra.insert(0, f"eval.{key}={val}" if key != "attack" else f'eval.attack="{val}"')
    cfg, ens, data, split = _load(checkpoint, config_path, tuple(extra), dataset, data_dir, limit, eps, device,
                                  allow_dataset_mismatch)
    spec = EvaluationSpec(protocol=protocol, eps=cfg.eval.eps, attacks=parse_names(cfg.eval.attack) or ("pgd",),
                          steps=cfg.eval.steps, restarts=cfg.eval.restarts, loss=loss,
                          attack_params=parse_params(params), batch_size=cfg.eval.batch_size, seed=seed,
                          sanity=not no_sanity, transfer_sets=transfer_sets,
                          surrogates=parse_names(surrogates) or (),
                          train_surrogates=parse_ints(train_surrogates, "--train-surrogates"),
                          surrogate_epochs=surrogate_epochs, transfer_steps=transfer_steps,
                          diversity_eps=(cfg.eval.eps[-1] if eps is not None else 0.07), quick=quick)
    run_dir = run_dir_for(out, "evaluate", overwrite=overwrite)
    write_json(run_dir / "config.json", cfg.to_dict())
    write_json(run_dir / "environment.json", environment(seed, cfg.train.device))
    results = run_evaluation(spec, ens, data, split, run_dir=run_dir, progress=progress)
    report = write_evaluation_report(run_dir, results, title=f"phalanx evaluation ({protocol}) of {checkpoint}",
                                     scope=scope_line(data.name, len(split)))
    write_results(run_dir, "evaluate", {"config": cfg.to_dict(), "checkpoint": checkpoint,
                                        "spec": {k: v for k, v in spec.__dict__.items()}, "results": results})
    # failed sanity checks and card flags were logged once as warnings where they ran (phalanx.evaluation.sanity)
    click.echo(f"clean accuracy {results['clean']['accuracy']:.4f}; protocol {protocol}; report {report}")


def register(group: click.Group) -> None:
    for cmd in (attack, evaluate):
        group.add_command(cmd)
