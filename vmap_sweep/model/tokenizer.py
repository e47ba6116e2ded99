"""Tokenizers behind one interface: nanochat's tiktoken pickle, a Hugging Face tokenizer.json, and bytes.

Every tokenizer encodes *ordinary* text: a special-token string such as "<|bos|>" inside user content is
encoded as the characters it is made of, never as the special id (as nanochat's `encode_ordinary`).
Special ids are asked for by name with `special_id`.

nanochat ships its tokenizer as a pickled `tiktoken.Encoding`. Unpickling a file from the Internet can
run arbitrary code, so `TiktokenTokenizer.from_pickle` uses a restricted unpickler that resolves only the
few globals such a file holds, to harmless stand-ins, and then builds the Encoding itself from the
recorded state.
"""

from __future__ import annotations

import io
import pickle
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

from vmap_sweep.errors import TokenizerError

SPECIAL_TOKENS: list[str] = [
    "<|bos|>",  # every document / conversation begins with it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]

# GPT-4's split pattern with \p{N}{1,2} instead of {1,3} (nanochat/tokenizer.py).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

BYTES = "bytes"  # how the byte tokenizer is named where a tokenizer file name would go

# Text a split pattern must cut into non-empty pieces that cover it: letters, digits, punctuation, runs of
# whitespace and newlines, other scripts. tiktoken's Rust core panics on an empty piece (a pattern such as
# "" matches the empty string), and a pattern that skips characters silently drops them from every text.
_PATTERN_PROBE = "Hello, World! it's 12345 apples;\n\n  tabs\tand  spaces\r\n\u00e9t\u00e9 \u65e5\u672c \U0001f642 ?! "


class Tokenizer(ABC):
    """What the rest of the package needs from a tokenizer."""

    # The file this tokenizer was read from (None if built in memory); save() copies it verbatim.
    source: Path | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text (special-token strings in it are plain text)."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """One more than the largest id this tokenizer can produce (specials included)."""

    @abstractmethod
    def _special_ids(self) -> dict[str, int]: ...

    @abstractmethod
    def save(self, directory: Path) -> str:
        """Write this tokenizer into `directory`; return the name (or "bytes") that load_tokenizer reads."""

    def special_id(self, name: str) -> int:
        ids = self._special_ids()
        if name not in ids:
            where = self.source.name if self.source else type(self).__name__
            raise TokenizerError(
                f"{where}: no special token {name!r}; nanochat tokenizers define {', '.join(SPECIAL_TOKENS)}"
            )
        return ids[name]

    @property
    def bos_id(self) -> int:
        return self.special_id("<|bos|>")

    def missing_specials(self) -> list[str]:
        """nanochat's special tokens this tokenizer lacks (empty for a nanochat tokenizer)."""
        ids = self._special_ids()
        return [name for name in SPECIAL_TOKENS if name not in ids]


def _copy_source(src: Path, directory: Path, name: str) -> str:
    dst = directory / name
    if not (dst.exists() and dst.resolve() == src.resolve()):
        shutil.copyfile(src, dst)
    return name


# ---------------------------------------------------------------------------------------------- bytes


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, nanochat's nine specials as 256..264: the tiny model's tokenizer."""

    def __init__(self) -> None:
        self._specials = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._names = {i: name for name, i in self._specials.items()}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
            elif i in self._names:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                out.append(self._names[i])
            else:
                raise ValueError(f"id {i} is outside the byte tokenizer's vocabulary of {self.vocab_size}")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    def _special_ids(self) -> dict[str, int]:
        return self._specials

    def save(self, directory: Path) -> str:
        return BYTES


# ---------------------------------------------------------------------------------------------- tiktoken


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: it only records the state it is given."""

    __slots__ = ("state",)

    def __setstate__(self, state: object) -> None:
        self.state = state


def _reconstructor(cls: object, base: object, state: object) -> _EncodingState:
    # copyreg._reconstructor, as protocols 0 and 1 use it for Encoding; anything else is refused.
    if cls is not _EncodingState or base is not object or state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor used for something other than a tiktoken Encoding")
    return _EncodingState()


def _latin1_bytes(text: object = "", encoding: str = "latin1") -> bytes:
    # _codecs.encode, as protocols 0-2 use it to spell bytes; only its latin-1 use is allowed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode used for something other than spelling bytes")
    return text.encode("latin-1")


def _empty_bytes(*args: object) -> bytes:
    # bytes(), as protocols 0-2 spell b"".
    if args:
        raise pickle.UnpicklingError("bytes() called with arguments")
    return b""


# Every global a pickled tiktoken.Encoding references (protocols 0-5; Python 2 names for protocols < 3),
# each resolved to a harmless stand-in: nothing from the file is ever imported or called for real.
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("tiktoken.core", "Encoding"): _EncodingState,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("__builtin__", "object"): object,
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _validate_state(state: object, where: str) -> dict:
    if isinstance(state, str):
        raise TokenizerError(
            f"{where}: names tiktoken's registered encoding {state!r} instead of holding its merges; "
            "use a tokenizer.pkl saved by nanochat (it stores the full encoding)"
        )
    types = {"name": str, "pat_str": str, "mergeable_ranks": dict, "special_tokens": dict}
    if not isinstance(state, dict) or not all(isinstance(state.get(k), t) for k, t in types.items()):
        raise TokenizerError(
            f"{where}: the pickled state isn't {{name, pat_str, mergeable_ranks, special_tokens}}; "
            "is this nanochat's tokenizer.pkl?"
        )
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if not all(isinstance(k, bytes) and type(v) is int and v >= 0 for k, v in ranks.items()):
        raise TokenizerError(f"{where}: mergeable_ranks must map bytes to non-negative ints; the file is corrupt")
    if not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in specials.items()):
        raise TokenizerError(f"{where}: special_tokens must map str to non-negative ints; the file is corrupt")
    extra = set(state) - {*types, "explicit_n_vocab"}
    if extra:
        raise TokenizerError(f"{where}: unexpected fields {sorted(extra)} in the pickled Encoding; the file is corrupt")
    _check_split_pattern(state["pat_str"], where)
    return {k: state[k] for k in types}


def _check_split_pattern(pat_str: str, where: str) -> None:
    """Refuse a pat_str that tiktoken would panic on or that loses text, before tiktoken ever sees it."""
    import regex  # the engine tiktoken's own Python code uses for these patterns

    try:
        pieces = [m.group() for m in regex.compile(pat_str).finditer(_PATTERN_PROBE)]
    except regex.error as e:
        raise TokenizerError(f"{where}: pat_str is not a valid split pattern ({e}); the file is corrupt") from None
    if "" in pieces or "".join(pieces) != _PATTERN_PROBE:
        raise TokenizerError(f"{where}: pat_str {pat_str[:60]!r} does not split text into non-empty pieces that "
                             "cover it; the file is corrupt, use nanochat's tokenizer.pkl")


def _panicked(e: BaseException) -> bool:
    # pyo3 turns a Rust panic into PanicException, a BaseException (not an Exception) by design.
    return type(e).__name__ == "PanicException"


class TiktokenTokenizer(Tokenizer):
    """nanochat's tokenizer: a tiktoken Encoding (BPE ranks + nine specials after them)."""

    def __init__(self, encoding, source: Path | None = None) -> None:
        self.enc = encoding
        self.source = source
        self._specials = {name: encoding.encode_single_token(name) for name in encoding.special_tokens_set}

    @classmethod
    def from_state(
        cls,
        name: str,
        pat_str: str,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        source: Path | None = None,
    ) -> TiktokenTokenizer:
        import tiktoken

        where = source.name if source else "tiktoken state"
        try:
            enc = tiktoken.Encoding(
                name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
            )
        except BaseException as e:  # tiktoken's Rust core raises ValueError or panics on a bad pattern
            if not (isinstance(e, Exception) or _panicked(e)):
                raise
            raise TokenizerError(f"{where}: tiktoken can't build the encoding ({e}); the file is corrupt") from None
        return cls(enc, source)

    @classmethod
    def from_pickle(cls, path: str | Path) -> TiktokenTokenizer:
        """Read nanochat's tokenizer.pkl without executing anything from the file."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: can't read the tokenizer ({e.strerror}); check the path") from e
        try:
            obj = _RestrictedUnpickler(io.BytesIO(data)).load()
        except _RefusedGlobal as e:
            raise TokenizerError(
                f"{path}: refused to unpickle: it references {e}, which a tiktoken tokenizer never does; "
                "the file may be malicious, get tokenizer.pkl from a source you trust"
            ) from None
        except Exception as e:
            raise TokenizerError(
                f"{path}: not a readable pickle ({type(e).__name__}: {e}); is the download complete?"
            ) from None
        if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
            raise TokenizerError(f"{path}: the pickle holds no tiktoken Encoding; is this nanochat's tokenizer.pkl?")
        state = _validate_state(obj.state, str(path))
        return cls.from_state(**state, source=path)

    def encode(self, text: str) -> list[int]:
        try:
            return self.enc.encode_ordinary(text)
        except BaseException as e:
            if not _panicked(e):
                raise
            where = self.source or "tiktoken state"
            raise TokenizerError(f"{where}: tiktoken failed on a text ({e}); its pat_str is broken") from None

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def _special_ids(self) -> dict[str, int]:
        return self._specials

    def save(self, directory: Path) -> str:
        name = "tokenizer.pkl"
        if self.source is not None and self.source.is_file():
            return _copy_source(self.source, directory, name)
        with open(directory / name, "wb") as f:
            pickle.dump(self.enc, f)
        return name


# ---------------------------------------------------------------------------------------------- HF


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json, as the transformers port of nanochat ships."""

    def __init__(self, tokenizer, source: Path | None = None) -> None:
        self.tok = tokenizer
        self.source = source
        # Added (special) tokens are otherwise split out of any text; nanochat encodes content as plain text.
        self.tok.encode_special_tokens = True
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        self._specials = {name: vocab[name] for name in SPECIAL_TOKENS if name in vocab}

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as _HFTok

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer file; check the path")
        try:
            tok = _HFTok.from_file(str(path))
        except Exception as e:
            raise TokenizerError(
                f"{path}: the tokenizers library can't read it ({e}); is it a Hugging Face tokenizer.json?"
            ) from None
        return cls(tok, path)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _special_ids(self) -> dict[str, int]:
        return self._specials

    def save(self, directory: Path) -> str:
        name = "tokenizer.json"
        if self.source is not None and self.source.is_file():
            return _copy_source(self.source, directory, name)
        self.tok.save(str(directory / name))
        return name


# ---------------------------------------------------------------------------------------------- loading

# Where a tokenizer may sit inside a folder, in the order they are tried.
_FOLDER_CANDIDATES = ("tokenizer.pkl", "tokenizer/tokenizer.pkl", "tokenizer.json")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer by file name: *.pkl = tiktoken pickle, *.json = HF tokenizer.json, "bytes" = ByteTokenizer.

    A folder is searched for tokenizer.pkl, tokenizer/tokenizer.pkl, then tokenizer.json.
    """
    path = Path(path)
    if str(path) == BYTES and not path.exists():
        return ByteTokenizer()
    if path.is_dir():
        for name in _FOLDER_CANDIDATES:
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise TokenizerError(
            f"{path}: no tokenizer.pkl, tokenizer/tokenizer.pkl or tokenizer.json in this folder; "
            "copy the model's tokenizer beside it"
        )
    if not path.exists():
        raise TokenizerError(f"{path}: no such tokenizer file; check the path")
    if path.suffix == ".pkl":
        return TiktokenTokenizer.from_pickle(path)
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    raise TokenizerError(
        f"{path}: unknown tokenizer file type; expected tokenizer.pkl (tiktoken) or tokenizer.json (HF)"
    )
