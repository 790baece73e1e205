"""Mask providers for :func:`models.attention.windowed`: anything with ``bias(layer, q_pos, k_pos) ->
(kv_heads, Q, K)``. :class:`HardMask` is an allocation's 0/-inf mask (:func:`models.window.hard_bias`),
:class:`SoftMask` the soft mask of learnable gates at one temperature (:func:`models.window.soft_bias`); as
``tau -> 0`` the soft one equals the hard mask of the exported allocation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from headkv.models import window as win


class MaskProvider(Protocol):
    def bias(self, layer: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Additive attention bias (kv_heads, Q, K) for one layer."""
        ...


class HardMask:
    """The hard mask of per-(layer, KV head) sink and window counts (long tensors (layers, KV heads)), within
    each layer's native cap (long (layers, KV heads), 0 = none; see :mod:`models.window`)."""

    def __init__(self, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None = None) -> None:
        self.sink, self.window, self.cap = sink, window, cap

    def bias(self, layer: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        cap = None if self.cap is None else self.cap[layer]
        return win.hard_bias(q_pos, k_pos, self.sink[layer], self.window[layer], torch.float32, cap)


@dataclass
class SoftMask:
    """A mask provider for ``models.attention.windowed``: the soft gate at one temperature."""

    sink: torch.Tensor  # (L, H) long, or float (learned sinks, may require grad)
    window: torch.Tensor  # (L, H) float, may require grad
    tau: float
    cap: torch.Tensor | None = None  # (L, H) long native windows (0: none), or None
    edge: str = "linear"  # models.window.edge: "linear" or "log"

    def bias(self, layer: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        cap = None if self.cap is None else self.cap[layer]
        return win.soft_bias(q_pos, k_pos, self.sink[layer], self.window[layer], self.tau, cap,
                             self.edge)  # (H, Q, K)
