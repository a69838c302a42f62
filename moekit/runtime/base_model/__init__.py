"""The base model as transformers builds it, read off the model itself: its class and dtype, where it keeps its
blocks and FFNs, how each FFN computes, and the name its release gives the KV cache argument."""
