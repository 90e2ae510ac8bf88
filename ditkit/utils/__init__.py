"""The bottom utilities every layer may use: devices, atomic file I/O, run folders and checkpoint
discovery, the VAE, image files. They import nothing of ditkit but its configs."""
