"""Token estimates for context budgeting, without a tokenizer.

Self-hosted models use many tokenizers and the proxy does not ship them, so the
estimate is a characters-per-token ratio. 4.0 fits English prose on common
BPE vocabularies; a calibration from the prompt_tokens that upstreams report
can build a per-model estimator with a different ratio.
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
        chars = len(msg.content) + sum(
            len(tc.name) + len(tc.arguments_json) for tc in msg.tool_calls
        )
        return math.ceil(chars / self.chars_per_token) + self.per_message_overhead


DEFAULT_ESTIMATOR = TokenEstimator()


def estimate_tokens(msg: common_pb2.Message) -> int:
    """The default estimate: 4 characters per token plus the per-message overhead."""
    return DEFAULT_ESTIMATOR.estimate(msg)
