"""Per-architecture access to the first two transformer blocks, evaluated at the global weights.

DAGER tests candidate states against the input spans of linear layers. Three states are used:

- ``layer1``: every token's normalised input to block 0 (its q/k/v read it);
- ``ffn``: block 0's feed-forward input, after attention has mixed the sequence (the first
  feed-forward weight reads it);
- ``layer2``: block 1's normalised input (its q/k/v read it), as in DAGER's decoder attack.

Decoders use layer1 and layer2, with ffn as a cheaper prefilter (it skips the MLP). Encoders use
layer1 and ffn: in a classifier only the [CLS] position of the last block matters, so in a
two-block model the last block's q/k/v gradients span one mixture per head, not the tokens,
whereas block 0's feed-forward input is spanned token by token whenever there are two blocks or
more.

Each adapter is built from small copies of the model's own sub-modules loaded with
``global_state``. Attention itself is computed by the caller: transformers 5.x changed the call
signature of whole blocks (``cache`` replaced ``layer_past``), whereas norms, linear layers and
MLPs keep a plain ``forward(x)``, so only those are called. Adapters are chosen by
``config.model_type`` from ``ADAPTERS``; add one to support a new family.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["Architecture", "AffineEmbedding", "Projection", "Stage", "ADAPTERS", "architecture_for"]

Kind = Literal["decoder", "encoder"]
Stage = Literal["layer1", "ffn", "layer2"]


@dataclass(frozen=True)
class AffineEmbedding:
    """Layer-1 inputs of the form LayerNorm(table[t] + offset(p)), for a fast vocabulary scan.

    Attributes:
        table: (V, d) token embeddings.
        offsets: (P, d) per-position additive embedding (position, plus token type for BERT).
        gamma, beta, eps: the LayerNorm's parameters.
    """

    table: Tensor
    offsets: Tensor
    gamma: Tensor
    beta: Tensor
    eps: float


@dataclass(frozen=True)
class Projection:
    """A module reading a block's normalised input, located by its state-dict prefix.

    Attributes:
        prefix: the module's name in the model handed to ``recover`` (state-dict key prefix).
        weight_is_in_out: True for GPT-2's Conv1D, whose weight is (in, out).
        lora_rank: r when peft wrapped the module with LoRA, else None.
        lora_adapter: the peft adapter name (``default``) when wrapped, else None.
    """

    prefix: str
    weight_is_in_out: bool
    lora_rank: int | None = None
    lora_adapter: str | None = None

    @property
    def weight_key(self) -> str:
        """State-dict key of the full weight (under ``base_layer`` when LoRA wraps it)."""
        return f"{self.prefix}.base_layer.weight" if self.lora_adapter else f"{self.prefix}.weight"

    def lora_key(self, which: Literal["A", "B"]) -> str:
        return f"{self.prefix}.lora_{which}.{self.lora_adapter}.weight"


class Architecture(ABC):
    """First two blocks of a transformer at the global weights (see module docstring).

    Shapes: ``n`` candidates, ``H`` heads, ``Hkv`` key/value heads, ``hd`` head size.
    """

    kind: Kind
    #: True when layer-1 inputs depend on the position (learned absolute positions).
    positional: bool

    def __init__(self, model: nn.Module, global_state: dict[str, Tensor]) -> None:
        self._top = model
        self._state = global_state
        self._names = {id(m): n for n, m in model.named_modules()}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = base.config
        self._base = base

    # --- what subclasses provide -------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def n_heads(self) -> int: ...

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    @abstractmethod
    def d_model(self) -> int: ...

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @abstractmethod
    def span_modules(self, stage: Stage) -> list[nn.Module]:
        """Modules reading the ``stage`` states (all of them read the same input)."""

    @abstractmethod
    def layer1_inputs(self, tokens: Tensor, position: int) -> tuple[Tensor, Tensor]:
        """(residual stream, normalised input of block 0) for ``tokens`` at ``position``."""

    @abstractmethod
    def qkv(self, x: Tensor, position: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (n, H, hd), keys and values (n, Hkv, hd) of block 0, positions applied."""

    @abstractmethod
    def after_attention(self, residual: Tensor, x: Tensor, context: Tensor) -> Tensor:
        """Block 0's stream after attention, from its context (n, H * hd) and its inputs."""

    @abstractmethod
    def ffn_input(self, h: Tensor) -> Tensor:
        """The ``ffn`` state: block 0's feed-forward input, from ``after_attention``'s output."""

    def layer2_input(self, h: Tensor, z: Tensor) -> Tensor:
        """The ``layer2`` state from ``h`` and ``z = ffn_input(h)`` (decoders)."""
        raise NotImplementedError(f"{type(self).__name__} has no layer2 stage")

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def layer1_affine(self) -> AffineEmbedding | None:
        """The structure of ``layer1_inputs`` when it is LayerNorm(table + offset), else None."""
        return None

    # --- shared helpers -------------------------------------------------------------------------
    def projections(self, stage: Stage) -> list[Projection]:
        """The span sources of ``stage``, with their state-dict prefixes."""
        out = []
        for m in self.span_modules(stage):
            lora_a = getattr(m, "lora_A", None)
            base = getattr(m, "base_layer", m)
            if isinstance(lora_a, nn.ModuleDict) and len(lora_a) > 0:
                adapter, layer = next(iter(lora_a.items()))
                proj = Projection(
                    self._name(m), _is_conv1d(base), int(layer.weight.shape[0]), adapter
                )
            else:
                proj = Projection(self._name(m), _is_conv1d(base))
            out.append(proj)
        return out

    def tensor(self, key: str) -> Tensor:
        """A tensor of ``global_state`` (ValueError with the key when it is missing)."""
        try:
            return self._state[key]
        except KeyError as exc:
            raise ValueError(f"global_state lacks {key!r}") from exc

    def _name(self, module: nn.Module) -> str:
        return self._names[id(module)]

    def _local(self, module: nn.Module) -> nn.Module:
        """A copy of ``module`` in eval mode holding the global weights (the model is untouched)."""
        prefix = self._name(module) + "."
        sub = {k[len(prefix) :]: v for k, v in self._state.items() if k.startswith(prefix)}
        local = copy.deepcopy(module).eval()
        missing, _ = local.load_state_dict(sub, strict=False)
        persistent = set(local.state_dict().keys())
        missing = [k for k in missing if k in persistent]
        if missing:
            raise ValueError(
                f"global_state lacks {prefix}{missing[0]} (and {len(missing) - 1} more)"
            )
        for p in local.parameters():
            p.requires_grad_(False)
        return local

    def _embedding(self, module: nn.Module) -> Tensor:
        return self.tensor(self._name(module) + ".weight").detach()


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores its weight as (in, out); detect it without importing it.
    return type(module).__name__ == "Conv1D"


def _attn_scale(attn: nn.Module, head_dim: int) -> float:
    scaling = getattr(attn, "scaling", None)
    return float(scaling) if scaling is not None else 1.0 / math.sqrt(head_dim)


class GPT2(Architecture):
    """GPT-2: learned absolute positions, pre-LN blocks, fused Conv1D ``c_attn``."""

    kind: Kind = "decoder"
    positional = True

    def __init__(self, model: nn.Module, global_state: dict[str, Tensor]) -> None:
        super().__init__(model, global_state)
        tr = getattr(self._base, "transformer", self._base)
        self._tr = tr
        self.wte = self._embedding(tr.wte)
        self.wpe = self._embedding(tr.wpe)
        b0 = tr.h[0]
        self.ln_1 = self._local(b0.ln_1)
        self.c_attn = self._local(b0.attn.c_attn)
        self.c_proj = self._local(b0.attn.c_proj)
        self.ln_2 = self._local(b0.ln_2)
        self.mlp = self._local(b0.mlp)
        self.ln_next = self._local(tr.h[1].ln_1)
        # scale_attn_by_inverse_layer_idx divides by layer_idx + 1, which is 1 for block 0.
        self._scale = _attn_scale(b0.attn, self.head_dim)
        if getattr(self.config, "scale_attn_by_inverse_layer_idx", False):
            self._scale = 1.0 / math.sqrt(self.head_dim)

    @property
    def vocab_size(self) -> int:
        return int(self.wte.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.config.n_head)

    @property
    def d_model(self) -> int:
        return int(self.wte.shape[1])

    @property
    def attn_scale(self) -> float:
        return self._scale

    def span_modules(self, stage: Stage) -> list[nn.Module]:
        h = self._tr.h
        return {"layer1": [h[0].attn.c_attn], "ffn": [h[0].mlp.c_fc], "layer2": [h[1].attn.c_attn]}[
            stage
        ]

    def layer1_inputs(self, tokens: Tensor, position: int) -> tuple[Tensor, Tensor]:
        e = self.wte[tokens] + self.wpe[position]
        return e, self.ln_1(e)

    def layer1_affine(self) -> AffineEmbedding | None:
        return _affine(self.wte, self.wpe, self.ln_1)

    def qkv(self, x: Tensor, position: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.c_attn(x).split(self.d_model, dim=-1)
        shape = (*x.shape[:-1], self.n_heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def after_attention(self, residual: Tensor, x: Tensor, context: Tensor) -> Tensor:
        return residual + self.c_proj(context)

    def ffn_input(self, h: Tensor) -> Tensor:
        return self.ln_2(h)

    def layer2_input(self, h: Tensor, z: Tensor) -> Tensor:
        return self.ln_next(h + self.mlp(z))


class Llama(Architecture):
    """LLaMA: rotary positions (layer 1 is position-free), RMSNorm, grouped-query attention."""

    kind: Kind = "decoder"
    positional = False

    def __init__(self, model: nn.Module, global_state: dict[str, Tensor]) -> None:
        super().__init__(model, global_state)
        inner = getattr(self._base, "model", self._base)
        self._inner = inner
        self.embed = self._embedding(inner.embed_tokens)
        l0 = inner.layers[0]
        self.norm_in = self._local(l0.input_layernorm)
        self.q_proj = self._local(l0.self_attn.q_proj)
        self.k_proj = self._local(l0.self_attn.k_proj)
        self.v_proj = self._local(l0.self_attn.v_proj)
        self.o_proj = self._local(l0.self_attn.o_proj)
        self.norm_post = self._local(l0.post_attention_layernorm)
        self.mlp = self._local(l0.mlp)
        self.norm_next = self._local(inner.layers[1].input_layernorm)
        self.rotary = copy.deepcopy(inner.rotary_emb).eval()
        self._hd = int(getattr(self.config, "head_dim", None) or self.d_model // self.n_heads)
        self._scale = _attn_scale(l0.self_attn, self._hd)

    @property
    def vocab_size(self) -> int:
        return int(self.embed.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.embed.shape[1])

    @property
    def head_dim(self) -> int:
        return self._hd

    @property
    def attn_scale(self) -> float:
        return self._scale

    def span_modules(self, stage: Stage) -> list[nn.Module]:
        if stage == "ffn":
            mlp = self._inner.layers[0].mlp
            return [mlp.gate_proj, mlp.up_proj]
        a = self._inner.layers[0 if stage == "layer1" else 1].self_attn
        return [a.q_proj, a.k_proj, a.v_proj]

    def layer1_inputs(self, tokens: Tensor, position: int) -> tuple[Tensor, Tensor]:
        e = self.embed[tokens]
        return e, self.norm_in(e)

    def qkv(self, x: Tensor, position: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lead = x.shape[:-1]
        q = self.q_proj(x).reshape(*lead, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(*lead, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(*lead, self.n_kv_heads, self.head_dim)
        pos = torch.as_tensor(position).reshape(1, -1)
        cos, sin = self.rotary(x, pos)  # (1, P, hd); P == 1 or matches lead[-1]
        cos, sin = cos[0].unsqueeze(-2), sin[0].unsqueeze(-2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def after_attention(self, residual: Tensor, x: Tensor, context: Tensor) -> Tensor:
        return residual + self.o_proj(context)

    def ffn_input(self, h: Tensor) -> Tensor:
        return self.norm_post(h)

    def layer2_input(self, h: Tensor, z: Tensor) -> Tensor:
        return self.norm_next(h + self.mlp(z))


def _affine(table: Tensor, offsets: Tensor, norm: nn.Module) -> AffineEmbedding | None:
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
        return None
    return AffineEmbedding(
        table, offsets, norm.weight.detach(), norm.bias.detach(), float(norm.eps)
    )


def _rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin


class Bert(Architecture):
    """BERT: learned positions, post-LN blocks, bidirectional attention (token type 0)."""

    kind: Kind = "encoder"
    positional = True

    def __init__(self, model: nn.Module, global_state: dict[str, Tensor]) -> None:
        super().__init__(model, global_state)
        bert = getattr(self._base, "bert", self._base)
        if getattr(self.config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        if self.config.num_hidden_layers < 2:
            raise ValueError("an encoder needs at least two blocks (see the module docstring)")
        self._bert = bert
        emb = bert.embeddings
        self.word = self._embedding(emb.word_embeddings)
        self.pos = self._embedding(emb.position_embeddings)
        self.type0 = self._embedding(emb.token_type_embeddings)[0]
        self.emb_ln = self._local(emb.LayerNorm)
        l0 = bert.encoder.layer[0]
        self.query = self._local(l0.attention.self.query)
        self.key = self._local(l0.attention.self.key)
        self.value = self._local(l0.attention.self.value)
        self.attn_out = self._local(l0.attention.output)
        self._scale = _attn_scale(l0.attention.self, self.head_dim)

    @property
    def vocab_size(self) -> int:
        return int(self.word.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def d_model(self) -> int:
        return int(self.word.shape[1])

    @property
    def attn_scale(self) -> float:
        return self._scale

    def span_modules(self, stage: Stage) -> list[nn.Module]:
        layer = self._bert.encoder.layer[0]
        if stage == "ffn":
            return [layer.intermediate.dense]
        if stage == "layer1":
            a = layer.attention.self
            return [a.query, a.key, a.value]
        raise ValueError("encoders use the layer1 and ffn stages")

    def layer1_inputs(self, tokens: Tensor, position: int) -> tuple[Tensor, Tensor]:
        x = self.emb_ln(self.word[tokens] + self.pos[position] + self.type0)
        return x, x

    def layer1_affine(self) -> AffineEmbedding | None:
        return _affine(self.word, self.pos + self.type0, self.emb_ln)

    def qkv(self, x: Tensor, position: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shape = (*x.shape[:-1], self.n_heads, self.head_dim)
        return (
            self.query(x).reshape(shape),
            self.key(x).reshape(shape),
            self.value(x).reshape(shape),
        )

    def after_attention(self, residual: Tensor, x: Tensor, context: Tensor) -> Tensor:
        return self.attn_out(context, x)  # post-LN: LayerNorm(dense(context) + x)

    def ffn_input(self, h: Tensor) -> Tensor:
        return h


ADAPTERS: dict[str, type[Architecture]] = {"gpt2": GPT2, "llama": Llama, "bert": Bert}


def architecture_for(model: nn.Module, global_state: dict[str, Tensor]) -> Architecture:
    """The adapter for ``model`` (a transformers model, optionally wrapped by peft)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    try:
        cls = ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {sorted(ADAPTERS)}"
        ) from None
    return cls(model, global_state)
