"""qlora_lite.demo."""
