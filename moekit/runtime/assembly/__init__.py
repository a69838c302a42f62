"""How a composed model is assembled from its base model's own config: the config, where the base keeps its
blocks and FFNs, the model classes that swap routed modules in, and the files a checkpoint carries to load by path."""
