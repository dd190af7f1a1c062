"""qlora_lite.doctor: is this machine ready to train? (`qlora-lite doctor`)

checks   the checks (GPU, driver, bitsandbytes' 4-bit kernels, bf16, attention, free memory, versions, the
         presets that fit), each through injectable probes so tests can fake a GPU, and the verdict
"""
