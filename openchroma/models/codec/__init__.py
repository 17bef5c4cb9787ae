"""The Codec (Kyutai's Mimi): SEANet convolutions (:mod:`.seanet`), transformers (:mod:`.transformer`), the
split residual vector quantizer (:mod:`.quantizer`), streaming state (:mod:`.state`) and the model
(:mod:`.model`)."""

from .config import CodecConfig
from .model import Codec
from .state import CodecStreamState

__all__ = ["Codec", "CodecConfig", "CodecStreamState"]
