"""The sampler's settings (docs/design.md §1.3), what they mean step by step, and named presets.

:class:`SampleSettings` is what one sampling call needs; :class:`SampleConfig` (the ``sample:``
section of a config and of a checkpoint's ``config.json``) adds the canvas and the seed. Every field
declares its help and allowed values once (:mod:`megamdm.options`): ``megamdm-sample``'s flags are made
from them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..options import bad_choices, choice, setting


@dataclass
class SampleSettings:
    """What one sampling call needs; :class:`SampleConfig` adds canvas and seed."""

    steps: int = setting(20, "sampling steps (forward passes, or two with guidance)")
    cfg: float = setting(5.0, "classifier-free guidance scale s: (1 + s) cond - s uncond; 0: no guidance")
    temperature: float = setting(1.0, "temperature of the token draw; 0: argmax")
    top_k: int = setting(0, "draw only among the k most likely tokens; 0: all")
    top_p: float = setting(1.0, "nucleus sampling: the smallest set of tokens holding this probability; 1: all")
    schedule: str = choice("shift", "cosine", help="how many masked tokens each step commits")
    shift: float = setting(3.0, "shift schedule: sigma(t) = s t / (1 + (s - 1) t); larger commits fewer tokens early")
    policy: str = choice(
        "gumbel",
        "maskgit",
        "stratified",
        help="which masked positions a step commits: top-n of log p + tau Gumbel, a draw in proportion to "
        "confidence, or a fixed spatially spread order",
    )
    gumbel_temperature: float = setting(1.0, "tau of the gumbel policy (and of maskgit's softmax draw)")
    edit_threshold: float = setting(
        0.0, "token editing: an unmasked token is overwritten where another one's probability exceeds this; <= 0: off"
    )
    cfg_interval: list[float] = setting([0.0, 1.0], "LO,HI: guidance only at steps k with LO <= k/steps < HI")
    # NL-Diffusion-Image's released sampler differs in these (docs/sampling.md "Presets")
    filter_order: str = choice(
        "temperature_first", "filter_first", help="filter_first: top-k / top-p on the untempered logits, then the temperature"
    )
    confidence: str = choice(
        "sampled",
        "raw",
        "untempered",
        help="a token's confidence: its probability as drawn; raw: under the untempered, unfiltered softmax; "
        "untempered: under the untempered, filtered one",
    )
    final_prediction: bool = setting(False, "with editing: after the last step every position takes that step's prediction")
    schedule_counts: str = choice(
        "megamdm", "nld", help="nld: NL-Diffusion-Image's rounding of the shift schedule (fp32, truncated, each step >= 1)"
    )
    maskgit_draw: str = choice(
        "confidence", "softmax", help="softmax: maskgit draws by softmax(confidence / gumbel_temperature)"
    )
    gumbel_temperature_schedule: str = choice(
        "constant",
        "linear",
        "cosine",
        "shift",
        "exp",
        help="the gumbel / maskgit temperature falls over the steps from gumbel_temperature to min_gumbel_temperature times it",
    )
    min_gumbel_temperature: float = setting(0.01, "where the temperature schedule ends, times gumbel_temperature")
    stratified_order: str = choice(
        "halton", "pmj", help="the stratified policy's order; pmj: the release's progressive multi-jittered order (seed 42)"
    )
    cfg_interval_rule: str = choice("megamdm", "nld", help="nld: guided at 1-based steps int(LO n) <= k <= int(HI n)")

    def validate(self) -> SampleSettings:
        """ValueError naming the setting and what is allowed (sampler calls pass settings directly)."""
        for name, value, allowed in bad_choices(self):
            raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.edit_threshold >= 1:
            raise ValueError(
                f"edit_threshold must be < 1 (a probability no token reaches would never edit), got {self.edit_threshold}; "
                "<= 0 turns editing off"
            )
        lo_hi = list(self.cfg_interval)
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
            raise ValueError(f"cfg_interval must be two fractions 0 <= lo <= hi <= 1 of the steps, got {lo_hi}")
        return self

    def guided(self, step: int) -> bool:
        """Whether step ``step`` (0-based) runs classifier-free guidance."""
        lo, hi = self.cfg_interval
        if self.cfg_interval_rule == "nld":
            return self.cfg > 0 and int(lo * self.steps) <= step + 1 <= int(hi * self.steps)
        return self.cfg != 0 and lo <= step / self.steps < hi

    def gumbel_temperature_at(self, step: int) -> float:
        """The Gumbel / maskgit-draw temperature of step ``step`` (0-based): ``gumbel_temperature`` times
        a factor that falls from 1 to ``min_gumbel_temperature`` over the steps (NL-Diffusion-Image's
        dynamic temperature), or 1 throughout (``constant``)."""
        kind, lo = self.gumbel_temperature_schedule, self.min_gumbel_temperature
        if kind == "constant":
            return self.gumbel_temperature
        t = step / (self.steps - 1) if self.steps > 1 else 0.0  # linspace(0, 1, steps)
        x = 1.0 - t
        if kind == "linear":
            f = x
        elif kind == "cosine":
            f = math.cos(math.pi * t / 2)
        elif kind == "shift":
            f = self.shift * x / (1 + (self.shift - 1) * x)
        else:  # exp
            f = min(max((1 - math.exp(-5 * x)) / (1 - math.exp(-5)), 1e-4), 1.0)
        return self.gumbel_temperature * (f * (1 - lo) + lo)

    @property
    def editing(self) -> bool:
        return self.edit_threshold > 0

    def settings(self) -> SampleSettings:
        """Just the sampling-call fields (a :class:`SampleConfig` without canvas and seed)."""
        return SampleSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SampleSettings)})

    def recorded(self) -> dict:
        """The settings as a PNG's metadata and a rerun's comparison record them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SampleSettings)}


@dataclass
class SampleConfig(SampleSettings):
    """The ``sample:`` section: a checkpoint's sampling defaults, canvas and seed included."""

    height: int = setting(256, "image height in pixels (a multiple of the image tokenizer's patch)")
    width: int = setting(256, "image width in pixels (a multiple of the image tokenizer's patch)")
    seed: int = setting(0, "image j of prompt i is drawn with seed + i * images_per_prompt + j")


# Named sets of sampler settings; a preset sets every field it names, the rest keep their defaults.
SAMPLE_PRESETS = {
    # NL-Diffusion-Image's released sampler (docs/sampling.md "Presets"); editing stays off unless asked for
    "nld": dict(
        steps=20,
        cfg=5.0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        schedule="shift",
        shift=3.0,
        policy="gumbel",
        gumbel_temperature=1.0,
        edit_threshold=0.0,
        cfg_interval=[0.0, 1.0],
        filter_order="filter_first",
        final_prediction=True,
        schedule_counts="nld",
        maskgit_draw="softmax",
        confidence="untempered",
        stratified_order="pmj",
        cfg_interval_rule="nld",
        gumbel_temperature_schedule="constant",  # the release's dynamic_temperature is off by default
    ),
}


def preset_settings(name: str) -> dict:
    """The settings of a sampler preset (:data:`SAMPLE_PRESETS`)."""
    if name not in SAMPLE_PRESETS:
        raise ValueError(f"unknown sampler preset {name!r}; allowed: {', '.join(SAMPLE_PRESETS)}")
    return {k: list(v) if isinstance(v, list) else v for k, v in SAMPLE_PRESETS[name].items()}
