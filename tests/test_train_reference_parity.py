"""The training loop's schedules against the references they follow.

- the learning-rate multiplier equals diffusers' ``get_scheduler`` ("constant_with_warmup" / "cosine") step
  for step, warm-up included, and ``--min-lr-ratio`` is refused where no cosine reads it;
- the EMA's decay is LDM's ``LitEma`` (transcribed below) update for update;
- textual inversion does not drop captions unless asked to (diffusers' ``textual_inversion.py`` and A1111
  never do).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.optimization import get_scheduler

from sdlab.train.config import TrainConfig
from sdlab.train.ema import EMA
from sdlab.train.errors import TrainError
from sdlab.train.loop import lr_multiplier
from sdlab.train.unet_task import UNetTaskOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def _diffusers_lrs(name: str, warmup: int, steps: int) -> list[float]:
    """The multiplier diffusers' scheduler gives each optimiser step (the lr the step trains at / the peak)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("warmup", [0, 1, 4, 10])
@pytest.mark.parametrize("schedule, diffusers_name", [("cosine", "cosine"), ("constant", "constant_with_warmup")])
def test_lr_schedule_is_diffusers_get_scheduler(schedule, diffusers_name, warmup):
    cfg = TrainConfig(max_steps=10, warmup_steps=warmup, lr_schedule=schedule)
    ours = [lr_multiplier(s, cfg) for s in range(10)]
    assert ours == pytest.approx(_diffusers_lrs(diffusers_name, warmup, 10), abs=1e-12)
    if warmup:
        assert ours[0] == 0.0      # --warmup-steps 1 warms up too: step 0 trains at rate 0


def test_min_lr_ratio_lifts_the_cosine_floor_and_is_refused_without_a_cosine():
    cfg = TrainConfig(max_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    plain = _diffusers_lrs("cosine", 2, 10)
    assert [lr_multiplier(s, cfg) for s in range(10)] == pytest.approx(
        [p if s < 2 else 0.1 + 0.9 * p for s, p in enumerate(plain)], abs=1e-12)
    with pytest.raises(TrainError, match="--min-lr-ratio 0.1 is the floor of the cosine schedule"):
        TrainConfig(lr_schedule="constant", min_lr_ratio=0.1)


class LitEmaDecay:
    """CompVis/stable-diffusion ldm/modules/ema.py ``LitEma.forward``, its decay lines (use_num_upates=True)."""

    def __init__(self, decay: float):
        self.decay, self.num_updates = decay, 0

    def forward(self) -> float:
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return decay


def test_ema_decay_is_lit_ema_s():
    param = torch.nn.Parameter(torch.zeros(3))
    ema, reference = EMA({"p": param}, 0.9), LitEmaDecay(0.9)
    shadow = torch.zeros(3)
    for k in range(1, 100):              # the warm-up reaches 0.9 at update 80
        decay = reference.forward()
        assert ema.current_decay() == decay
        with torch.no_grad():
            param.fill_(float(k))
        ema.update()
        shadow = shadow - (1 - decay) * (shadow - param.detach())      # LitEma: shadow -= (1 - decay) (shadow - p)
        assert torch.allclose(ema.shadow["p"], shadow, rtol=1e-6)
    assert ema.current_decay() == 0.9


def test_textual_inversion_keeps_its_captions_unless_told():
    assert TrainConfig(task="embedding", embedding_word="zq").caption_dropout == 0.0
    assert UNetTaskOptions.from_config(TrainConfig(task="embedding", embedding_word="zq")).caption_dropout == 0.0
    assert TrainConfig(task="embedding", embedding_word="zq", caption_dropout=0.05).caption_dropout == 0.05
    assert TrainConfig(task="unet").caption_dropout == 0.1
    assert TrainConfig(task="lcd").caption_dropout == 0.0
