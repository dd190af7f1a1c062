"""qlora_lite.model."""
