"""qlora_lite.memory: predict the GPU memory of a QLoRA run and advise settings that fit.

Modules, each depending only on those above it (importing this package loads none of them):
  constants    byte units and bytes per dtype element
  settings     `RunSettings`: the run settings an estimate depends on, from the one config schema
  inventory    a model's config, linear layers, parameters and buffers (skeleton on the meta device)
  persistent   exact bytes of weights, adapters and optimizer state
  activations  what autograd keeps per layer, the loss's logits, and the working sets of each phase
  report       `estimate_memory` / `report_for`: the four phases of a step, the peak, `MemoryReport`
  advice       budgets, GPU names, the largest batch / longest sequence that fit, setting switches
  oom          the advice printed after a CUDA out-of-memory in training
  probe        `AllocationTracker`: live tensor bytes on the CPU, to check the activation model
"""
