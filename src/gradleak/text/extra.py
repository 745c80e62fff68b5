"""The text modality's optional packages (the ``text`` extra): imported only when text is used, so
that the image path and ``gradleak --help`` never load transformers (5-7 s)."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from gradleak.errors import ConfigError

# What the text extra installs, by the module each one is imported as.
PACKAGES = {
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "peft": "peft",
    "rouge_score": "rouge-score",
    "faker": "faker",
}
PIP = "pip install -c constraints.txt 'gradleak[text]'"


def require(module: str, key: str = "data.source") -> ModuleType:
    """Import ``module`` of the text extra, or fail with one line naming the pip command."""
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        raise ConfigError(
            key, f"text needs {PACKAGES.get(top, top)}, which is not installed: {PIP}"
        )
    return importlib.import_module(module)
