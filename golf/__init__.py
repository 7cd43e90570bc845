"""golf: the Parameter Golf toolkit (data → model → train → quant → pack → eval → submit)."""

__version__ = "0.1.0"
