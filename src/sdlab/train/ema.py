"""Exponential moving average of the trainable parameters (Polyak averaging, as in LDM's LitEma).

    ema <- decay_t * ema + (1 - decay_t) * param,   decay_t = min(decay, (1 + n) / (10 + n))

where n counts the updates including this one (LitEma's ``forward`` increments ``num_updates`` before it
computes the decay, the warm-up of LDM's ``use_num_upates``: 2/11, 3/12, ... from the first update): early in
training the average follows the weights closely instead of being dominated by the initialisation. The
shadow copy is kept in float32 whatever the parameter dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """Shadow copies of ``named_params`` (name -> parameter), updated after each optimiser step."""

    def __init__(self, named_params: Mapping[str, nn.Parameter], decay: float):
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {k: p.detach().to(torch.float32).clone() for k, p in self.params.items()}
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay of the next update (module docstring)."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().to(torch.float32), 1.0 - d)
        self.num_updates += 1

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the parameters (for saving or previews)."""
        backup = {k: p.detach().clone() for k, p in self.params.items()}
        for k, p in self.params.items():
            p.copy_(self.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            for k, p in self.params.items():
                p.copy_(backup[k])

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        shadow: dict[str, Tensor] = state["shadow"]  # type: ignore[assignment]
        if set(shadow) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
            raise ValueError(f"EMA state does not match the parameters (missing {missing[:3]}, extra {extra[:3]})")
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.num_updates = int(state["num_updates"])  # type: ignore[arg-type]
