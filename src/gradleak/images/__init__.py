"""The image modality: image classifiers trained on pixels.

Importing it registers its data sources (``data.SOURCES``), models (``models.MODELS``) and the
metadata of a saved update (``modality.METADATA``); its
input spec is ``ImageSpec``. Found through the ``gradleak.modalities`` entry point ``images``.
"""

from gradleak.images import models as _models  # noqa: F401  (registers the built-in models)
from gradleak.images import render as _render  # noqa: F401  (registers the renderer)
from gradleak.images import saved as _saved  # noqa: F401  (registers the metadata of a saved update)
from gradleak.images import sources as _sources  # noqa: F401  (registers the data sources)
from gradleak.images.spec import ImageSpec

__all__ = ["ImageSpec"]
