"""Token estimates for context budgeting, without a tokenizer.

Self-hosted models use many tokenizers and the proxy does not ship them, so the
estimate is a characters-per-token ratio. 4.0 fits English prose on common
BPE vocabularies; a calibration from the prompt_tokens that upstreams report
can build a per-model estimator with a different ratio.

A calibration is smoothed (one odd prompt, code or another language, must not
swing every estimate) and kept within [0.5, 16] characters per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from threadline.v1 import common_pb2


@dataclass(frozen=True, slots=True)
class TokenEstimator:
    chars_per_token: float = 4.0
    #: Chat templates wrap every message in role markers and separators.
    per_message_overhead: int = 4

    def __post_init__(self) -> None:
        if not self.chars_per_token > 0:
            raise ValueError(f"chars_per_token must be positive, got {self.chars_per_token}")
        if self.per_message_overhead < 0:
            raise ValueError(f"per_message_overhead must be >= 0, got {self.per_message_overhead}")

    def estimate_text(self, text: str) -> int:
        return math.ceil(len(text) / self.chars_per_token)

    def estimate(self, msg: common_pb2.Message) -> int:
        chars = len(msg.content)
        # Called for every message of every context built: most have no tool calls,
        # and summing over none still costs a generator.
        if msg.tool_calls:
            chars += sum(len(tc.name) + len(tc.arguments_json) for tc in msg.tool_calls)
        return math.ceil(chars / self.chars_per_token) + self.per_message_overhead


DEFAULT_ESTIMATOR = TokenEstimator()

#: The range a calibrated ratio is kept within.
MIN_CHARS_PER_TOKEN = 0.5
MAX_CHARS_PER_TOKEN = 16.0


def calibrated_ratio(previous: float | None, prompt_chars: int, prompt_tokens: int) -> float:
    """A model's characters-per-token ratio after one more measured prompt.

    `previous` is its stored ratio (None before the first calibration);
    `prompt_chars` and `prompt_tokens` are positive. A first measurement is
    taken as it is, later ones count for a fifth.
    """
    measured = prompt_chars / prompt_tokens
    ratio = measured if previous is None else 0.8 * previous + 0.2 * measured
    return min(max(ratio, MIN_CHARS_PER_TOKEN), MAX_CHARS_PER_TOKEN)


def calibrated_estimator(ratio: float | None, default: TokenEstimator) -> TokenEstimator:
    """The estimator for a model whose stored ratio is `ratio`; `default` if it has none."""
    return TokenEstimator(chars_per_token=ratio) if ratio else default


def estimate_tokens(msg: common_pb2.Message) -> int:
    """The default estimate: 4 characters per token plus the per-message overhead."""
    return DEFAULT_ESTIMATOR.estimate(msg)
