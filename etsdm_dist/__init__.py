"""etsdm-dist: distributed E-TSDM diffusion training."""
__version__ = "0.1.0"
