"""qlora_lite.io."""
