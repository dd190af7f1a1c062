"""Talking to a trained model: load base + adapter (quantized as trained) or a merged dir, and generate."""
