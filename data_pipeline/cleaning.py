"""Training-pair filters, each drop counted by reason for the manifest."""

from __future__ import annotations

import hashlib
from collections import Counter

from data_pipeline.config import CleaningConfig

REASONS = ("invalid_utf8", "empty", "too_long", "length_ratio", "duplicate")


class Cleaner:
    """Stateful filter over a stream of pairs (duplicates need memory: 16 bytes per kept pair)."""

    def __init__(self, config: CleaningConfig, monolingual: bool):
        self.config, self.monolingual = config, monolingual
        self.dropped: Counter[str] = Counter({reason: 0 for reason in REASONS})
        self.kept = 0
        self._seen: set[bytes] = set()

    def _reason(self, pair: tuple[str, str] | None) -> str | None:
        if pair is None:
            return "invalid_utf8"
        src, tgt = pair[0].strip(), pair[1].strip()
        if not src or (not self.monolingual and not tgt):
            return "empty"
        src_words, tgt_words = len(src.split()), len(tgt.split())
        if max(src_words, tgt_words) > self.config.max_words:
            return "too_long"
        if not self.monolingual and max(src_words, tgt_words) / min(src_words, tgt_words) > self.config.max_length_ratio:
            return "length_ratio"
        if self.config.deduplicate:
            key = hashlib.blake2b(f"{src}\t{tgt}".encode(), digest_size=16).digest()
            if key in self._seen:
                return "duplicate"
            self._seen.add(key)
        return None

    def keep(self, pair: tuple[str, str] | None) -> bool:
        reason = self._reason(pair)
        if reason is None:
            self.kept += 1
            return True
        self.dropped[reason] += 1
        return False

    def report(self) -> dict:
        return {"kept": self.kept, "dropped": dict(self.dropped)}
