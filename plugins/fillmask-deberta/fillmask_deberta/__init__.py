"""fillmask-deberta: the DeBERTa-v2/v3 encoder as a fillmask architecture plugin."""

from fillmask_deberta.encoder import DebertaEncoder

__all__ = ["DebertaEncoder"]
__version__ = "0.1.0"
