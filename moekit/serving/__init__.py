"""Serving composed and exported checkpoints with vLLM: its plugin (`vllm_plugin`) and `moekit serve` (`server`)."""
