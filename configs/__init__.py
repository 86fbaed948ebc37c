# marks configs/ as the hvbatch.configs package so the presets ship with the wheel
