"""The FLOP floor of exact per-sample clipping: the step-time ratio to non-private training below which no exact
method can go on a GPU-bound step, computed from the shapes alone.

    python -m benchmarks.floor            # the table of docs/performance.md ("The FLOP floor")

Model of a step (matrix products only; elementwise work, normalisations and the optimizer are left out, so the
floor is a lower bound on what the measured ratio can reach):

* a Linear of input width d and output width p over N = B·T tokens costs 6·N·p·d non-privately (forward 2Npd,
  input gradient 2Npd, weight gradient 2Npd), plus 2Npd when activation checkpointing recomputes its forward;
* causal attention (flash kernels) costs 2·B·T²·d forward and 5·B·T²·d backward (its scores are recomputed),
  plus the forward again under checkpointing;
* the exact per-sample norm of a Linear costs the cheaper of the Gram form, 2·B·T²·(p + d) (XXᵀ and GGᵀ per
  sample), and the flash form, 2·N·p·d (each sample's GᵀX tile by tile): ``min`` of the two. The clipped weight
  gradient Σ_b c_b G_bᵀX_b replaces the non-private weight gradient and costs nothing extra;
* layers that read one input (Llama's q/k/v, its gate/up; ``Shape.shared_inputs``) may share it: their norm terms
  sum to ‖[G_1 … G_k]ᵀX‖², one Gram form 2·B·T²·(d + Σp) (XXᵀ once) or one flash form 2·N·d·Σp (the same
  FLOPs as apart: flash has no shared term). The table's last column prices that;
* an embedding tied to the head adds its own per-sample norm and the cross term with the head's, each one
  T×T product of width d per sample: 4·B·T²·d;
* at B = 1 the clipped gradient is the ordinary gradient scaled, and its norm a reduction: no norm FLOPs.

The planner has a third method the floor leaves out: materialising a layer's per-sample gradients (B·p·d
memory), which costs no FLOPs beyond the weight gradient's but moves B·p·d elements three times. Where it is
chosen, a measured ratio can fall below this floor.

floor = (non-private FLOPs + norm FLOPs) / non-private FLOPs.

The second floor of the table counts what FlashNorm's exactness allows: beyond `GRAM_FLOAT32_MAX_STEPS` positions a
float32 Gram norm's rounding exceeds the clipping coefficient's allowance (`flashnorm.norms.rounding`), so the Gram
form runs in float64 there, at an H100's float64 tensor-core rate (67 TFLOPS against 989 in bf16): its FLOPs count
``FLOAT64_SLOWDOWN`` times, and the flash form is then the cheaper one at every row of the table.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from flashnorm.norms.rounding import GRAM_FLOAT32_MAX_STEPS

#: Dense tensor-core throughput of an H100 SXM, bf16 over float64 (989 / 67 TFLOPS): a float64 Gram norm's FLOPs in
#: bf16-equivalents.
FLOAT64_SLOWDOWN = 989.0 / 67.0


@dataclass(frozen=True)
class Shape:
    """A transformer as its matrix products: per-layer Linear (d, p) pairs, the head and the attention width."""

    name: str
    layers: int
    linears: Tuple[Tuple[int, int], ...]  # (in d, out p) of each Linear in one block
    width: int  # model width (attention's d)
    vocab: int
    tied: bool
    shared_inputs: Tuple[Tuple[int, ...], ...] = ()  # indices into ``linears`` of Linears that read one input

    def input_groups(self) -> List[Tuple[int, ...]]:
        """The block's Linears by input: each of ``shared_inputs``, the others alone."""
        grouped = {i for group in self.shared_inputs for i in group}
        return list(self.shared_inputs) + [(i,) for i in range(len(self.linears)) if i not in grouped]


GPT2_SMALL = Shape("GPT-2 small", 12, ((768, 2304), (768, 768), (768, 3072), (3072, 768)), 768, 50257, True)
GPT2_SUITE = Shape("GPT-2 small (suite, untied)", 12, GPT2_SMALL.linears, 768, 50257, False)
LLAMA_1B = Shape("Llama-3.2-1B", 16, ((2048, 2048), (2048, 512), (2048, 512), (2048, 2048), (2048, 8192),
                                       (2048, 8192), (8192, 2048)), 2048, 128256, True, ((0, 1, 2), (4, 5)))


@dataclass(frozen=True)
class Row:
    shape: Shape
    batch: int
    seq: int
    checkpointing: bool = False


#: The rows of the short-sequence speed goals, as measured on one H100 (docs/performance.md).
ROWS = (
    Row(GPT2_SMALL, 1, 4096), Row(GPT2_SMALL, 8, 1024), Row(GPT2_SMALL, 32, 256),
    Row(LLAMA_1B, 2, 4096), Row(LLAMA_1B, 8, 1024), Row(GPT2_SUITE, 8, 1024),
    Row(GPT2_SMALL, 1, 16384, True), Row(GPT2_SMALL, 1, 32768, True), Row(LLAMA_1B, 1, 16384, True),
)


def linear_norm_flops(batch: int, seq: int, d: int, p: int, allowance: bool = False) -> Tuple[float, str]:
    """(FLOPs, form) of one Linear's exact per-sample norms: the cheaper of Gram and flash (``allowance``: a Gram
    norm beyond `GRAM_FLOAT32_MAX_STEPS` positions in float64, its FLOPs counted ``FLOAT64_SLOWDOWN`` times)."""
    gram, flash = 2.0 * batch * seq**2 * (p + d), 2.0 * batch * seq * p * d
    if allowance and seq > GRAM_FLOAT32_MAX_STEPS:
        gram *= FLOAT64_SLOWDOWN
    return (gram, "gram") if gram <= flash else (flash, "flash")


def step_flops(row: Row, allowance: bool = False, shared: bool = False) -> Tuple[float, float]:
    """(non-private FLOPs, exact-norm FLOPs) of one training step of ``row`` (``allowance``: see
    `linear_norm_flops`; ``shared``: the Linears of one input share it, priced as one Linear of their summed output
    widths: one Gram form 2·B·T²·(d + Σp) or flash 2·B·T·d·Σp; per member Gram is the cheaper exactly where T < d,
    whatever its p, so the members take one form together)."""
    s, b, t = row.shape, row.batch, row.seq
    n = b * t
    linears: List[Tuple[int, int]] = [lin for _ in range(s.layers) for lin in s.linears] + [(s.width, s.vocab)]
    plain = sum(6.0 * n * p * d for d, p in linears)
    if row.checkpointing:  # each block's forward again in the backward (the head is not checkpointed)
        plain += sum(2.0 * n * p * d for d, p in linears[:-1])
    attention = s.layers * b * t**2 * s.width * (2.0 + 5.0 + (2.0 if row.checkpointing else 0.0))
    if b == 1:
        return plain + attention, 0.0
    groups = s.input_groups() if shared else [(i,) for i in range(len(s.linears))]
    block = sum(linear_norm_flops(b, t, s.linears[group[0]][0], sum(s.linears[i][1] for i in group), allowance)[0]
                for group in groups)
    norms = s.layers * block + linear_norm_flops(b, t, s.width, s.vocab, allowance)[0]
    if s.tied:
        norms += 4.0 * b * t**2 * s.width
    return plain + attention, norms


def floor(row: Row, allowance: bool = False, shared: bool = False) -> float:
    """The FLOP floor of ``row``: the ratio (non-private + norms) / non-private (``allowance``: the Gram form
    priced as the rounding allowance requires, `linear_norm_flops`; ``shared``: inputs shared,
    `step_flops`)."""
    plain, norms = step_flops(row, allowance, shared)
    return (plain + norms) / plain


def table(rows: Sequence[Row] = ROWS) -> str:
    """The markdown table of docs/performance.md."""
    lines = ["| workload | B | T | checkpointing | non-private TFLOP | norms TFLOP | norm form of the widest Linear "
             f"| floor | floor, Gram in float64 beyond T = {GRAM_FLOAT32_MAX_STEPS} | both floors, inputs shared |",
             "|---|---:|---:|---|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        plain, norms = step_flops(row)
        d, p = max(row.shape.linears, key=lambda lin: lin[0] * lin[1])
        form = linear_norm_flops(row.batch, row.seq, d, p)[1] if row.batch > 1 else "— (B = 1)"
        lines.append(f"| {row.shape.name} | {row.batch} | {row.seq} | {'yes' if row.checkpointing else 'no'} | "
                     f"{plain / 1e12:.2f} | {norms / 1e12:.3f} | {form} | {floor(row):.3f}× | "
                     f"{floor(row, allowance=True):.3f}× | {floor(row, shared=True):.3f}× / "
                     f"{floor(row, allowance=True, shared=True):.3f}× |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print(table())


if __name__ == "__main__":
    main()
