"""deft-mine: the DEFT embed → mine → report workflow for AOI images."""

__version__ = "0.1.0"
