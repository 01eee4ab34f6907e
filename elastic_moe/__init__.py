"""elastic-moe: once-for-all elastic MoE training on the ERNIE-4.5-MoE architecture."""

__version__ = "0.1.0"
