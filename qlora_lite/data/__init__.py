"""qlora_lite.data."""
