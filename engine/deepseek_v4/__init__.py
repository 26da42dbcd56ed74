"""DeepSeek-V4 (Flash / Pro), our own PyTorch implementation of shared/design/deepseek-v4.md.

- `config`: official config.json -> `ModelArgs` (torch-free).
- `attention`: window / CSA / HCA attention, compressor, lightning indexer, RoPE (math).
- `model`: MoE, mHC, blocks, `Transformer` (math; names = checkpoint names).
- `state`: `DSV4State` (incremental per-layer state, export/restore, nbytes) and the KV
  accounting of spec §3.
- `parallel`: `Parallel`, this rank's share of experts and heads.
- `weights`: `load_checkpoint(dir)`, strict, memory-mapped safetensors loading.
- FP8/FP4 formats and the QAT simulation live in `engine.fp8`.

Entry points: `load_checkpoint(dir, simulate=None, dtype=torch.float32, device="cpu",
parallel=Parallel())` -> `LoadedCheckpoint(args, model, ...)`; `model(tokens, state,
output="all"|"last"|"none")` -> fp32 logits, the `mini` Llama's calling convention.
Importing this package does not import torch; the submodules other than `config` do.
"""
