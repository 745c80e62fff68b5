"""The text modality: language models fine-tuned on private text, and the exact recovery of the
clients' sentences from their updates.

Importing it registers its data sources (``data.SOURCES``: ``faker-text``, ``text-files``), models
(``models.MODELS``: ``gpt2``, ``llama``, ``bert``), the causal language-modelling task
(``modality.TASKS``), the renderer of text, the metadata of a saved update (``modality.METADATA``)
and the attacks (``attacks.ATTACKS``: ``dager``, ``tag``); its input spec is ``TextSpec``. Found
through the ``gradleak.modalities`` entry point ``text``. transformers, tokenizers, peft,
rouge-score and Faker (the ``text`` extra) are imported only when text is used.
"""

from gradleak.text import attacks as _attacks  # noqa: F401  (registers dager, token-set, tag)
from gradleak.text import models as _models  # noqa: F401  (registers the models)
from gradleak.text import render as _render  # noqa: F401  (registers the renderer)
from gradleak.text import saved as _saved  # noqa: F401  (registers the metadata of a saved update)
from gradleak.text import sources as _sources  # noqa: F401  (registers the data sources)
from gradleak.text import tasks as _tasks  # noqa: F401  (registers causal-lm)
from gradleak.text.spec import TextSpec
from gradleak.text.vocabulary import Vocabulary

__all__ = ["TextSpec", "Vocabulary"]
