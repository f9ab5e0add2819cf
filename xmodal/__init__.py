"""xmodal: train, evaluate and serve cross-modal (image-text) embedding models."""

__version__ = "0.1.0"
