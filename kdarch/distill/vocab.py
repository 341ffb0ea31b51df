"""Vocabulary identity: teacher and student must share a tokenizer, though their embedding tables may differ
by padding rows (151,936 vs 152,064 in Qwen-style checkpoints).

A fingerprint hashes the token → id map itself (not a serialisation of the tokenizer), so two tokenizers
with the same vocabulary match whatever their file layout or normaliser flags, and any re-numbering or
extra real token changes it.
"""
from __future__ import annotations

import hashlib
import json


def vocab_fingerprint(token_to_id: dict[str, int]) -> str:
    """sha256 of the token → id map (sorted by id), as "sha256:<hex>"."""
    if not token_to_id:
        raise ValueError("vocab_fingerprint: expected a non-empty token -> id map")
    pairs = sorted(((int(i), str(t)) for t, i in token_to_id.items()))
    blob = json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()
