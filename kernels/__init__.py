"""Hand-written GPU kernels, importable as `golf.kernels` (the folder sits at the repo top level)."""
