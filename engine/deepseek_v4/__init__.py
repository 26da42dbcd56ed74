"""DeepSeek-V4 (Flash / Pro): config, model math, incremental state, checkpoint loading.

`config` is torch-free; the other modules import torch.
"""
