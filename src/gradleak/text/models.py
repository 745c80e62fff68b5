"""Transformer language models from transformers: GPT-2- and LLaMA-style causal LMs (learned and
rotary positions) and BERT-style classifiers, built from a config (random init) or read from a
local directory (``config.json`` and ``model.safetensors``, read through gradleak's bounded reader
and handed to ``from_pretrained``; nothing is downloaded), optionally fine-tuned through LoRA
adapters (peft).

A model returns its logits tensor (a forward hook takes them out of transformers' output object),
so a classifier serves the core's classification task as it is and a causal LM the text task
``causal-lm``; state-dict names stay transformers' own, so an update saved by any transformers
training loop matches them. Dropout is 0 unless asked for: it makes the client's forward pass
random, and an exact attack then says "infeasible" (not evidence of privacy). Attention runs in
eager mode (an optimisation attack differentiates through it twice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from gradleak.errors import ConfigError
from gradleak.models.registry import MODELS
from gradleak.safeio import load_safetensors, read_file, read_json
from gradleak.text.extra import require

# The families, by transformers' model_type: the model class for each task, and LoRA's default
# target modules (the projections reading each block's input, which an exact attack reads too).
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": {"causal-lm": "GPT2LMHeadModel", "lora": ["c_attn"]},
    "llama": {"causal-lm": "LlamaForCausalLM", "lora": ["q_proj", "k_proj", "v_proj"]},
    "bert": {"classification": "BertForSequenceClassification", "lora": ["query", "key", "value"]},
}
DROPOUT_FIELDS = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "attention_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "summary_first_dropout",
)


def _logits(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: the logits tensor of transformers' output object."""
    return getattr(output, "logits", output)


def model_class(model_type: str, task: str) -> Any:
    """The transformers class of ``model_type`` for ``task``."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(
            "model.name",
            f"{model_type!r} models are not supported (supported: {', '.join(FAMILIES)})",
        )
    if task not in family:
        tasks = [t for t in family if t != "lora"]
        raise ConfigError(
            "data.task", f"{model_type} serves {', '.join(tasks)} here, not {task} (use data.task)"
        )
    return getattr(require("transformers", "model.name"), family[task])


def _config(model_type: str, **fields: Any) -> Any:
    tf = require("transformers", "model.name")
    return tf.AutoConfig.for_model(model_type, **fields)


def build(
    model_type: str,
    config: Any,
    *,
    task: str,
    state: dict | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: list[str] | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """A model of ``config`` (random init, or ``state``'s weights), dropout set, LoRA adapters
    added when ``lora_rank`` is given, returning logits."""
    for name in DROPOUT_FIELDS:
        if hasattr(config, name):
            setattr(config, name, dropout)
    cls = model_class(model_type, task)
    if state is None:
        model = cls(config)
    else:
        model = cls.from_pretrained(None, config=config, state_dict=state, local_files_only=True)
    model.set_attn_implementation("eager")
    if lora_rank is not None:
        peft = require("peft", "model.kwargs")
        lora = peft.LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
            target_modules=lora_targets or FAMILIES[model_type]["lora"],
            fan_in_fan_out=model_type == "gpt2",
            lora_dropout=dropout,
            modules_to_save=["classifier"] if task == "classification" else None,
        )
        model = peft.get_peft_model(model, lora)
    model.register_forward_hook(_logits)
    return model


def load_directory(directory: Path | str, *, task: str, **kwargs: Any) -> nn.Module:
    """A model saved by ``save_pretrained`` in ``directory``: ``config.json`` and
    ``model.safetensors`` (one file, no pickle), read with gradleak's bounded reader."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConfigError("model", f"{directory} has no config.json (a transformers model)")
    raw = read_json(directory / "config.json")
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str):
        raise ConfigError("model", f"{directory / 'config.json'} names no model_type")
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise ConfigError("model", f"{directory} has no model.safetensors")
    state, _ = load_safetensors(read_file(weights, kind="tensors"), weights)
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    model_class(model_type, task)  # the family and task are supported
    config = _config(model_type, **fields)
    return build(model_type, config, task=task, state=state, **kwargs)


def _make(
    model_type: str,
    fields: dict[str, Any],
    *,
    vocab_size: int,
    task: str,
    pretrained: str | None,
    **kwargs: Any,
) -> nn.Module:
    if pretrained is not None:
        model = load_directory(pretrained, task=task, **kwargs)
        have = model.get_input_embeddings().weight.shape[0]
        if have < vocab_size:
            raise ConfigError(
                "model.kwargs.pretrained",
                f"{pretrained} embeds {have} tokens but the tokenizer has {vocab_size}",
            )
        return model
    model_class(model_type, task)
    return build(
        model_type, _config(model_type, vocab_size=vocab_size, **fields), task=task, **kwargs
    )


@MODELS.register("gpt2")
def gpt2(
    vocab_size: int,
    seq_len: int,
    task: str,
    pad_token_id: int = 0,
    d_model: int = 256,
    layers: int = 2,
    heads: int | None = None,
    pretrained: str | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: list[str] | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """GPT-2 (learned positions, pre-LN blocks, tied embeddings): a causal LM of ``layers`` blocks
    of width ``d_model`` (``heads``: d_model / 64 by default), or ``pretrained``: a local
    directory."""
    fields = dict(
        n_embd=d_model,
        n_layer=layers,
        n_head=heads or max(1, d_model // 64),
        n_positions=max(seq_len, 16),
        bos_token_id=pad_token_id,
        eos_token_id=pad_token_id,
    )
    return _make(
        "gpt2",
        fields,
        vocab_size=vocab_size,
        task=task,
        pretrained=pretrained,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        dropout=dropout,
    )


@MODELS.register("llama")
def llama(
    vocab_size: int,
    seq_len: int,
    task: str,
    pad_token_id: int = 0,
    d_model: int = 256,
    layers: int = 2,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    pretrained: str | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: list[str] | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """LLaMA (rotary positions, RMSNorm, gated MLP, grouped-query attention: ``kv_heads``, half the
    heads by default): a causal LM, or ``pretrained``: a local directory."""
    h = heads or max(1, d_model // 64)
    fields = dict(
        hidden_size=d_model,
        intermediate_size=intermediate or 4 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=h,
        num_key_value_heads=kv_heads or max(1, h // 2),
        max_position_embeddings=max(seq_len, 16),
        bos_token_id=pad_token_id,
        eos_token_id=pad_token_id,
        pad_token_id=pad_token_id,
    )
    return _make(
        "llama",
        fields,
        vocab_size=vocab_size,
        task=task,
        pretrained=pretrained,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        dropout=dropout,
    )


@MODELS.register("bert")
def bert(
    vocab_size: int,
    seq_len: int,
    task: str,
    num_classes: int,
    pad_token_id: int = 0,
    d_model: int = 256,
    layers: int = 2,
    heads: int | None = None,
    pretrained: str | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: list[str] | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """BERT (learned positions, post-LN blocks, bidirectional): a sequence classifier of
    ``num_classes`` classes reading [CLS], or ``pretrained``: a local directory."""
    fields = dict(
        hidden_size=d_model,
        num_hidden_layers=layers,
        num_attention_heads=heads or max(1, d_model // 64),
        intermediate_size=4 * d_model,
        max_position_embeddings=max(seq_len, 16),
        num_labels=num_classes,
        pad_token_id=pad_token_id,
    )
    return _make(
        "bert",
        fields,
        vocab_size=vocab_size,
        task=task,
        pretrained=pretrained,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        dropout=dropout,
    )
