"""GPU checks of the fused head (``pytest -m gpu``): the compiled logit kernels against float64 at bf16 and float32,
every case the first call at its shape (configs come from ``logit_config``: nothing is tuned), TMA in the PTX on
Hopper, the gradient block repeated bit for bit, the module and a DP step in bf16 against float64, and the memory of
a long-context head."""

import pytest
import torch

from flashnorm.kernels.backend import supports_tma
from flashnorm.kernels.linear_cross_entropy import logit_grad_block_launch, logit_stats_launch
from flashnorm.layers import FusedLinearCrossEntropy
from tests.conftest import CLIPPING_MODES, TOLERANCES
from tests.layers.head import TinyLM, batch, dp_step, oracle, per_sample_cross_entropy

pytestmark = pytest.mark.gpu

# (rows, d, V, [v0, v1)): Llama-3.2-1B's and GPT-2's widths, rows and ranges that are not multiples of the tiles;
# d = 100 (bf16 rows of 200 bytes: not 16-byte aligned) takes pointer loads.
CASES = [(1, 2048, 128256, (0, 4096)), (37, 768, 50257, (49152, 50257)), (1030, 2048, 128256, (4096, 8192 + 77)),
         (4100, 768, 50257, (0, 50257)), (600, 100, 1000, (0, 1000))]


def _inputs(rows, d, vocab, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, d, generator=gen, device="cuda", dtype=dtype)
    w = (torch.randn(vocab, d, generator=gen, device="cuda") / d**0.5).to(dtype)
    y = torch.randint(0, vocab, (rows,), generator=gen, device="cuda")
    y[::7] = -100
    return x, w, y


def _logits64(x, w, v0, v1):
    return x.double() @ w[v0:v1].double().T


@pytest.fixture
def no_tf32(set_tf32, monkeypatch):
    monkeypatch.delenv("FLASHNORM_BACKEND", raising=False)
    set_tf32(False)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("rows,d,vocab,span", CASES)
def test_kernels_match_float64(rows, d, vocab, span, dtype, no_tf32):
    """The logits of bf16 (or float32) operands summed in float32: the statistics to float32 accuracy against the
    float64 sums of the same operands (Σ z to rtol·Σ|z|); G, stored in the inputs' dtype, to that dtype's."""
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    x, w, y = _inputs(rows, d, vocab, dt)
    (lse, z_y, z_sum), _ = logit_stats_launch(x, w, None, y, *span)
    z = _logits64(x, w, *span)
    local = y - span[0]
    inside = (local >= 0) & (local < span[1] - span[0])
    want_y = torch.where(inside, z.gather(1, local.clamp(0, span[1] - span[0] - 1)[:, None])[:, 0], 0.0)
    # float32 sums of d products err by about rtol·Σ_k |x_k w_vk|: the scale of each logit, of the row's largest
    # (lse), of the target's (z_y) and of their sum (Σ z)
    rtol, atol = TOLERANCES["fp32"]
    scale = x.double().abs() @ w[span[0]:span[1]].double().abs().T
    scale_y = torch.where(inside, scale.gather(1, local.clamp(0, span[1] - span[0] - 1)[:, None])[:, 0], 0.0)
    for got, want, bound in ((lse, torch.logsumexp(z, dim=1), scale.max(dim=1).values), (z_y, want_y, scale_y),
                             (z_sum, z.sum(dim=1), scale.sum(dim=1))):
        error = (got.double() - want).abs()
        assert (error <= atol + rtol * (want.abs() + bound)).all(), error.max().item()

    full_lse = torch.logsumexp(_logits64(x, w, 0, vocab), dim=1).float()
    alpha = torch.rand(rows, device="cuda")
    g, _ = logit_grad_block_launch(x, rows // 3, rows, w, None, *span, full_lse, y, alpha, 0.9, 0.1 / vocab)
    assert g.dtype == dt
    r = slice(rows // 3, rows)
    onehot = (torch.arange(*span, device="cuda")[None, :] == y[r, None]).double()
    want = alpha[r, None].double() * (torch.exp(z[r] - full_lse[r, None].double()) - 0.9 * onehot - 0.1 / vocab)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(g.double(), want, rtol=rtol, atol=atol)


@pytest.mark.skipif(not torch.cuda.is_available() or not supports_tma(torch.device("cuda")), reason="needs TMA")
def test_tma_loads_on_hopper(no_tf32):
    """Aligned bf16 operands are read through tensor descriptors: bulk tensor copies in both kernels' PTX."""
    x, w, y = _inputs(1030, 2048, 8192, torch.bfloat16)
    _, stats_kernel = logit_stats_launch(x, w, None, y, 0, 8192)
    lse = torch.zeros(1030, device="cuda")
    _, grad_kernel = logit_grad_block_launch(x, 0, 1030, w, None, 0, 8192, lse, y, torch.ones(1030, device="cuda"),
                                             1.0, 0.0)
    assert "cp.async.bulk.tensor" in stats_kernel.asm["ptx"]
    assert "cp.async.bulk.tensor" in grad_kernel.asm["ptx"]


def test_grad_block_repeats_bit_for_bit(no_tf32):
    x, w, y = _inputs(4100, 2048, 16384, torch.bfloat16)
    lse, alpha = torch.rand(4100, device="cuda") + 9, torch.rand(4100, device="cuda")
    first, _ = logit_grad_block_launch(x, 1030, 4100, w, None, 4096, 12288, lse, y, alpha, 1.0, 0.0)
    second, _ = logit_grad_block_launch(x, 1030, 4100, w, None, 4096, 12288, lse, y, alpha, 1.0, 0.0)
    assert torch.equal(first, second)


def _error(got, want):
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("steps,vocab,d", [(1030, 128256, 64), (4100, 50257, 768), (37, 1000, 100)])
def test_module_bf16_within_twice_the_unfused_error(steps, vocab, d, no_tf32):
    """Losses and gradients of a bf16 head against float64: no worse than twice the unfused bf16 head's own error
    (logits in bf16, cross-entropy in float32, as Hugging Face computes them)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    linear = torch.nn.Linear(d, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(2, steps, d, generator=gen, device="cuda", dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, vocab, (2, steps), generator=gen, device="cuda")
    target[1, : steps // 2] = -100
    upstream = torch.tensor([0.5, -2.0], device="cuda")
    loss = FusedLinearCrossEntropy.from_linear(linear, shift=True)(hidden, target)
    fused = [loss, *torch.autograd.grad((loss * upstream).sum(), [hidden, linear.weight])]

    def unfused(dtype):
        w = linear.weight.detach().to(dtype).requires_grad_()
        h = hidden.detach().to(dtype).requires_grad_()
        out = per_sample_cross_entropy((h @ w.T).float() if dtype != torch.float64 else h @ w.T, target, shift=True)
        return [out, *torch.autograd.grad((out * upstream.to(out.dtype)).sum(), [h, w])]

    truth, plain = unfused(torch.float64), unfused(torch.bfloat16)
    for name, got, bf16, want in zip(("loss", "hidden", "weight"), fused, plain, truth):
        assert _error(got, want) <= 2 * _error(bf16, want) + 1e-6, (name, _error(got, want), _error(bf16, want))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("mode", CLIPPING_MODES)
def test_dp_step_bf16_matches_float64(mode, tied, no_tf32):
    """A bf16 model with the fused head (V = 50257, T = 1030): norms and applied gradients within bf16's tolerance
    (norm-wise) of the float64 oracle of the same weights."""
    torch.manual_seed(0)
    model = TinyLM(50257, 64, tied=tied, shift=True).to("cuda", torch.bfloat16)
    ids, labels = (t.cuda() for t in batch(50257, 4, 1030))
    expected = oracle(model, ids, labels, 1e-2)
    dp_model, grads = dp_step(model, mode, ids, labels, 1e-2, "sum")
    rtol, _ = TOLERANCES["bf16"]
    assert _relative(dp_model.get_norm_sample(), expected.norms) < rtol
    for name, grad in grads.items():
        assert _relative(grad, expected.clipped_sum[name]) < rtol, name


def _relative(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def test_long_context_memory_stays_far_below_the_logits(no_tf32):
    """Llama-3.2-1B's head at T = 16384, B = 1, bf16: forward and backward of the fused head add far less than one
    T × V bf16 logit tensor (4.3 GB) to the peak: its tiles are at most twice the hidden states."""
    steps, vocab, d = 16384, 128256, 2048
    linear = torch.nn.Linear(d, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(1, steps, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, vocab, (1, steps), device="cuda")
    head = FusedLinearCrossEntropy.from_linear(linear, shift=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    head(hidden, target).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits = steps * vocab * 2
    assert extra < logits / 3, f"{extra / 2**30:.2f} GiB above the inputs, one bf16 logit tensor is {logits / 2**30:.2f}"
