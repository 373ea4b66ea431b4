"""FlashNorm."""
