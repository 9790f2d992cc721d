"""The demo stage of the attack suite: white-box curves of the baseline ensemble under several
attacks (with the per-example worst case, per-member curves and sanity checks), its
within-ensemble transferability heat map, adversarial images and decision regions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from phalanx.attacks import Attack, create_attack
from phalanx.evaluation.transferability import transferability_matrix
from phalanx.evaluation.whitebox import whitebox_evaluation
from phalanx.reports.evaluation_report import examples_section, transferability_section, whitebox_section
from phalanx.workflows.evaluation import example_images

if TYPE_CHECKING:  # pragma: no cover
    from phalanx.demo.context import DemoContext

#: transferability on digits: eps 0.1 (digits' scale; DVERGE uses 0.03 on CIFAR-10); at most
#: ``limit`` test examples keep the stage within its time budget
DEMO_ATTACKS = {"eps": 0.1, "restarts": 2, "transfer_limit": 200, "limit": 200}


def demo_attacks(steps: int) -> dict[str, Attack]:
    return {f"pgd-{steps}": create_attack("pgd", steps=steps), "fgsm": create_attack("fgsm"),
            f"mim-{steps}": create_attack("mim", steps=steps), f"apgd-ce-{steps}": create_attack("apgd-ce", n_iter=steps),
            f"pgd-{steps}-cw": create_attack("pgd", steps=steps, loss="cw")}


def stage_attacks(ctx: DemoContext) -> None:
    """White-box curves under several attacks and the transferability heat map of the baseline."""
    ens = ctx.ensembles["baseline"].eval()
    ev = ctx.config.eval
    split = ctx.data.test.subset(min(ev.limit or len(ctx.data.test), int(DEMO_ATTACKS["limit"])))
    gen = torch.Generator().manual_seed(ctx.config.train.seed)
    attacks = demo_attacks(ev.steps)
    wb = whitebox_evaluation(ens, split, ev.eps, attacks, sanity_factor=2, batch_size=ev.batch_size,
                             generator=gen, progress=ctx.progress)
    tr = transferability_matrix(ens, split, DEMO_ATTACKS["eps"], attack=create_attack("pgd", steps=ev.steps),
                                restarts=int(DEMO_ATTACKS["restarts"]), limit=int(DEMO_ATTACKS["transfer_limit"]),
                                batch_size=ev.batch_size, generator=gen, progress=ctx.progress)
    examples = example_images(ens, split, f"pgd-{ev.steps}", attacks[f"pgd-{ev.steps}"], 0.2, gen)
    ctx.results["attacks"] = {"whitebox": wb, "transferability": tr}
    lines: list[str] = ["# Attacks and evaluation protocols (baseline ensemble)", ""]
    body = whitebox_section(wb, ctx.out_dir, "attacks_") + transferability_section([tr], ctx.out_dir, "attacks_")
    body += examples_section(examples, ctx.out_dir, "attacks_")
    # demote the section headings one level under this stage's heading
    lines += [("#" + ln) if ln.startswith("#") else ln for ln in body]
    lines[0] = "## Attacks and evaluation protocols (baseline ensemble)"
    ctx.sections += lines




__all__ = ["DEMO_ATTACKS", "demo_attacks", "stage_attacks"]
