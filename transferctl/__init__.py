"""transferctl: pretrain an encoder, fine-tune it on few labels, evaluate it."""

__version__ = "0.24.0"
