"""Regenerates the numbers and the plot of ``docs/auditing.md``: ``python -m tests.auditing.report`` (CPU, ~2 min).

* the walkthrough: runs the page's first ``python`` block as written, and the same block with σ/4, for the
  printed result and the histogram plot ``docs/auditing_scores.png``;
* the self-audit table: the CI runs of ``tests/auditing`` (same seeds), plus Opacus's ``hooks`` mode, alone and
  under Opacus's DPDDP on 2 ranks;
* the broken-pipeline table: the CI's broken variants and those CI does not assert (they are not caught).

Each table replaces the text between its ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import platform
import re
import tempfile
import warnings

import numpy as np
import opacus
import torch

from flashnorm.auditing import epsilon_one_run, epsilon_one_run_fdp
from tests.auditing import runs

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "auditing.md"
PLOT = ROOT / "docs" / "auditing_scores.png"
SIGMA = "noise_multiplier=1.2"  # the walkthrough's σ, replaced by σ/4 for the broken panel


def walkthrough_code() -> str:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)[0]


def run_walkthrough(code: str):
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, str(PAGE), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace["result"], out.getvalue().strip()


def plot(correct, broken) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, result, title in ((axes[0], correct, "the walkthrough's run (σ = 1.2)"),
                              (axes[1], broken, "the same run with noise σ/4, ε reported for σ")):
        scores = np.concatenate([result.in_scores, result.out_scores])
        bins = np.linspace(scores.min(), scores.max(), 60)
        ax.hist(result.out_scores, bins=bins, alpha=0.6, label=f"out ({len(result.out_scores)})", color="tab:blue")
        ax.hist(result.in_scores, bins=bins, alpha=0.6, label=f"in ({len(result.in_scores)})", color="tab:orange")
        ax.set_title(f"{title}\nε = {result.epsilon:.2f}, ε̂ f-DP = {result.epsilon_lower_fdp:.2f}, "
                     f"ε̂ one-run = {result.epsilon_lower:.2f}", fontsize=9)
        ax.set_xlabel("canary score: movement of its weight")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("canaries")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def self_audit_table(tmp: str) -> str:
    """One row per pipeline and mode, one column per nominal ε; cells "ε̂ f-DP / ε̂ one-run"."""
    rows = {}  # (pipeline, mode) -> [AuditResult per ε]
    for mode in runs.MODES + ("hooks",):
        owner = "Opacus" if mode == "hooks" else "FlashNorm"
        rows[f"{owner}, 1 process", mode] = [runs.single_run(mode, eps).result() for eps in runs.EPSILONS]
    names = {"ddp": "FlashNorm, DDP, 2 ranks", "fsdp": "FlashNorm, FSDP2, 2 ranks", "dpddp": "Opacus, DPDDP, 2 ranks"}
    kinds = {**runs.DISTRIBUTED_MODES, "dpddp": ("hooks",)}
    cases = [runs.Case(f"{kind}-{mode}-{eps:g}", kind, mode, eps)
             for kind, modes in kinds.items() for mode in modes for eps in runs.EPSILONS]
    results = runs.launch(cases, 2, tmp)
    for case in cases:
        rows.setdefault((names[case.kind], case.mode), []).append(runs.distributed_result(case, results[case.name]))
    epsilons = [r.epsilon for r in next(iter(rows.values()))]
    for key, results_ in rows.items():  # every pipeline accounts the same σ, q and steps
        assert np.allclose([r.epsilon for r in results_], epsilons, atol=0.005), key
    lines = ["| pipeline | `grad_sample_mode` | " + " | ".join(f"ε = {e:.2f}" for e in epsilons) + " |",
             "|---|---|" + "---|" * len(epsilons)]
    for (pipeline, mode), results_ in rows.items():
        cells = " | ".join(f"{r.epsilon_lower_fdp:.2f} / {r.epsilon_lower:.2f}" for r in results_)
        lines.append(f"| {pipeline} | `{mode}` | {cells} |")
    return "\n".join(lines) + "\n\nEach cell: ε̂ f-DP / ε̂ one-run at δ = 10⁻⁵; ε is the accountant's, the same in every row."


def _broken_row(variant: str, result, *, fdp=None, one_run=None, asserted: str = "—") -> str:
    fdp = result.epsilon_lower_fdp if fdp is None else fdp
    one_run = result.epsilon_lower if one_run is None else one_run
    caught = "**yes**" if fdp > result.epsilon else "no"
    return f"| {variant} | {result.epsilon:.2f} | {one_run:.2f} | {fdp:.2f} | {caught} | {asserted} |"


def broken_table(tmp: str) -> str:
    lines = ["| broken pipeline (`flash_fuse`) | ε reported | ε̂ one-run | ε̂ f-DP | caught (ε̂ f-DP > ε) "
             "| CI asserts |", "|---|---|---|---|---|---|"]
    for eps in (2.0, 4.0):
        lines.append(_broken_row(f"noise σ/4, ε reported for σ (ε ≈ {eps:g})",
                                 runs.low_noise_run("flash_fuse", eps).result(), asserted="caught"))
    for eps in (2.0, 4.0):
        lines.append(_broken_row(f"clipping disabled (ε ≈ {eps:g})", runs.unclipped_run("flash_fuse", eps).result(),
                                 asserted="caught"))
    every = runs.Case("every", "every_rank", "flash_fuse", 2.0)
    shares2 = runs.Case("shares2", "shares", "flash_fuse", 2.0)
    shares8 = runs.Case("shares8", "shares", "flash_fuse", 2.0)
    runs.reported_epsilon(runs.noise_for(2.0))
    two = runs.launch([every, shares2], 2, tmp + "/two")
    eight = runs.launch([shares8], 8, tmp + "/eight")
    lines.append(_broken_row("noise on every rank, the full σ·C each (2 ranks): √2·σ·C in all, more private than "
                             "reported", runs.distributed_result(every, two["every"]), asserted="ε̂ ≤ ε"))
    lines.append(_broken_row("noise on every rank, a share σ·C/W each (2 ranks): σ·C/√2 in all",
                             runs.distributed_result(shares2, two["shares2"])))
    lines.append(_broken_row("noise on every rank, a share σ·C/W each (8 ranks): σ·C/√8 in all",
                             runs.distributed_result(shares8, eight["shares8"]), asserted="caught"))
    lines.append(_broken_row(f"batches shuffled once, kept {runs.SHUFFLED_ONCE_EPOCHS} epochs, reported as Poisson "
                             f"(σ = {runs.SHUFFLED_ONCE_SIGMA:g}, batches of {runs.SHUFFLED_ONCE_BATCH}), per-slot "
                             "scores", runs.shuffled_once_run("flash_fuse"), asserted="caught"))
    for eps in (2.0, 4.0):
        run = runs.shuffled_run("flash_fuse", eps)
        total = run.result()
        lines.append(_broken_row(f"batches reshuffled each epoch, reported as Poisson (ε ≈ {eps:g}), total movement",
                                 total))
        per_step = runs.shuffle_scores(run, runs.noise_for(eps))
        included = runs.CanaryAudit(runs.CANARIES, max_grad_norm=runs.CLIP, seed=run.seed).included.numpy()
        ins, outs = per_step[included], per_step[~included]
        best_fdp = max(epsilon_one_run_fdp(ins, outs, delta=runs.DELTA),
                       epsilon_one_run_fdp(-outs, -ins, delta=runs.DELTA))
        best_one = max(epsilon_one_run(ins, outs, delta=runs.DELTA), epsilon_one_run(-outs, -ins, delta=runs.DELTA))
        lines.append(_broken_row(f"batches reshuffled each epoch, reported as Poisson (ε ≈ {eps:g}), per-step scores, "
                                 "in or out guesses", total, fdp=best_fdp, one_run=best_one))
    return "\n".join(lines)


def replace(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", flags=re.S)
    if not pattern.search(text):
        raise ValueError(f"{PAGE} has no {name} markers")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    code = walkthrough_code()
    correct, printed = run_walkthrough(code)
    if SIGMA not in code:
        raise ValueError(f"the walkthrough no longer sets {SIGMA}")
    broken, _ = run_walkthrough(code.replace(SIGMA, "noise_multiplier=0.3"))
    broken.epsilon = correct.epsilon  # reported for σ = 1.2
    plot(correct, broken)
    with tempfile.TemporaryDirectory() as tmp:
        table = self_audit_table(tmp)
        power = broken_table(tmp)
    versions = (f"Generated by `python -m tests.auditing.report` on {platform.machine()} CPU: "
                f"torch {torch.__version__}, opacus {opacus.__version__}, numpy {np.__version__}.")
    text = PAGE.read_text()
    text = replace(text, "walkthrough-output", f"```text\n{printed}\n```")
    text = replace(text, "self-audit", table + "\n\n" + versions)
    text = replace(text, "broken", power + "\n\n" + versions)
    PAGE.write_text(text)
    print(printed, table, power, sep="\n\n")


if __name__ == "__main__":
    main()
