"""Branch-Train-Stitch: the frozen expert streams run block by block beside the hub, and the stitch layers that
exchange hidden states between them."""
