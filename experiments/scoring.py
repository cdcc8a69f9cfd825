"""Host-side scores of decodings: edit distance, character and word error rates."""

from __future__ import annotations

import numpy as np


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences (one DP row, on the host)."""
    row = np.arange(len(b) + 1)
    for i, x in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (x != y))
    return int(row[-1])


def error_rates(decoded, labels, label_lengths, space_id: int = 1) -> dict:
    """Character and word error rates of CTC decodings (host NumPy).

    `decoded` is a (labels, lengths) pair. Total edits over total reference characters
    (or words, split at `space_id`), corpus-level as speech toolkits report them; can
    exceed 1 (insertions).
    """
    def words(ids):
        return [w for w in bytes(np.asarray(ids, np.uint8)).split(bytes([space_id]))
                if w]

    edits = {"cer": 0, "wer": 0}
    totals = {"cer": 0, "wer": 0}
    for h, hl, r, rl in zip(*decoded, labels, label_lengths, strict=True):
        hyp, ref = h[:hl], r[:rl]
        edits["cer"] += edit_distance(hyp, ref)
        totals["cer"] += len(ref)
        edits["wer"] += edit_distance(words(hyp), words(ref))
        totals["wer"] += len(words(ref))
    return {k: edits[k] / max(totals[k], 1) for k in edits}
