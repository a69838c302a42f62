"""How routed tokens meet their experts' stacked `[E, out, in]` weights: the PyTorch reference paths and, beside
each, the Triton kernel that replaces it on CUDA."""
