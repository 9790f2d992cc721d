"""Markdown report and plots of a ``phalanx evaluate`` run, rendered from its result dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from phalanx.reports.attack_plots import plot_adversarial_grid, plot_decision_regions, plot_heatmap
from phalanx.reports.markdown import curves_table, pct, table
from phalanx.reports.plots import plot_accuracy_curves


def sanity_lines(checks: Sequence[Mapping[str, Any]]) -> list[str]:
    if not checks:
        return []
    lines = ["### Sanity checks", ""]
    for c in checks:
        mark = "passed" if c["passed"] else f"**FAILED — {c.get('advice') or 'possible gradient masking'}**"
        lines.append(f"- {c['name']}: {mark} ({c['detail']})")
    return [*lines, ""]


def whitebox_section(wb: Mapping[str, Any], run_dir: Path, prefix: str = "") -> list[str]:
    curves = {f"{name}": pts for name, pts in wb["curves"].items()}
    if len(curves) > 1:
        curves["worst case"] = wb["worst_case"]
    plot_accuracy_curves(curves, run_dir / f"{prefix}whitebox_curves.png", title="White-box accuracy of the ensemble")
    lines = ["## White-box accuracy vs eps", "",
             f"Attacks on the {wb['output']}; an example counts as robust only if it survives every attack "
             "and restart (worst case).", "", curves_table(curves), "",
             f"![white-box curves]({prefix}whitebox_curves.png)", ""]
    if wb.get("member_curves"):
        plot_accuracy_curves(wb["member_curves"], run_dir / f"{prefix}member_curves.png",
                             title="White-box accuracy of each member")
        lines += ["### Members attacked one at a time", "", curves_table(wb["member_curves"]), "",
                  f"![member curves]({prefix}member_curves.png)", ""]
    return lines + sanity_lines(wb.get("sanity", []))


def transferability_section(mats: Sequence[Mapping[str, Any]], run_dir: Path, prefix: str = "") -> list[str]:
    lines = ["## Within-ensemble transferability", "",
             "Row i: PGD against member i alone; column j: attack success rate on member j (diagonal: "
             "white-box); last column: the whole ensemble. Examples every member classifies correctly.", ""]
    for t in mats:
        name = f"{prefix}transferability_eps{t['eps']:g}.png"
        plot_heatmap(t["matrix"], t["rows"], t["columns"], run_dir / name,
                     title=f"Transferability, eps {t['eps']:g} (success %)")
        rows = [[r] + [pct(v) for v in vals] for r, vals in zip(t["rows"], t["matrix"], strict=True)]
        mean = t.get("mean_pairwise")
        lines += [f"### eps {t['eps']:g} ({t['n']} examples, {t['restarts']} restarts)", "",
                  table(["source \\ target", *list(t["columns"])], rows), "",
                  f"Mean pairwise transfer rate: {pct(mean) if mean is not None else 'n/a'}.", "",
                  f"![transferability]({name})", ""]
    return lines


def diversity_section(div: Mapping[str, Any], run_dir: Path, prefix: str = "") -> list[str]:
    m = len(div["ce"])
    names = [f"member {i}" for i in range(m)]
    plot_heatmap(div["diversity"], names, names, run_dir / f"{prefix}diversity.png", percent=False, cmap="Blues",
                 title=f"Vulnerability diversity d(i, j), eps {div['eps']:g}")
    rows = [[names[i]] + [f"{v:.3f}" for v in div["ce"][i]] for i in range(m)]
    return ["## Vulnerability diversity (DVERGE eq. 2)", "",
            f"C[i][j] = mean CE of member j on member i's distilled images (eps {div['eps']:g}, {div['steps']} "
            f"steps, random layer per batch), with the target label; d(i, j) = (C[i][j] + C[j][i]) / 2. "
            f"{div['n']} examples.", "", table(["distilled by \\ scored by", *names], rows), "",
            f"Mean pairwise diversity: {div['mean_pairwise']:.3f}" if div.get("mean_pairwise") is not None else "",
            "", f"![diversity]({prefix}diversity.png)", ""]


def blackbox_section(bb: Mapping[str, Any], run_dir: Path, prefix: str = "") -> list[str]:
    curves = {"black-box (all sets)": bb["curve"]}
    if bb.get("whitebox_curve"):
        curves["white-box"] = bb["whitebox_curve"]
    plot_accuracy_curves(curves, run_dir / f"{prefix}blackbox_curve.png", title="Black-box transfer accuracy")
    sources = sorted({s for r in bb["per_eps"] for s in r["per_source"]})
    rows = [[f"{r['eps']:g}", pct(r["accuracy"]), pct(r["accuracy_among_clean_correct"])]
            + [pct(r["per_source"][s]) for s in sources] for r in bb["per_eps"]]
    return ["## Black-box transfer accuracy", "", f"Transfer sets: `{bb['transfer_sets']}` ({bb['n']} examples). An example is robust only if " "it is classified correctly on every set (denominator: all examples).", "", table(["eps", "all sets", "among clean-correct", *sources], rows), "", *source_lines(bb.get("sources", [])), f"![black-box]({prefix}blackbox_curve.png)", "", *sanity_lines(bb.get("sanity", []))]


def source_lines(sources: Sequence[Mapping[str, Any]]) -> list[str]:
    """One row per surrogate the transfer sets came from: label, checkpoint hash, paths."""
    if not sources:
        return []
    rows = [[f"`{s['label']}`", f"`{s['sha256'][:16]}`" if s.get("sha256") else "not recorded",
             ("trained here: " if s.get("trained") else "") + ", ".join(f"`{p}`" for p in s.get("paths", []))]
            for s in sources]
    return [f"Sources ({len(sources)} surrogate{'s' if len(sources) != 1 else ''}):", "",
            table(["source", "sha256", "checkpoint"], rows), ""]


def examples_section(ex: Mapping[str, Any], run_dir: Path, prefix: str = "") -> list[str]:
    if not ex:
        return []
    plot_adversarial_grid(ex["clean"], ex["adversarial"], ex["labels"], ex["clean_pred"], ex["adv_pred"],
                          run_dir / f"{prefix}adversarial_examples.png",
                          title=f"{ex['attack']} at eps {ex['eps']:g} (top: clean, bottom: adversarial)")
    src = ex["decision_regions"].get("direction_from", "the evaluated ensemble")
    plot_decision_regions(ex["decision_regions"], run_dir / f"{prefix}decision_regions.png",
                          title=f"Decision regions (vertical: adversarial direction of {src}; horizontal: random)")
    return ["## Examples", "", f"![adversarial examples]({prefix}adversarial_examples.png)", "",
            f"![decision regions]({prefix}decision_regions.png)", ""]


def card_section(card: Mapping[str, Any], run_dir: Path, prefix: str = "") -> list[str]:
    """The robustness card: curves per attack and the worst case, who found the breaks, the
    gradient-masking flags, one plot per attack family."""
    curves = dict(card["curves"])
    kind = "expected accuracy over the draw" if card["randomized"] else "accuracy"
    budget = "reduced budgets (quick)" if card.get("quick") else "published defaults"
    lines = ["## Robustness card", "",
             f"Combiner `{card['combiner']}`, {card['n']} examples, {kind}; attacks at their {budget}. "
             "Worst case: per example, the lowest over every attack below.", "",
             curves_table({**curves, "worst case": card["worst_case"]}), ""]
    src = card.get("transfer", {}).get("source")
    if src:
        lines += [f"Transfer attacks: AutoAttack/MORA examples made against an independent {src}.", ""]
    last = card["found_by"][-1] if card["found_by"] else None
    if last is not None and last["breaks"]:
        lines += [f"### Who found the breaks (eps {last['eps']:g}, {last['breaks']} examples)", "",
                  table(["attack", "found first", "found only by it"],
                        [[n, last["found_first_by"][n], last["only_by"][n]] for n in last["found_first_by"]]), ""]
    failed = [f for f in card["flags"] if not f["passed"]]
    lines += ["### Gradient-masking flags", ""]
    lines += [f"- **{f['name']}**: {f['detail']} — {f['advice']}" for f in failed] or ["- none raised"]
    lines += [f"- {len(card['flags']) - len(failed)} other checks passed", ""]
    for fam, names in card["families"].items():
        name = f"{prefix}card_{fam.lower().replace(' ', '_')}.png"
        plot_accuracy_curves({**{n: curves[n] for n in names}, "worst case": card["worst_case"]}, run_dir / name,
                             title=f"Robustness card: {fam}")
        lines += [f"![{fam}]({name})"]
    return [*lines, ""]


def evaluation_sections(results: Mapping[str, Any], run_dir: str | Path, prefix: str = "") -> list[str]:
    """Report lines (and plots in ``run_dir``) for a :func:`phalanx.evaluation.run_evaluation` result."""
    run_dir = Path(run_dir)
    clean = results["clean"]
    lines = ["## Clean accuracy", "",
             table(["model", "accuracy"], [["ensemble", pct(clean["accuracy"])]] +
                   [[f"member {i}", pct(a)] for i, a in enumerate(clean["member_accuracy"])]), ""]
    if "whitebox" in results:
        lines += whitebox_section(results["whitebox"], run_dir, prefix)
    if "transferability" in results:
        lines += transferability_section(results["transferability"], run_dir, prefix)
    if "diversity" in results:
        lines += diversity_section(results["diversity"], run_dir, prefix)
    if "blackbox" in results:
        lines += blackbox_section(results["blackbox"], run_dir, prefix)
    if "card" in results:
        lines += card_section(results["card"], run_dir, prefix)
    lines += examples_section(results.get("examples", {}), run_dir, prefix)
    return lines


def write_evaluation_report(run_dir: str | Path, results: Mapping[str, Any], *, title: str,
                            scope: str | None = None) -> Path:
    """report.md: ``title``, the ``scope`` sentence (dataset and examples), then the sections."""
    path = Path(run_dir) / "report.md"
    head = [f"# {title}", ""] + ([scope, ""] if scope else [])
    path.write_text("\n".join([*head, *evaluation_sections(results, run_dir)]) + "\n")
    return path


__all__ = ["card_section", "evaluation_sections", "write_evaluation_report"]
