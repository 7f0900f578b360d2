"""colengine: late-interaction (ColBERT-style) retrieval."""
__version__ = "0.1.0"
