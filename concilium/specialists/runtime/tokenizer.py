"""Tokenizer and chat template, taken from the checkpoint itself (Hugging Face tokenizer files, or
the vocabulary, merges and `tokenizer.chat_template` stored in a GGUF file)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Used only when a checkpoint ships no chat template.
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TokenizerError(ValueError):
    pass


def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM) spell each byte as one printable
    character: printable Latin-1 bytes as themselves, the other 68 bytes as U+0100 onwards."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(0x100 + n): b for n, b in enumerate(moved)}


_BYTE_OF_CHAR = _byte_of_char()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


def _cache_dir() -> Path:
    return Path(os.environ.get("CONCILIUM_CACHE_DIR") or Path.home() / ".cache" / "concilium")


def _gguf_tokenizer(path: Path) -> Any:
    """Convert the vocabulary stored in a GGUF file (seconds), keeping the result in a cache keyed by
    the file's path, size and mtime so that later loads read a tokenizer.json (milliseconds)."""
    from transformers import AutoTokenizer

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = _cache_dir() / "tokenizers" / key
    if (cached / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:  # a damaged cache entry: convert again
            log.warning("ignoring unreadable tokenizer cache %s", cached)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        tmp = cached.with_name(key + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached) if not cached.exists() else shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a read-only home is fine: convert every time
        log.info("tokenizer cache not written (%s)", e)
    return tok


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: list[int] | None = None) -> None:
        self.hf = hf_tokenizer
        if not getattr(self.hf, "chat_template", None):
            log.warning("checkpoint has no chat template; using a ChatML-style fallback")
            self.hf.chat_template = _FALLBACK_TEMPLATE
        eos = set(eos_token_ids or [])
        if self.hf.eos_token_id is not None:
            eos.add(int(self.hf.eos_token_id))
        self.eos_token_ids = sorted(eos)
        self._bytes: dict[int, bytes] = {}
        self._byte_level: bool | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, eos_token_ids: list[int] | None = None) -> Tokenizer:
        from transformers import AutoTokenizer

        p = Path(path)
        try:
            if p.is_file():  # GGUF
                tok = _gguf_tokenizer(p)
            else:
                tok = AutoTokenizer.from_pretrained(str(p))
        except Exception as e:
            raise TokenizerError(f"cannot load a tokenizer from {p}: {e}") from None
        return cls(tok, eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    @property
    def special_ids(self) -> set[int]:
        """Ids of special and added tokens (chat markers, EOS ...): never part of an answer's text."""
        return set(self.hf.added_tokens_decoder)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (part of a character, for some), as log-probs report them."""
        out = self._bytes.get(token_id)
        if out is None:
            out = self._bytes[token_id] = self._token_bytes(int(token_id))
        return out

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self.hf.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        if token_id in self.hf.added_tokens_decoder:  # special and added tokens are stored as text
            return piece.encode()
        if self._is_byte_level():
            try:
                return bytes(_BYTE_OF_CHAR[c] for c in piece)
            except KeyError:
                return piece.encode()
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()  # SentencePiece marks spaces with U+2581

    def _is_byte_level(self) -> bool:
        if self._byte_level is None:
            backend = getattr(self.hf, "backend_tokenizer", None)
            decoder = getattr(backend, "decoder", None)
            name = type(decoder).__name__
            if name == "Sequence":  # look inside (rare): the decoder's own description
                name = "ByteLevel" if '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder")) else name
            self._byte_level = name == "ByteLevel"
        return self._byte_level

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises for unsupported roles, missing fields, ...
            raise TokenizerError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the conversation, ending with the assistant turn's opening."""
        return self.encode(self.render_chat(messages))


def normalize_messages(messages: object) -> list[dict[str, str]]:
    """OpenAI chat messages -> [{role, content}] with text content (content parts are joined)."""
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TokenizerError(f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(
                str(p.get("text", ""))
                for p in content
                if isinstance(p, dict) and p.get("type", "text") == "text"
            )
        elif content is not None and not isinstance(content, str):
            raise TokenizerError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content or ""})
    return out
