"""qlora_lite.memory."""
