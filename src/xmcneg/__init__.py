"""xmcneg: extreme multi-label classification with negative sampling."""
__version__ = "0.1.0"
