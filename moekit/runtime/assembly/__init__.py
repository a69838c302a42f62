"""How a composed model is assembled on its base: the config, the model classes that swap routed modules into the
dense model, what a forward returns, the check of a checkpoint's tensors, and the files that load it by path."""
