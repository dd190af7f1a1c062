"""Adapters out and merged models out.

`adapter` writes and reads LoRA adapters in PEFT's format; `plan`, `merge` and `hf_dir` stream an adapter into
its base as a plain fp16/bf16 Hugging Face model dir (plan the output, compute each tensor, write the dir);
`verify` compares the merged model's logits with base + adapter. Nothing is imported here, so importing the
package stays cheap; import the module you need.
"""
