"""qlora_lite.config."""
