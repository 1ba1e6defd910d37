"""ModernBERT for fillmask: an encoder with local/global attention and unpadded execution."""

from fillmask_modernbert.encoder import ModernBertEncoder

__all__ = ["ModernBertEncoder"]
