"""DAGER: exact gradient inversion for transformer language models (Petrov et al., "DAGER: Exact
Gradient Inversion for Large Language Models", NeurIPS 2024).

A linear layer's weight gradient ``sum_t delta_t x_t^T`` spans its inputs ``x_t`` whenever the
batch has fewer tokens than the layer is wide, and the vocabulary is finite: every token (at every
position) is tested against the span of block 0's projections, then whole sequences against block
1's (decoders, position by position) or block 0's feed-forward input (encoders, by search).
Entry point: ``recover``. Needs torch only (the model is any transformers GPT-2, LLaMA or BERT,
optionally wrapped by peft, read through ``arch``'s adapters); the text modality's ``dager``
attack (``gradleak.text.attacks``) runs it on a server's view. Layout:

- ``api``: ``recover`` -> ``Result``; ``stage_span`` (gradient -> span of a layer's inputs);
- ``span``: float64 SVD basis, chunked distances, truncation, the explained-energy certificate;
- ``calibrate``: the widest log-gap threshold and the gap -> confidence map;
- ``arch``: adapters by ``config.model_type`` (gpt2, llama, bert; register more in ``ADAPTERS``);
- ``layer1``: the vocabulary scan per position; ``decoder``: extension with cached keys and
  values; ``encoder``: the encoder search; ``result``: ``Result`` and ``LayerReport``.
"""

from .api import recover, stage_span
from .result import LayerReport, Result
from .span import Span

__all__ = ["recover", "stage_span", "Result", "LayerReport", "Span"]
