"""qlora_lite.data: training records in, batches out.

`records` reads JSONL / JSON / hub records and detects their format, `chat` renders conversations through a
chat template, `encode` tokenizes records with loss masks into a `TokenizedDataset` (truncation, packing,
train/eval split), `batching` pads and collates examples and keeps the seeded batch order.
Nothing is imported here, so importing the package stays cheap.
"""
