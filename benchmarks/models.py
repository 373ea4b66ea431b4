"""The end-to-end workloads: plain ``nn.Module``s whose every trainable layer has a FlashNorm rule.

* ``linear``  — 8 × ``Linear(1024, 1024)`` with ReLU between; the last Linear is the head of a
  1024-class token-level cross-entropy. Input ``x: [B, T, 1024]`` float32.
* ``gpt2``    — GPT-2-small shape: 12 layers × 768, 12 heads, vocab 50257, learned positions
  (``nn.Embedding`` sized to the run's T), pre-LayerNorm blocks, causal SDPA attention, GELU MLP,
  untied LM head. Input ``ids: [B, T]`` int64.
* ``llama1b`` — Llama shape, ≈0.95 B parameters: 16 layers × 2048, 32 heads (MHA), SwiGLU MLP
  (5632), ``nn.RMSNorm``, RoPE (a buffer, not a parameter), vocab 32000, untied LM head.

Hugging Face's own classes, as users fine-tune them (random weights from a config, no download):

* ``hf_gpt2_tied``      — ``GPT2LMHeadModel``, GPT-2 small (12 × 768, 12 heads, vocab 50257), ``lm_head``
  tied to ``wte``, SDPA attention, dropout 0, ``n_positions = max(1024, T)``.
* ``hf_gpt2_tied_ckpt`` — the same with ``gradient_checkpointing_enable`` (non-reentrant): each block's
  activations are recomputed in the backward. ``hf_gpt2_tied_ckpt_reentrant``: the reentrant flavour.
* ``hf_gpt2_host``      — the host-cost proxy: ``GPT2LMHeadModel`` of 12 layers of width 64 (4 heads, vocab 50257,
  tied), whose ops are so small that a step costs what the host spends issuing them (B = 8, T = 16, one thread),
  except the tied head's: at vocabulary 50257 its GEMMs, log-softmax and the DP noise on its 3.2 M weights are most
  of a step's CPU time.
* ``hf_gpt2_host_v512`` — the same with a vocabulary of 512: the head's arithmetic out of the way, a step is the
  host's issuing.
* ``hf_llama1b_tied``   — ``LlamaForCausalLM``, Llama-3.2-1B shape (16 × 2048, 32 heads, 8 KV heads,
  SwiGLU 8192, vocab 128256, ≈1.24 B parameters), ``lm_head`` tied to ``embed_tokens``, SDPA attention.

Their forward passes ``position_ids = arange(T)`` expanded to ``[B, T]`` explicitly in every mode (Opacus's
hooks need the batch dimension on every layer's input; HF's default positions are ``[1, T]``).

Every workload trains with token-level cross-entropy, the sequence being the privacy unit:
per-sample loss ℓ_b = mean_t CE(logits[b, t], y[b, t]). ``transformers`` is imported only by the ``hf_*``
workloads. ``smoke=True`` gives a tiny model of the same structure (CPU smoke runs, tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# -- linear --------------------------------------------------------------------------------------


class LinearStack(nn.Module):
    """``depth`` × Linear(width, width), ReLU between; output: logits over ``width`` classes."""

    def __init__(self, width: int = 1024, depth: int = 8):
        super().__init__()
        layers: List[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(width, width))
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# -- GPT-2 ---------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Fused QKV projection, causal ``scaled_dot_product_attention``, output projection."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class GPT2Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """GPT-2 with an untied LM head; ``forward(ids: [B, T]) -> logits: [B, T, vocab]``."""

    def __init__(self, vocab: int = 50257, d: int = 768, n_layer: int = 12, n_head: int = 12, max_t: int = 1024):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_t, d)
        self.h = nn.ModuleList(GPT2Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        # Positions as a contiguous [B, T]: every hooked layer sees the batch dimension (and Opacus's
        # embedding norm sampler .view()s its input).
        pos = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, t).contiguous()
        x = self.wte(ids) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# -- Llama ---------------------------------------------------------------------------------------


def _rope_tables(max_t: int, head_dim: int, base: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_t, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [T, head_dim]
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class LlamaBlock(nn.Module):
    def __init__(self, d: int, n_head: int, hidden: int, eps: float):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d, eps=eps)
        self.self_attn = LlamaAttention(d, n_head)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=eps)
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    """Llama-shaped decoder; ``forward(ids: [B, T]) -> logits: [B, T, vocab]``."""

    def __init__(self, vocab: int = 32000, d: int = 2048, n_layer: int = 16, n_head: int = 32,
                 hidden: int = 5632, max_t: int = 4096, eps: float = 1e-5):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaBlock(d, n_head, hidden, eps) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d, eps=eps)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        cos, sin = _rope_tables(max_t, d // n_head)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


# -- Hugging Face models ---------------------------------------------------------------------------


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM as a workload: ``forward(ids: [B, T]) -> logits: [B, T, vocab]``,
    with ``position_ids: [B, T]`` given explicitly and no KV cache."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, t).contiguous()
        return self.lm(input_ids=ids, position_ids=pos, use_cache=False).logits


def _hf_gpt2(max_t: int, smoke: bool, checkpointing: Optional[str] = None, table=None) -> nn.Module:
    """``checkpointing``: None, ``"non_reentrant"`` or ``"reentrant"`` (``torch.utils.checkpoint``'s flavours);
    ``table``: the sizes (`_HF_GPT2` by default)."""
    import transformers

    s = _size(table or _HF_GPT2, smoke)
    config = transformers.GPT2Config(
        vocab_size=s["vocab"], n_embd=s["d"], n_layer=s["n_layer"], n_head=s["n_head"],
        n_positions=max(s["n_positions"], max_t), tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, attn_implementation="sdpa", use_cache=False, bos_token_id=s["vocab"] - 1,
        eos_token_id=s["vocab"] - 1)
    lm = transformers.GPT2LMHeadModel(config)
    assert lm.lm_head.weight is lm.transformer.wte.weight
    if checkpointing is not None:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    return HFCausalLM(lm)


def _hf_llama(max_t: int, smoke: bool) -> nn.Module:
    import transformers

    s = _size(_HF_LLAMA, smoke)
    config = transformers.LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["hidden"], num_hidden_layers=s["n_layer"],
        num_attention_heads=s["n_head"], num_key_value_heads=s["n_kv"], max_position_embeddings=max(8192, max_t),
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="sdpa",
        use_cache=False)
    lm = transformers.LlamaForCausalLM(config)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    return HFCausalLM(lm)


# -- registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One benchmark workload.

    Attributes:
        name: CLI name.
        shapes: the (B, T) grid of the full-size runs.
        build: ``build(max_t, smoke) -> nn.Module`` (called under ``torch.device(...)``).
        classes: ``classes(smoke)`` → number of classes / vocabulary of the token-level CE.
        token_input: ``True`` when the input is token ids, else features of width ``classes``.
        smoke_shape: the (B, T) of the smoke run.
        linears: ``linears(smoke)`` → (d, p) of every Linear (a tied head once), for the cost model.
        attention: ``attention(smoke)`` → (layers, d) of causal attention, for the cost model.
        recompute: the backward recomputes the forward (activation checkpointing), for the cost model.
        imports: modules the build imports (the runner's fork server loads them once).
    """

    name: str
    shapes: Tuple[Tuple[int, int], ...]
    build: Callable[[int, bool], nn.Module]
    classes: Callable[[bool], int]
    token_input: bool
    smoke_shape: Tuple[int, int]
    linears: Callable[[bool], List[Tuple[int, int]]]
    attention: Callable[[bool], Tuple[int, int]]
    recompute: bool = False
    imports: Tuple[str, ...] = ()


_LINEAR = dict(full=dict(width=1024, depth=8), smoke=dict(width=32, depth=2))
_GPT2 = dict(full=dict(vocab=50257, d=768, n_layer=12, n_head=12), smoke=dict(vocab=97, d=64, n_layer=2, n_head=2))
_LLAMA = dict(full=dict(vocab=32000, d=2048, n_layer=16, n_head=32, hidden=5632),
              smoke=dict(vocab=97, d=64, n_layer=2, n_head=4, hidden=176))


_HF_GPT2 = dict(full=dict(vocab=50257, d=768, n_layer=12, n_head=12, n_positions=1024),
               smoke=dict(vocab=97, d=64, n_layer=2, n_head=2, n_positions=32))
_HF_LLAMA = dict(full=dict(vocab=128256, d=2048, n_layer=16, n_head=32, n_kv=8, hidden=8192),
                 smoke=dict(vocab=97, d=64, n_layer=2, n_head=4, n_kv=2, hidden=176))
_HF_GPT2_HOST = dict(full=dict(vocab=50257, d=64, n_layer=12, n_head=4, n_positions=64),
                    smoke=dict(vocab=97, d=64, n_layer=2, n_head=2, n_positions=32))
_HF_GPT2_HOST_V512 = dict(full=dict(_HF_GPT2_HOST["full"], vocab=512), smoke=_HF_GPT2_HOST["smoke"])
_HF_GPT2_IMPORTS = ("transformers", "transformers.models.gpt2.modeling_gpt2")


def _size(table, smoke):
    return table["smoke" if smoke else "full"]


def _gpt2_linears(smoke, table=_GPT2):
    s = _size(table, smoke)
    d = s["d"]
    return [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * s["n_layer"] + [(d, s["vocab"])]


def _llama_linears(smoke):
    s = _size(_LLAMA, smoke)
    d, h = s["d"], s["hidden"]
    return [(d, d)] * 4 * s["n_layer"] + [(d, h), (d, h), (h, d)] * s["n_layer"] + [(d, s["vocab"])]


def _hf_llama_linears(smoke):
    s = _size(_HF_LLAMA, smoke)
    d, h, kv = s["d"], s["hidden"], s["d"] * s["n_kv"] // s["n_head"]
    attn = [(d, d), (d, kv), (d, kv), (d, d)]
    return (attn + [(d, h), (d, h), (h, d)]) * s["n_layer"] + [(d, s["vocab"])]


def _hf_gpt2_workload(name: str, shapes, checkpointing: Optional[str] = None, table=_HF_GPT2) -> Workload:
    return Workload(
        name,
        shapes=shapes,
        build=lambda max_t, smoke: _hf_gpt2(max_t, smoke, checkpointing, table),
        classes=lambda smoke: _size(table, smoke)["vocab"],
        token_input=True,
        smoke_shape=(2, 32),
        linears=lambda smoke: _gpt2_linears(smoke, table),
        attention=lambda smoke: (_size(table, smoke)["n_layer"], _size(table, smoke)["d"]),
        recompute=checkpointing is not None,
        imports=_HF_GPT2_IMPORTS,
    )


WORKLOADS: Dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "linear",
            shapes=tuple((b, t) for b in (1, 4) for t in (4096, 16384, 65536, 262144)),
            build=lambda max_t, smoke: LinearStack(**_size(_LINEAR, smoke)),
            classes=lambda smoke: _size(_LINEAR, smoke)["width"],
            token_input=False,
            smoke_shape=(2, 64),
            linears=lambda smoke: [(_size(_LINEAR, smoke)["width"],) * 2] * _size(_LINEAR, smoke)["depth"],
            attention=lambda smoke: (0, 0),
        ),
        Workload(
            "gpt2",
            shapes=((1, 1024), (1, 4096), (1, 16384), (1, 32768), (8, 1024)),
            build=lambda max_t, smoke: GPT2(max_t=max_t, **_size(_GPT2, smoke)),
            classes=lambda smoke: _size(_GPT2, smoke)["vocab"],
            token_input=True,
            smoke_shape=(2, 32),
            linears=_gpt2_linears,
            attention=lambda smoke: (_size(_GPT2, smoke)["n_layer"], _size(_GPT2, smoke)["d"]),
        ),
        Workload(
            "llama1b",
            shapes=((4, 4096),),
            build=lambda max_t, smoke: Llama(max_t=max_t, **_size(_LLAMA, smoke)),
            classes=lambda smoke: _size(_LLAMA, smoke)["vocab"],
            token_input=True,
            smoke_shape=(2, 32),
            linears=_llama_linears,
            attention=lambda smoke: (_size(_LLAMA, smoke)["n_layer"], _size(_LLAMA, smoke)["d"]),
        ),
        _hf_gpt2_workload("hf_gpt2_tied", ((8, 1024), (1, 4096))),
        _hf_gpt2_workload("hf_gpt2_tied_ckpt", ((1, 16384),), "non_reentrant"),
        _hf_gpt2_workload("hf_gpt2_tied_ckpt_reentrant", ((1, 16384),), "reentrant"),
        _hf_gpt2_workload("hf_gpt2_host", ((8, 16),), table=_HF_GPT2_HOST),
        _hf_gpt2_workload("hf_gpt2_host_v512", ((8, 16),), table=_HF_GPT2_HOST_V512),
        Workload(
            "hf_llama1b_tied",
            shapes=((2, 4096),),
            build=_hf_llama,
            classes=lambda smoke: _size(_HF_LLAMA, smoke)["vocab"],
            token_input=True,
            smoke_shape=(2, 32),
            linears=_hf_llama_linears,
            attention=lambda smoke: (_size(_HF_LLAMA, smoke)["n_layer"], _size(_HF_LLAMA, smoke)["d"]),
            imports=("transformers", "transformers.models.llama.modeling_llama"),
        ),
    )
}


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style: N(0, 0.02) weights for Linear and Embedding, zero biases (norm layers keep theirs)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def build_model(name: str, *, seq_len: int, smoke: bool, device: torch.device) -> nn.Module:
    """The workload's model on ``device`` (parameters created there: no CPU initialisation of 1 B weights)."""
    workload = get_workload(name)
    with torch.device(device):
        model = workload.build(seq_len, smoke)
        if isinstance(model, (GPT2, Llama)):  # Hugging Face's models initialise themselves from their config
            model.apply(_init_weights)
    return model.train()


def make_batch(name: str, *, batch: int, seq_len: int, smoke: bool, device: torch.device,
               seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): inputs ``[B, T]`` ids or ``[B, T, width]`` features, targets ``[B, T]`` class ids."""
    workload = get_workload(name)
    classes = workload.classes(smoke)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    targets = torch.randint(classes, (batch, seq_len), generator=gen)
    if workload.token_input:
        inputs = torch.randint(classes, (batch, seq_len), generator=gen)
    else:
        inputs = torch.randn(batch, seq_len, classes, generator=gen) if batch * seq_len * classes <= 1 << 24 else None
        if inputs is None:  # large: draw on the device (CPU randn of 1 G floats takes seconds)
            dev_gen = torch.Generator(device=device).manual_seed(seed)
            return torch.randn(batch, seq_len, classes, generator=dev_gen, device=device), targets.to(device)
    return inputs.to(device), targets.to(device)


def get_workload(name: str) -> Workload:
    """The workload called ``name``; the error lists the valid names."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"Unknown workload {name!r}. Valid workloads: {', '.join(WORKLOADS)}.") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def step_flops(name: str, *, batch: int, seq_len: int, smoke: bool = False) -> float:
    """Model FLOPs of one non-private training step: 6·N·Σ d·p for the Linears (N = B·T tokens) plus causal
    attention (4·B·T²·d per layer forward, ×0.5 causal, ×3.5 forward + backward); activation checkpointing
    runs the forward twice (8·N·Σ d·p, ×4.5). Used by the cost model."""
    workload = get_workload(name)
    tokens = batch * seq_len
    extra = 1.0 if workload.recompute else 0.0  # one more forward
    linear = (6.0 + 2.0 * extra) * tokens * sum(d * p for d, p in workload.linears(smoke))
    layers, d = workload.attention(smoke)
    attention = (3.5 + extra) * 0.5 * 4.0 * batch * seq_len**2 * d * layers
    return linear + attention


__all__ = [
    "LinearStack", "GPT2", "Llama", "HFCausalLM", "Workload", "WORKLOADS", "build_model", "make_batch", "get_workload",
    "count_parameters", "step_flops",
]
