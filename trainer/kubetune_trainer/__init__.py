"""kubetune trainer: prepares data, fine-tunes, evaluates and serves one model."""

__version__ = "0.1.0"
