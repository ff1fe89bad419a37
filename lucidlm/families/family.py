""":class:`Family`: how one Hugging Face architecture's ``config.json`` maps onto
:class:`~lucidlm.config.Config` fields.

>>> toy = Family("ToyForCausalLM", "llama", traits=dict(mlp="glu"), defaults=dict(hidden_act="silu"))
>>> fields = toy.read({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
...                    "vocab_size": 100}, "toy config")
>>> fields["mlp"], fields["n_layer"], fields["activation"], fields["family"]
('glu', 2, 'silu', 'llama')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from .fields import NULLABLE, generic_fields

#: a reader: the family's own ``config.json`` keys -> Config fields
Reader = Callable[[dict[str, Any]], dict[str, Any]]

# a value of the wrong type (a string for a number, a number for a dict...) fails inside a reader's
# arithmetic as one of these: the message names the file and says what went wrong, not where
_WRONG_VALUE = (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError)


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face architecture: how its ``config.json`` maps onto :class:`~lucidlm.config.Config`.

    ``architecture``: ``architectures[0]`` in config.json; ``layout``: the weight-name layout
    (``checkpoints/layouts.py``, or one registered with :func:`lucidlm.register_family`);
    ``traits``: the Config fields every model of the family shares; ``defaults``: transformers'
    config-class defaults of the keys we read (a missing key means what it means there);
    ``readers``: functions ``config.json dict -> Config fields`` for the family's own keys;
    ``model_type``: its ``model_type`` (for a config.json that names no architecture).
    """

    architecture: str
    layout: str
    traits: dict[str, Any]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    readers: tuple[Reader, ...] = ()
    model_type: str | None = None

    def read(self, raw: dict[str, Any], source: str) -> dict[str, Any]:
        """The Config fields of ``raw`` (a config.json of this family, read from ``source``):
        the traits, then the generic keys, then the readers' fields, each winning over the one
        before; a key missing from ``raw`` takes the family's default. A bad value raises
        ConfigError naming ``source``."""
        hf = {**self.defaults, **raw}
        try:
            fields = {**self.traits, **generic_fields(hf, self.traits)}
            for reader in self.readers:
                fields.update(reader(hf))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        except _WRONG_VALUE as exc:
            raise ConfigError(f"{source}: a field has a value of the wrong type or range "
                              f"({type(exc).__name__}: {exc})") from exc
        fields = {k: v for k, v in fields.items() if v is not None or k in NULLABLE}
        fields.setdefault("family", self.layout)  # a reader may pick a layout variant (Falcon's norms)
        return fields
