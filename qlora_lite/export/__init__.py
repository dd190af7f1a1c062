"""qlora_lite.export."""
