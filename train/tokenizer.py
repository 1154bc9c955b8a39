"""The text tokenizer: open_clip's CLIP BPE ids, a third of the time per text.

`ClipTokenizer` wraps ``open_clip.tokenizer.SimpleTokenizer(context_length=..., clean="lower")``
(the cleaning CLIP's checkpoints were trained with: ftfy, HTML unescaping, whitespace collapsed,
lower case). Plain text (printable ASCII, tabs and line breaks, no '&') takes a short path that
gives the same ids: on such text ftfy, HTML unescaping and the byte-to-unicode map change nothing,
so they are skipped, and ``clean="lower"`` reduces to collapsing whitespace and lower-casing.
Rows are assembled in numpy rather than one torch copy per row, and the last ``CACHED_TEXTS`` texts' rows are kept.

Of SimpleTokenizer it uses only these public attributes: ``encode`` (every text that is not plain),
``encoder`` (BPE piece -> id), ``bpe`` (word -> space-separated BPE pieces), ``pat`` (the word
regex), ``sot_token_id`` and ``eot_token_id``. open_clip_torch is pinned (setup.cfg), and
tests/train/test_data.py checks that the ids equal open_clip's own on plain and other text.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import torch

CACHED_TEXTS = 1 << 14
"""Texts whose ids are kept (least recently used out): captions and short subtitles repeat across clips and epochs;
a hit costs a dict lookup where encoding a short text costs ~15 us. About 3 MB a process when full."""
# Printable ASCII, tabs and line breaks, no '&': text that ftfy and HTML unescaping leave as it is.
PLAIN_TEXT = re.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")


class ClipTokenizer:
    """open_clip's CLIP tokenizer with the same ids in a third of the time per text: plain text (see
    `encode`) takes a short path, and rows are assembled in numpy rather than one torch copy per row."""

    def __init__(self, context_length: int):
        from open_clip.tokenizer import SimpleTokenizer

        self.base = SimpleTokenizer(context_length=context_length, clean="lower")
        self.context_length = context_length
        self._row = functools.lru_cache(maxsize=CACHED_TEXTS)(self._row_ids)

    def encode(self, text: str) -> list[int]:
        """open_clip's ids. On plain text (printable ASCII, tabs and line breaks, no '&') its ftfy
        and HTML passes and its byte-to-unicode map change nothing, and are skipped."""
        base = self.base
        if not PLAIN_TEXT.fullmatch(text):
            return base.encode(text)
        encoder, bpe, ids = base.encoder, base.bpe, []
        for word in base.pat.findall(" ".join(text.split()).lower()):
            if len(word) == 1:  # what bpe() returns for one character, uncached
                ids.append(encoder[word + "</w>"])
            else:
                ids += [encoder[piece] for piece in bpe(word).split(" ")]
        return ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Texts -> int64 [N, context_length]: <sot> ids <eot>, zero-padded; a long text is cut with
        <eot> kept as its last token, as open_clip does."""
        out = np.zeros((len(texts), self.context_length), np.int64)
        for row, text in zip(out, texts):
            ids = self._row(text)
            row[: len(ids)] = ids
        return torch.from_numpy(out)

    def _row_ids(self, text: str) -> tuple[int, ...]:
        base = self.base
        return (base.sot_token_id, *self.encode(text)[: self.context_length - 2], base.eot_token_id)


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int) -> ClipTokenizer:
    return ClipTokenizer(context_length)
