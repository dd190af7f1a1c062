"""qlora_lite.training."""
