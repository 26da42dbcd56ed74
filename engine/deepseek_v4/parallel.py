"""How one process shares DeepSeek-V4 with its peers (as DeepSeek's inference code does).

With W ranks, rank r holds:
- routed experts [r*E/W, (r+1)*E/W) (expert parallel; gate and shared expert everywhere);
- attention heads and output groups [r*H/W, ...) and [r*g/W, ...), and indexer heads
  [r*C/W, ...) (tensor parallel): `wq_b`, `attn_sink`, `wo_a`, `indexer.wq_b` and
  `indexer.weights_proj` split their output rows, `wo_b` its input columns.
Partial results are summed with all_reduce: routed expert outputs, `wo_b` outputs and the
indexer's scores (before top-k, so every rank picks the same entries). The KV state is the
same on every rank (shared-KV MQA). W = 1 is the plain single-process model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # a torch.distributed process group; None = the default one

    def check_split(self, n: int, what: str) -> None:
        if n % self.world_size:
            raise ValueError(f"{n} {what} do not split over {self.world_size} ranks")

    def local(self, n: int) -> int:
        """This rank's share of n (heads, groups, experts)."""
        return n // self.world_size

    def owns_expert(self, expert: int, n_experts: int) -> bool:
        per = self.local(n_experts)
        return self.rank * per <= expert < (self.rank + 1) * per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks in place (a no-op for one rank)."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x
