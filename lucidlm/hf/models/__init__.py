"""The built-in registry entries: ``transformers`` language models and torchvision's ViT.

Importing this package registers them (plain strings: neither library is imported here).
"""

from . import transformers_lm, torchvision_vit  # noqa: I001  (order = order of supported())

__all__ = ["transformers_lm", "torchvision_vit"]  # noqa: RUF022
