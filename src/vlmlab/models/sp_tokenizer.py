"""The SentencePiece tokenizer LLaVA-1.5 trained with, on transformers 5.

LLaVA-1.5 tokenised with transformers 4.x's slow `LlamaTokenizer` (`use_fast=False`): the
`sentencepiece` library itself, plus transformers' splitting on added tokens. transformers 5 has
no such path: its `LlamaTokenizer` runs BPE merges converted from `tokenizer.model`, which
differs from SentencePiece on repeated and leading spaces (`"a  b"`: SentencePiece
`▁a ▁ ▁b`, transformers 5 `▁a ▁▁ b`), so data with double spaces trains on other tokens.

`SentencePieceTokenizer` is transformers 4.37.2's slow `LlamaTokenizer` rebuilt on transformers
5's `SentencePieceBackend` (a `PreTrainedTokenizer`: save_pretrained, decode, padding, chat
templates and `LlavaProcessor` work as for any slow tokenizer). What 4.37 did and the base
class does not is ported here: the `legacy=False` prefix handling of `tokenize`, BOS/EOS from
`add_bos_token`/`add_eos_token`, SentencePiece decoding. Two additions: character offsets
(`return_offsets_mapping=True`, from SentencePiece's own offsets), which the label masking
needs and 4.37's slow tokenizers never offered, and `split_special_tokens` per call.
tests/test_sp_tokenizer.py compares ids with 4.37.2 itself, run in its own environment.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from transformers.tokenization_utils_base import BatchEncoding, TruncationStrategy
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

SPIECE_UNDERLINE = "▁"
# what tokenizer_config.json records so `llm.tokenizer.backend: auto` reloads a saved folder
# with this backend (transformers itself would convert tokenizer.model to BPE merges)
BACKEND_KEY = "backend"
BACKEND = "sentencepiece"

# one token: (piece, id, start, end), start/end character offsets into the encoded text
_Piece = tuple[str, int, int, int]


class SentencePieceTokenizer(SentencePieceBackend):  # type: ignore[misc]
    """transformers 4.37's slow `LlamaTokenizer`, token for token, with character offsets.

    `legacy` (None = True, as 4.37) and `add_bos_token`/`add_eos_token` mean what they meant
    there; they come from the folder's tokenizer_config.json unless `llm.tokenizer` sets them.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str | None = None,
        unk_token: Any = "<unk>",
        bos_token: Any = "<s>",
        eos_token: Any = "</s>",
        pad_token: Any = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool | None = None,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        if not vocab_file or not Path(vocab_file).is_file():
            raise ConfigError(
                "llm.tokenizer.name_or_path",
                f"the SentencePiece backend needs a tokenizer.model; got {vocab_file!r}.",
                "point it at a folder holding tokenizer.model, or set llm.tokenizer.backend=auto.",
            )
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self._unk_length: tuple[str, int] | None = None
        self._splitter: tuple[tuple[str, ...], re.Pattern[str] | None] | None = None
        kwargs.pop(BACKEND_KEY, None)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=self.add_bos_token,
            add_eos_token=self.add_eos_token,
            legacy=True if legacy is None else bool(legacy),  # 4.37: None means legacy
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    # ------------------------------------------------------------------ tokenising

    @property
    def unk_token_length(self) -> int:
        """Pieces of the unk token's text (4.37 strips that many after encoding unk + text)."""
        unk = str(self.unk_token)
        if self._unk_length is None or self._unk_length[0] != unk:
            self._unk_length = (unk, len(self.sp_model.encode(unk)))
        return self._unk_length[1]

    def tokenize(
        self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs: Any
    ) -> list[str]:
        """Pieces of `text` (added tokens split out unless `split_special_tokens`); as 4.37's,
        never BOS/EOS."""
        if pair is not None:
            raise NotImplementedError("tokenize one text at a time")
        split = kwargs.pop("split_special_tokens", self.split_special_tokens)
        return [piece for piece, *_ in self.pieces(text, split)]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [piece for piece, *_ in self._sp_pieces(text, 0)]

    def pieces(self, text: str, split_special_tokens: bool = False) -> list[_Piece]:
        """(piece, id, start, end) of each token: 4.37's `LlamaTokenizer.tokenize`.

        Not legacy: the text gets a `▁` in front (and `▁` in it becomes a space), and a lone
        leading `▁` before a special token is dropped. Offsets point into `text`; a lone
        dummy-prefix `▁` (no characters of its own) gets the character it stands before, as
        transformers' fast tokenizers give it, so it is a target exactly when that character is
        (LLaVA counts it with the text that follows).
        """
        if self.legacy or not text:
            out = self._split_added(text, split_special_tokens)
        else:
            prefixed = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
            out = self._split_added(prefixed, split_special_tokens)
            if (
                len(out) > 1
                and out[0][0] == SPIECE_UNDERLINE
                and out[1][0] in self.all_special_tokens
            ):
                out = out[1:]
            out = [(p, i, max(s - 1, 0), max(e - 1, 0)) for p, i, s, e in out]
        n = len(text)
        return [
            (p, i, s, s + 1) if s == e and s < n and p == SPIECE_UNDERLINE else (p, i, s, e)
            for p, i, s, e in out
        ]

    def _split_added(self, text: str, split_special_tokens: bool) -> list[_Piece]:
        """4.37's `PreTrainedTokenizer.tokenize`: split on added tokens, honour their
        lstrip/rstrip/single_word, SentencePiece on the rest."""
        added = self._added_tokens_encoder
        chunks: list[list[Any]] = []  # [text, start]
        if split_special_tokens:
            chunks = [[text, 0]]
        else:
            start = 0
            for part in self._split_on_added(text):
                chunks.append([part, start])
                start += len(part)
            for i in range(len(chunks)):
                token = chunks[i][0]
                if token not in added:
                    continue
                ext = self._added_tokens_decoder.get(added[token])
                left = chunks[i - 1] if i > 0 else None
                right = chunks[i + 1] if i < len(chunks) - 1 else None
                if ext is None:
                    continue
                if ext.rstrip and right and right[0]:
                    stripped = right[0].lstrip()
                    right[1] += len(right[0]) - len(stripped)
                    right[0] = stripped
                if ext.lstrip and left and left[0]:
                    left[0] = left[0].rstrip()
                if ext.single_word and left and left[0] and left[0][-1] != " ":
                    left[0] += token
                    chunks[i][0] = ""
                elif ext.single_word and right and right[0] and right[0][0] != " ":
                    right[0] = token + right[0]
                    right[1] -= len(token)
                    chunks[i][0] = ""
        out: list[_Piece] = []
        for chunk, start in chunks:
            if not chunk:
                continue
            if not split_special_tokens and chunk in added:
                out.append((chunk, added[chunk], start, start + len(chunk)))
            else:
                out += self._sp_pieces(chunk, start)
        return out

    def _split_on_added(self, text: str) -> list[str]:
        """transformers' `Trie.split` (the cut 4.37 made), by a regex when that cuts the same.

        Why: the trie walks the text in Python, character by character (a third of the time
        on conversation text). A regex alternation cuts identically when no added token occurs
        inside another or overlaps one (a proper suffix of one is a prefix of another), true
        of `<s>`, `</s>`, `<unk>`, `<image>`; otherwise the trie runs.
        """
        tokens = tuple(sorted(self._added_tokens_encoder, key=lambda t: (-len(t), t)))
        if self._splitter is None or self._splitter[0] != tokens:
            self._splitter = (tokens, _regex_if_unambiguous(tokens))
        pattern = self._splitter[1]
        if pattern is None:
            return list(self.tokens_trie.split(text))
        return [part for part in pattern.split(text) if part]

    def _sp_pieces(self, text: str, start: int) -> list[_Piece]:
        """4.37's `LlamaTokenizer._tokenize` with offsets: SentencePiece on one chunk; when not
        legacy and the chunk starts with a space, encode `unk + text` and drop the unk's pieces."""
        shift = 0
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            enc = self.sp_model.encode(text, return_type="offset_mapping")
            pieces, ids, offsets = enc["pieces"], enc["ids"], enc["offsets"]
        else:
            unk = str(self.unk_token)
            enc = self.sp_model.encode(unk + text, return_type="offset_mapping")
            pieces, ids, offsets = enc["pieces"], enc["ids"], enc["offsets"]
            drop = self.unk_token_length
            if len(pieces) >= drop:
                pieces, ids, offsets = pieces[drop:], ids[drop:], offsets[drop:]
            shift = len(unk)
        # byte fallback: SentencePiece gives the leading bytes of a character no width and the
        # last one the character; every byte gets the character's span (as transformers' fast
        # tokenizers do), so a byte of a reply is a target like the rest of the reply
        offsets = list(offsets)
        for k in range(len(offsets) - 2, -1, -1):
            s, e = offsets[k]
            if (
                s == e
                and offsets[k + 1][0] == s
                and self.sp_model.IsByte(ids[k])
                and self.sp_model.IsByte(ids[k + 1])
            ):
                offsets[k] = (s, offsets[k + 1][1])
        added = self._added_tokens_encoder
        if shift == 0:
            return [
                (p, added.get(p, i), start + s, start + e)
                for p, i, (s, e) in zip(pieces, ids, offsets)
            ]
        return [
            (p, added.get(p, i), start + max(s - shift, 0), start + max(e - shift, 0))
            for p, i, (s, e) in zip(pieces, ids, offsets)
        ]

    def _encode_plus(  # type: ignore[override]
        self, text: Any, text_pair: Any = None, **kwargs: Any
    ) -> BatchEncoding:
        """One string: ids (and `offset_mapping` when asked) from `pieces`; anything else
        (batches, pairs, pre-tokenised input) goes through transformers' slow path."""
        plain = (
            isinstance(text, str)
            and text_pair is None
            and not kwargs.get("is_split_into_words")
            and not kwargs.get("sanitize_control_tokens")
        )
        if not plain:
            if kwargs.get("return_offsets_mapping") and isinstance(text, str):
                raise NotImplementedError(
                    "offsets are given for one string (no pair, not pre-tokenised)"
                )
            return super()._encode_plus(text, text_pair, **kwargs)
        offsets_wanted = bool(kwargs.pop("return_offsets_mapping", False))
        split = kwargs.pop("split_special_tokens", self.split_special_tokens)
        truncation = kwargs.get("truncation_strategy", TruncationStrategy.DO_NOT_TRUNCATE)
        if offsets_wanted and truncation != TruncationStrategy.DO_NOT_TRUNCATE:
            raise NotImplementedError("offsets with truncation: truncate the ids yourself")
        pieces = self.pieces(text, split)
        add_special = kwargs.get("add_special_tokens", True)
        return_tensors = kwargs.get("return_tensors")
        padding = kwargs.get("padding_strategy")
        enc = self.prepare_for_model(
            [i for _, i, _, _ in pieces],
            add_special_tokens=add_special,
            padding=padding.value if padding is not None else False,
            truncation=truncation.value
            if isinstance(truncation, TruncationStrategy)
            else truncation,
            max_length=kwargs.get("max_length"),
            stride=kwargs.get("stride", 0),
            pad_to_multiple_of=kwargs.get("pad_to_multiple_of"),
            padding_side=kwargs.get("padding_side"),
            return_tensors=None,
            prepend_batch_axis=False,
            return_attention_mask=kwargs.get("return_attention_mask"),
            return_token_type_ids=kwargs.get("return_token_type_ids"),
            return_overflowing_tokens=kwargs.get("return_overflowing_tokens", False),
            return_special_tokens_mask=kwargs.get("return_special_tokens_mask", False),
            return_length=kwargs.get("return_length", False),
            verbose=kwargs.get("verbose", True),
        )
        if offsets_wanted:
            offsets = [(s, e) for _, _, s, e in pieces]
            if add_special:
                offsets = (
                    [(0, 0)] * int(self.add_bos_token)
                    + offsets
                    + [(0, 0)] * int(self.add_eos_token)
                )
            if len(offsets) != len(enc["input_ids"]):  # padding
                offsets += [(0, 0)] * (len(enc["input_ids"]) - len(offsets))
            enc["offset_mapping"] = offsets
        if return_tensors is not None:
            enc.convert_to_tensors(return_tensors, prepend_batch_axis=True)
        return enc

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """BOS/EOS as `add_bos_token`/`add_eos_token` say (4.37)."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out = out + bos + token_ids_1 + eos
        return out

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return list(
                super().get_special_tokens_mask(
                    token_ids_0, token_ids_1, already_has_special_tokens=True
                )
            )
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        out = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + [0] * len(token_ids_1) + eos
        return out

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return (int(self.add_bos_token) + int(self.add_eos_token)) * (2 if pair else 1)

    # ------------------------------------------------------------------ decoding, saving

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """4.37's: SentencePiece decodes the pieces between special tokens (bytes included)."""
        if not tokens:
            return ""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        special = set(self.all_special_tokens)
        current: list[str] = []
        out = ""
        prev_is_special = False
        for i, token in enumerate(tokens):
            if token in special:
                if not prev_is_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(current) + token
                prev_is_special = True
                current = []
            else:
                current.append(token)
                prev_is_special = False
        return out + self.sp_model.decode(current)

    def _decode(  # type: ignore[override]
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool = True,
        **kwargs: Any,
    ) -> str:
        """4.37's `PreTrainedTokenizer._decode`: tokens added beyond the model's vocabulary
        (`<image>`) are decoded on their own and joined with spaces, as LLaVA's outputs were."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        tokens = self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        special = set(self.all_special_tokens)
        added_beyond = (set(self._added_tokens_encoder) - special) | {
            t
            for t in self.extra_special_tokens
            if self._added_tokens_encoder.get(t, -1) >= self.vocab_size
        }
        sub_texts: list[str] = []
        current: list[str] = []
        for token in tokens:
            if token in added_beyond:
                if current:
                    string = self.convert_tokens_to_string(current)
                    if string:
                        sub_texts.append(string)
                    current = []
                sub_texts.append(token)
            else:
                current.append(token)
        if current:
            sub_texts.append(self.convert_tokens_to_string(current))
        text = (" " if spaces_between_special_tokens else "").join(sub_texts)
        clean = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        return str(self.clean_up_tokenization(text)) if clean else text

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """As transformers, plus what it leaves out of tokenizer_config.json for a slow Llama
        tokenizer: add_bos/eos_token, legacy, `backend: sentencepiece` (vlmlab reloads with this
        class) and `tokenizer_class: LlamaTokenizer` (transformers 4 loads the same tokenizer)."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config = Path(save_directory) / "tokenizer_config.json"
        if config.is_file():
            data = json.loads(config.read_text(encoding="utf-8"))
            data.update(
                add_bos_token=self.add_bos_token,
                add_eos_token=self.add_eos_token,
                legacy=bool(self.legacy),
                tokenizer_class="LlamaTokenizer",
            )
            data[BACKEND_KEY] = BACKEND
            config.write_text(
                json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                encoding="utf-8",
            )
        return files


def _regex_if_unambiguous(tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    """A splitting regex for `tokens` (longest first), or None when two of them overlap."""
    if not tokens or any(not t for t in tokens):
        return None
    for a in tokens:
        for b in tokens:
            if a != b and a in b:
                return None
            if any(b.startswith(a[k:]) for k in range(1, len(a))):
                return None
    return re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")")


def saved_with_sentencepiece(folder: str | Path) -> bool:
    """Whether `folder` holds a tokenizer saved by this backend (tokenizer_config.json)."""
    config = Path(folder) / "tokenizer_config.json"
    if not config.is_file() or not (Path(folder) / "tokenizer.model").is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get(BACKEND_KEY) == BACKEND
    except (OSError, ValueError):
        return False


def load_sentencepiece_tokenizer(path: str, **kwargs: Any) -> SentencePieceTokenizer:
    """`SentencePieceTokenizer` from a folder (or hub id) with tokenizer.model (+
    tokenizer_config.json, special_tokens_map.json); `kwargs` override the folder's settings."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "llm.tokenizer.backend",
            "is sentencepiece but the `sentencepiece` package is not installed.",
            "pip install sentencepiece (a vlmlab dependency: reinstall with the README's "
            "command), or set llm.tokenizer.backend=auto.",
        ) from err
    folder = Path(path)
    if folder.is_dir() and not (folder / "tokenizer.model").is_file():
        raise ConfigError(
            "llm.tokenizer.backend",
            f"is sentencepiece but {path} has no tokenizer.model.",
            "use the model's own tokenizer folder (with tokenizer.model), or set "
            "llm.tokenizer.backend=auto for a tokenizer.json-only folder.",
        )
    for key in ("use_fast", "trust_remote_code"):
        kwargs.pop(key, None)
    try:  # a hub id resolves as for any transformers tokenizer
        tokenizer = SentencePieceTokenizer.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ConfigError(
            "llm.tokenizer.name_or_path",
            f"{path!r}: no tokenizer.model could be loaded ({err}).",
            "give a local folder with tokenizer.model or a reachable hub id.",
        ) from err
    assert isinstance(tokenizer, SentencePieceTokenizer)
    return tokenizer
