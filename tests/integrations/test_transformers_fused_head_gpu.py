"""DPTrainer on a CUDA device with ``fused_head="auto"`` (the default): micro-batches of at least 16384 label
positions take the fused head's Triton kernels, shorter ones the model's own logits, and either step is the float64
per-sample oracle's (float32, tf32 off); in bf16 the fused step is no further from the oracle than the unfused one
(twice its error at most); a micro-batch of one sample takes the one-sample path from its second step. The oracle
runs in float64 on the GPU too (its T × T attention would be slow on the host)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from flashnorm.integrations.privacy_arguments import AUTO_MIN_FUSED_TOKENS  # noqa: E402
from flashnorm.integrations.transformers import PrivacyArguments  # noqa: E402
from tests.conftest import TOLERANCES  # noqa: E402
from tests.integrations.test_transformers import FirstStep, Rows, make_trainer  # noqa: E402
from tests.integrations.test_transformers_fused_head import HeadCalls, oracle, padded_rows, tied_llama  # noqa: E402

pytestmark = pytest.mark.gpu

VOCAB = 1000  # not a multiple of the kernels' 128-column tiles
ROWS = 32
#: ROWS rows of STEPS tokens: a micro-batch at the threshold. Short rows keep the clipping coefficient Opacus's: from
#: T ≈ 1000 its float32 rounding allowance lowers it (flashnorm/norms/rounding.py), beyond these tests' tolerance.
STEPS = AUTO_MIN_FUSED_TOKENS // ROWS


@pytest.fixture
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def long_llama():
    return tied_llama(VOCAB, AUTO_MIN_FUSED_TOKENS)


def long_rows(n, steps):
    return padded_rows(n, steps, VOCAB)


def cuda_oracle(rows, clip=None):
    """tests' float64 per-sample oracle of `long_llama` on the GPU (float64 there too): ({name: Σ_b c_b ∇ℓ_b / B} on
    the host, the norms); ``clip`` None: C = the norms' mean (a clip that clips one sample of two and not the other)."""
    model = long_llama().double().cuda()
    on_gpu = Rows(**{k: v.cuda() for k, v in rows.columns.items()})
    if clip is None:
        _, norms = oracle(model, on_gpu, 1.0)
        assert len(norms) == 1 or float(norms.max() - norms.min()) > 1e-3 * float(norms.max())
        clip = float(norms.mean()) if len(norms) > 1 else float(norms[0]) / 2
    grads, _ = oracle(model, on_gpu, clip)
    return {n: g.cpu() for n, g in grads.items()}, clip


def cuda_step(model, rows, tmp_path, clip, fused_head="auto", **args):
    """One DP step of DPTrainer on the GPU (noise 0, one logical batch of ``rows``): (the applied gradient on the
    host, the head calls seen)."""
    capture = FirstStep()
    calls = HeadCalls(model)
    privacy = PrivacyArguments(noise_multiplier=0.0, per_sample_max_grad_norm=clip, poisson_sampling=False,
                               grad_sample_mode="flash_fuse", fused_head=fused_head)
    args.setdefault("per_device_train_batch_size", len(rows))
    trainer = make_trainer(model, rows, tmp_path, privacy, callbacks=[capture], use_cpu=False, **args)
    trainer.train()
    return {n: g.double().cpu() for n, g in capture.grads.items()}, calls.seen, trainer


def test_auto_fuses_at_the_threshold_and_both_paths_are_the_float64_oracle(tmp_path, no_tf32):
    rows = long_rows(ROWS, STEPS)
    reference, clip = cuda_oracle(rows)
    rtol, atol = TOLERANCES["tf32"]  # float32 on the GPU (tf32 off here): cuBLAS and attention sum in their order
    for fused, per_device in ((True, ROWS), (False, ROWS // 2)):  # ROWS·STEPS label positions fuse; half do not
        grads, seen, _ = cuda_step(long_llama().cuda(), rows, tmp_path / str(fused), clip,
                                   per_device_train_batch_size=per_device, gradient_accumulation_steps=ROWS // per_device)
        assert seen == (set() if fused else {("unfused", ROWS // 2 * STEPS)}), seen
        for name, ref in reference.items():
            torch.testing.assert_close(grads[name], ref, rtol=rtol, atol=atol, msg=f"fused={fused} {name}")


def _relative_error(grads, reference):
    num = sum((grads[n] - ref).square().sum() for n, ref in reference.items())
    return float(num.sqrt() / sum(ref.square().sum() for ref in reference.values()).sqrt())


def test_bf16_fused_step_is_as_close_to_float64_as_the_unfused(tmp_path):
    """bf16 weights (autocast off): the fused DP step's relative error against the float64 oracle is at most twice
    the unfused DP step's (the model's own bf16 logits), and both are bf16-sized."""
    rows = long_rows(ROWS, STEPS)
    reference, clip = cuda_oracle(rows)
    errors = {}
    for setting in ("auto", "off"):
        grads, seen, _ = cuda_step(long_llama().to("cuda", torch.bfloat16), rows, tmp_path / setting, clip, setting)
        assert seen == (set() if setting == "auto" else {("unfused", ROWS * STEPS)})
        errors[setting] = _relative_error(grads, reference)
    assert errors["off"] < 0.1, errors  # (a sanity bound: bf16-sized, not garbage)
    assert errors["auto"] <= 2 * errors["off"], errors


def test_one_sample_micro_batches_on_the_fused_head(tmp_path, no_tf32):
    """per_device_train_batch_size=1 on the fused head ("on"): from the second step on the one-sample path (hooks
    parked: one ordinary backward through the head's kernels, the gradient clipped whole); the same row every step
    (lr 0), each step the float64 oracle's."""
    from tests.integrations.test_transformers_fused_head import EveryStep

    row = long_rows(1, AUTO_MIN_FUSED_TOKENS // 4)
    reference, clip = cuda_oracle(row)
    rows = Rows(**{k: v.expand(3, -1).clone() for k, v in row.columns.items()})
    steps = EveryStep()
    trainer = make_trainer(long_llama().cuda(), rows, tmp_path, PrivacyArguments(
        noise_multiplier=0.0, per_sample_max_grad_norm=clip, poisson_sampling=False, grad_sample_mode="flash_fuse",
        fused_head="on"), callbacks=[steps], per_device_train_batch_size=1, max_steps=3, learning_rate=0.0,
        use_cpu=False)
    steps.trainer = trainer
    trainer.train()
    assert trainer.fused_model is not None and steps.parked == [False, True, True]
    rtol, atol = TOLERANCES["tf32"]
    for grads in steps.grads:
        for name, ref in reference.items():
            torch.testing.assert_close(grads[name].double().cpu(), ref, rtol=rtol, atol=atol, msg=name)
