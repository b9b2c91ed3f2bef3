"""The output vocabulary of `tokenizer_source` / `tokenizer:`, and each input's embedding rows
re-ordered to it as its blocks are read.

The vocabulary follows mergekit's rules (its tokenizer/build.py and embed.py were read to learn
them): `base` keeps the base's tokenizer, `<model>` takes that model's, `union` is the base's
tokenizer plus, model by model, the tokens it lacks (plain tokens first, then added tokens, each
added with its own settings); the `tokens:` of a `tokenizer:` block are added when missing.
For each input, a permutation maps every output token to its row in that input (-1: the input
lacks it, or its index is past the input's vocab_size).

Then, per vocabulary tensor (embed_tokens, lm_head, ...) of a job, each input's row for an output
token is its own row when it has the token (and the token is not `force`d); otherwise the
token's default embedding, shared by every input that lacks it:
- a configured `tokens:` source: a model's row for that token, a model's row for another token
  (`model_token`, by token or id), or zeros;
- else the one input that has it, the base when the base has it, the mean of the inputs that have
  it (added in input order, in float32, as torch does), or zeros when none has it.
Rows past the vocabulary (`pad_to_multiple_of`) are the mean of the input's own assembled rows.

`VocabHandle` does this as rows are read, so the merge methods see aligned rows and no input is
ever copied whole: a block reads its own rows (one pread per run) and the few rows other inputs
lend it. Union order differs from mergekit's in one point: mergekit adds the tokens the base
lacks in the Python set order of the models and each tokenizer's get_vocab() order (a Rust hash
map's), which vary between runs; here it is the recipe's order, then each model's token ids, so
a build is reproducible. The rows each token gets are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..workspace import thread_buffer
from .blocks import block_shape, read_rows, read_rows_at, row_elems
from .safetensors_header import TensorSize

# The tensors whose first axis is the vocabulary (mergekit's `vocabulary_axis: 0` weights).
VOCAB_TENSOR = re.compile(r"(?:^|\.)(embed_tokens|lm_head|wte|embed_in|embed_out|word_embeddings)\.weight$")
# Tokenizer files a model directory may hold: replaced as a whole by the built tokenizer's.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
_PAD_BLOCK_ELEMS = 1 << 22  # elements per read when averaging an input's rows for the padding rows (16 MiB)


class VocabularyError(ValueError):
    """A tokenizer setting that cannot be honoured; `path` is where, below the recipe's `tokenizer`."""

    def __init__(self, path: tuple, msg: str):
        super().__init__(msg)
        self.path = path


def is_vocab_tensor(name: str) -> bool:
    return VOCAB_TENSOR.search(name) is not None


def tied_embedding(model, name: str):
    """The input embedding that stands for the missing output embedding `name` (lm_head) of a
    model that ties the two (no lm_head stored; config.json's tie_word_embeddings not false), as
    mergekit reads such a model's lm_head when merging it with one that has its own. None else."""
    if not name.endswith("lm_head.weight") or (model.config or {}).get("tie_word_embeddings") is False:
        return None
    inputs = [h for n, h in model.tensors.items() if is_vocab_tensor(n) and not n.endswith("lm_head.weight")]
    return inputs[0] if len(inputs) == 1 else None


# ------------------------------------------------------------------------------- vocabulary


@dataclass
class Vocabulary:
    """The output tokenizer and how every input's token rows map onto it."""

    tokenizer: Any  # a transformers fast tokenizer
    vocab: dict[str, int]  # output token -> id
    rows: int  # rows of the output's vocabulary tensors (len(vocab), padded up)
    perms: dict[str, np.ndarray]  # spec -> (len(vocab),) input row of each output token, -1: none
    original: dict[str, dict[str, int]]  # spec -> that input's own vocabulary
    sizes: dict[str, int]  # spec -> that input's vocab_size (rows that are tokens)

    def files(self) -> dict[str, bytes]:
        """The built tokenizer's files (tokenizer.json, tokenizer_config.json, ...)."""
        with tempfile.TemporaryDirectory(prefix="streammerge-tok-") as d:
            self.tokenizer.save_pretrained(d)
            return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}

    def fingerprint(self, files: dict[str, bytes]) -> dict:
        """What the rows of a build depend on besides the recipe and the tensors: the output
        tokenizer (`files`, from `files()`) and each input's vocabulary and vocab_size, as digests
        ({"output": ..., "inputs": {spec: ...}}). A resumed build compares them: a tokenizer file
        or config.json vocab_size changed since would re-order rows the store already holds."""
        output = hashlib.sha256()
        for name, data in sorted(files.items()):
            output.update(f"{name}\0{len(data)}\0".encode() + data)
        inputs = {
            spec: hashlib.sha256(json.dumps([self.sizes[spec], sorted(own.items())]).encode()).hexdigest()
            for spec, own in self.original.items()
        }
        return {"output": output.hexdigest(), "inputs": inputs}


def load_tokenizer(directory: Path, required: str | None = None):
    """The fast tokenizer of a model directory; None when it has none that loads, or, with
    `required` (what needs it, for the message), a VocabularyError saying why."""
    import transformers

    why = "no tokenizer files"
    if any((Path(directory) / f).is_file() for f in TOKENIZER_FILES):
        try:
            return transformers.AutoTokenizer.from_pretrained(str(directory), use_fast=True)
        except Exception as e:  # noqa: BLE001 - any failure means "no usable tokenizer", as mergekit treats it
            why = " ".join(str(e).split())[:200] or type(e).__name__
    if required is None:
        return None
    raise VocabularyError(("source",), f"{required} has no tokenizer that loads ({directory}: {why})")


def _vocab_size(config: dict | None, tokenizer) -> int:
    """Rows of the model's embedding that are tokens: config.json's vocab_size, else the tokenizer's."""
    cfg = config or {}
    n = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return n if isinstance(n, int) and n > 0 else len(tokenizer.get_vocab())


def build_vocabulary(
    source: str,
    base: str,
    models: list[str],
    directories: dict[str, Path],
    configs: dict[str, dict | None],
    add_tokens: list[str],
    pad_to_multiple_of: int | None,
    source_dir: Path | None = None,
) -> Vocabulary:
    """The output vocabulary for `source` ("base", "union" or a model, whose directory is
    `source_dir`) over the inputs `models` (specs, base first), as mergekit builds it. An input
    without a tokenizer is taken to share the base's; the base (and a named source) must have one."""
    base_tok = load_tokenizer(directories[base], required=f"the base model {base}")
    base_size = _vocab_size(configs.get(base), base_tok)
    if any(i >= base_size for i in base_tok.get_vocab().values()):
        base_tok = _trimmed(base_tok, base_size, base)
    toks = {base: base_tok}
    for spec in models:
        if spec not in toks and (t := load_tokenizer(directories[spec])) is not None:
            toks[spec] = t
    sizes = {spec: _vocab_size(configs.get(spec), t) for spec, t in toks.items()}

    if source == "base":
        out = base_tok
    elif source == "union":
        out = _union(base_tok, toks, sizes)
    else:
        out = load_tokenizer(source_dir, required=f"the tokenizer source {source}")
    have = set(out.get_vocab())
    for tok in add_tokens:
        if tok not in have:
            out.add_tokens(tok)
            have.add(tok)

    vocab = out.get_vocab()
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
    if ids.size and (ids.min() != 0 or ids.max() != ids.size - 1 or np.unique(ids).size != ids.size):
        raise VocabularyError(("source",), "the built vocabulary's token ids are not 0..n-1")
    rows = len(vocab)
    if pad_to_multiple_of:
        rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
    perms = {}
    for spec in models:
        own = toks.get(spec, base_tok).get_vocab()
        size = sizes.get(spec, base_size)
        p = np.full(len(vocab), -1, dtype=np.int64)
        for tok, i in vocab.items():
            j = own.get(tok, -1)
            p[i] = j if j < size else -1
        perms[spec] = p
    original = {spec: toks.get(spec, base_tok).get_vocab() for spec in models}
    return Vocabulary(out, vocab, rows, perms, original, {spec: sizes.get(spec, base_size) for spec in models})


def _trimmed(tok, size: int, spec: str):
    """`tok` without its tokens of id >= `size` (rows its model lacks), as mergekit trims the
    base's tokenizer: from the saved tokenizer.json, the added tokens, vocabulary entries and BPE
    merges that name them (or make them) are dropped, and the result loaded again."""
    import transformers

    with tempfile.TemporaryDirectory(prefix="streammerge-tok-") as d:
        tok.save_pretrained(d)
        path = Path(d) / "tokenizer.json"
        spec_json = json.loads(path.read_text(encoding="utf-8"))
        model = spec_json.get("model") or {}
        if model.get("type") not in ("BPE", "WordLevel") or not isinstance(model.get("vocab"), dict):
            raise VocabularyError(
                ("source",),
                f"the tokenizer of {spec} has tokens past its vocab_size {size} and is a {model.get('type')} "
                "model; only BPE and WordLevel tokenizers can be trimmed",
            )
        gone = {t for t, i in tok.get_vocab().items() if i >= size}
        spec_json["added_tokens"] = [e for e in spec_json.get("added_tokens", []) if e["id"] < size]
        model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in gone}
        if "merges" in model:
            model["merges"] = [m for m in model["merges"] if not _merge_names(m, gone)]
        path.write_text(json.dumps(spec_json, ensure_ascii=False), encoding="utf-8")
        return transformers.AutoTokenizer.from_pretrained(d, use_fast=True)


def _merge_names(merge, tokens: set[str]) -> bool:
    """Whether a BPE merge ("a b" or ["a", "b"]) uses or makes one of `tokens`."""
    parts = merge.split(" ") if isinstance(merge, str) else list(merge)
    return any(p in tokens for p in parts) or "".join(parts) in tokens


def _union(base_tok, toks: dict, sizes: dict[str, int]):
    """The base's tokenizer plus every other input's tokens it lacks: plain tokens in model
    order, then added tokens (the first model's settings win), as mergekit's union has it."""
    import transformers

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for spec, tok in toks.items():
        decoder = tok.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):  # id order: reproducible
            if i < sizes[spec] and t not in added_names:
                plain.setdefault(t)
        for i, info in decoder.items():
            if i < sizes[spec]:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory(prefix="streammerge-tok-") as d:  # a copy: the base's stays as it is
        base_tok.save_pretrained(d)
        out = transformers.AutoTokenizer.from_pretrained(d, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in plain:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def check_token_sources(vocab: Vocabulary, tokens: dict) -> None:
    """Every `tokens:` source names a merged model and a token (or id) that model has."""
    for token, cfg in tokens.items():
        src = cfg.source
        if src is None or getattr(src, "kind", None) == "zero":
            continue
        where = ("tokens", token, "source")
        model = src if isinstance(src, str) else src.model
        if model not in vocab.perms:
            raise VocabularyError(
                where if isinstance(src, str) else where + ("model",),
                f"model {model!r} is not one of the recipe's models ({', '.join(vocab.perms)})",
            )
        if isinstance(src, str):
            tid = vocab.vocab[token]
            if vocab.perms[model][tid] < 0:
                raise VocabularyError(where, f"token {token!r} is not in model {model}")
        elif src.token is not None and src.token not in vocab.original[model]:
            raise VocabularyError(where + ("token",), f"token {src.token!r} is not in model {model}")
        elif src.token is None and not 0 <= src.token_id < vocab.sizes[model]:
            raise VocabularyError(
                where + ("token_id",), f"token_id {src.token_id} is out of range for model {model} (vocab_size {vocab.sizes[model]})"
            )


# ------------------------------------------------------------------------------- row maps


@dataclass(frozen=True, eq=False)
class RowMaps:
    """For the inputs of one vocabulary tensor job: which row each input gives each output row.

    take[k][i] is input k's own row for output row i (-1: not its own); `defaults` maps every
    output row some input does not take from itself to (kind, ((input, input row), ...)): kind
    "row" (the one listed row), "mean" (their float32 mean, summed in order) or "zero".
    Output rows from `vocab` on are padding: the mean of the input's rows below them.
    """

    take: tuple[np.ndarray, ...]
    defaults: dict[int, tuple[str, tuple[tuple[int, int], ...]]]
    vocab: int
    digest: str = ""


def row_maps(vocab: Vocabulary, specs: list[str], base: str | None, rows_of: list[int], tokens: dict) -> RowMaps:
    """The RowMaps of a job over the inputs `specs` (`rows_of`: each input tensor's row count);
    `tokens` is the recipe's `tokenizer.tokens` ({token: entry with .source and .force})."""
    n = len(vocab.vocab)
    perms = [vocab.perms[s] for s in specs]
    take = [p.copy() for p in perms]
    defaults: dict[int, tuple[str, tuple]] = {}
    present = np.stack(perms) >= 0 if perms else np.zeros((0, n), dtype=bool)
    everywhere = present.all(axis=0)
    for token, tid in vocab.vocab.items():
        cfg = tokens.get(token)
        force = bool(cfg is not None and cfg.force)
        if everywhere[tid] and not force:
            continue
        if cfg is not None:
            defaults[tid] = _configured(vocab, specs, token, tid, cfg, rows_of)
        else:
            defaults[tid] = _derived(perms, specs, base, tid)
        if force:
            for t in take:
                t[tid] = -1
    pad = np.full(vocab.rows - n, -1, dtype=np.int64)
    take = [np.concatenate([t, pad]) for t in take]
    h = hashlib.sha256()
    for t in take:
        t.flags.writeable = False
        h.update(t.tobytes())
    h.update(repr(sorted(defaults.items())).encode())
    return RowMaps(tuple(take), defaults, n, h.hexdigest()[:16])


def unfound(vocab: Vocabulary, maps: RowMaps, tokens: dict) -> list[str]:
    """The output tokens none of the job's inputs has and no `tokens:` entry sources: zero rows."""
    ids = {tid for tid, (kind, _) in maps.defaults.items() if kind == "zero"}
    return sorted((t for t, i in vocab.vocab.items() if i in ids and t not in tokens), key=vocab.vocab.get)


def _derived(perms, specs, base, tid) -> tuple[str, tuple]:
    have = [k for k, p in enumerate(perms) if p[tid] >= 0]
    if not have:
        return ("zero", ())
    if len(have) == 1:
        return ("row", ((have[0], int(perms[have[0]][tid])),))
    if base in specs and perms[specs.index(base)][tid] >= 0:
        k = specs.index(base)
        return ("row", ((k, int(perms[k][tid])),))
    return ("mean", tuple((k, int(perms[k][tid])) for k in have))


def _configured(vocab: Vocabulary, specs, token: str, tid: int, cfg, rows_of) -> tuple[str, tuple]:
    src = cfg.source
    where = ("tokens", token, "source")
    if src is None:
        raise VocabularyError(("tokens", token), f"token {token!r} needs a 'source' (it is missing from some model, or forced)")
    if getattr(src, "kind", None) == "zero":
        return ("zero", ())
    model = src if isinstance(src, str) else src.model
    if model not in specs:
        raise VocabularyError(
            where if isinstance(src, str) else where + ("model",),
            f"model {model!r} is not one of the models merged here ({', '.join(specs)})",
        )
    k = specs.index(model)
    if isinstance(src, str):
        row = int(vocab.perms[model][tid])
        if row < 0:
            raise VocabularyError(where, f"token {token!r} is not in model {model}")
    else:  # model_token: another token's row, by token or by id
        key = "token_id" if src.token is None else "token"
        row = src.token_id if src.token is None else vocab.original[model].get(src.token, -1)
        if src.token is not None and row < 0:
            raise VocabularyError(where + (key,), f"token {src.token!r} is not in model {model}")
        if not 0 <= row < rows_of[k]:
            raise VocabularyError(where + (key,), f"row {row} is out of range for model {model} ({rows_of[k]} rows)")
    return ("row", ((k, int(row)),))


# ------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class VocabHandle(TensorSize):
    """Input `own` of a vocabulary tensor job, its rows re-ordered to the output vocabulary.

    Picklable and small like the handles it wraps (`sources`: the same tensor in every input of
    the job, which lend rows for the tokens this input lacks). Read through `blocks.read_rows`,
    which hands handles without raw storage to `read_rows`/`read_rows_at` here.
    """

    name: str
    sources: tuple  # the job's input handles (TensorHandle or LoraHandle), in job order
    own: int
    maps: RowMaps = field(compare=False, repr=False)
    digest: str = ""  # maps.digest: what equality and the padding cache key on
    check_finite: bool = True
    has_raw: ClassVar[bool] = False

    def __post_init__(self):
        # --allow-nonfinite replaces this handle with check_finite off: so are the rows it lends
        if any(h.check_finite != self.check_finite for h in self.sources):
            parts = tuple(replace(h, check_finite=self.check_finite) for h in self.sources)
            object.__setattr__(self, "sources", parts)

    @property
    def dtype(self) -> str:
        return self.sources[self.own].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.maps.take[self.own]), *self.sources[self.own].shape[1:])

    @property
    def path(self) -> str:
        return self.sources[self.own].path

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for h in self.sources for p in h.paths))

    def read_rows(self, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
        dest = out.reshape(-1)[: (r1 - r0) * row_elems(self.shape)]
        self._assemble(np.arange(r0, r1), dest.reshape(r1 - r0, -1))
        return dest.reshape(block_shape(self.shape, r0, r1))

    def read_rows_at(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        dest = out.reshape(-1)[: rows.size * row_elems(self.shape)]
        self._assemble(rows, dest.reshape(rows.size, -1))
        return dest.reshape((rows.size, *self.shape[1:]))

    def _assemble(self, rows: np.ndarray, dest: np.ndarray) -> None:
        """Output rows `rows` of this input into `dest` (rows.size, row elements), float32."""
        if not rows.size:
            return
        take = self.maps.take[self.own][rows]
        mine = np.flatnonzero(take >= 0)
        if mine.size == rows.size and take[-1] - take[0] == rows.size - 1 and (np.diff(take) == 1).all():
            # all its own rows, in order (most blocks when vocabularies share their ids): read in place
            read_rows(self.sources[self.own], int(take[0]), int(take[-1]) + 1, dest)
        elif mine.size:
            order = np.argsort(take[mine], kind="stable")  # reads want ascending rows (a permutation: no repeats)
            got = _read(self.sources[self.own], take[mine][order], ("tokenizer.own",))
            dest[mine[order]] = got.reshape(mine.size, -1)
        lent = [i for i in np.flatnonzero(take < 0).tolist() if rows[i] < self.maps.vocab]
        if lent:
            self._defaults(rows, lent, dest)
        pad = np.flatnonzero(rows >= self.maps.vocab)
        if pad.size:
            dest[pad] = self._padding()

    def _defaults(self, rows: np.ndarray, lent: list[int], dest: np.ndarray) -> None:
        """The default embeddings of output rows rows[lent], from the inputs that lend them."""
        needed: dict[int, set[int]] = {}
        for i in lent:
            for k, r in self.maps.defaults[int(rows[i])][1]:
                needed.setdefault(k, set()).add(r)
        got: dict[tuple[int, int], np.ndarray] = {}
        for k, rs in needed.items():
            at = np.array(sorted(rs), dtype=np.int64)
            vals = _read(self.sources[k], at, ("tokenizer.lent", k)).reshape(at.size, -1)
            got.update({(k, int(r)): vals[j].copy() for j, r in enumerate(at)})
        for i in lent:
            kind, items = self.maps.defaults[int(rows[i])]
            if kind == "zero":
                dest[i] = 0.0
            elif kind == "row":
                dest[i] = got[items[0]]
            else:  # torch's zeros + each row in turn, then / count: float32 at every step
                acc = np.zeros(dest.shape[1], dtype=np.float32)
                for item in items:
                    acc = acc + got[item]
                dest[i] = acc / np.float32(len(items))

    def _padding(self) -> np.ndarray:
        # keyed by the files' identity too: a file rewritten in place is not averaged from memory
        files = tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, self.paths))
        return _padding_row(self, files)


def _read(handle, rows: np.ndarray, key: tuple) -> np.ndarray:
    return read_rows_at(handle, rows, thread_buffer(key, rows.size * row_elems(handle.shape)))


@lru_cache(maxsize=8)
def _padding_row(h: VocabHandle, files: tuple) -> np.ndarray:
    """The mean of `h`'s rows below the padding, summed in float64 over fixed blocks (so the same
    whatever the job's blocking), then divided in float32 as torch's mean does."""
    width = row_elems(h.shape)
    acc = np.zeros(width, dtype=np.float64)
    n = h.maps.vocab
    step = max(1, _PAD_BLOCK_ELEMS // width)
    buf = np.empty(min(n, step) * width, dtype=np.float32)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        block = buf[: (r1 - r0) * width].reshape(r1 - r0, width)
        h._assemble(np.arange(r0, r1), block)
        acc += block.sum(axis=0, dtype=np.float64)
    out = acc.astype(np.float32) / np.float32(n)
    out.flags.writeable = False
    return out


def vocab_handles(name: str, handles: list, maps: RowMaps) -> list:
    """Every input of a vocabulary tensor job as read through `maps`; the inputs themselves when
    every one already has the output vocabulary's rows in its order (nothing to re-order)."""
    if not maps.defaults and all(
        h.shape[0] == t.size and np.array_equal(t, np.arange(t.size)) for h, t in zip(handles, maps.take)
    ):
        return list(handles)
    parts = tuple(handles)
    return [VocabHandle(name, parts, k, maps, maps.digest, check_finite=h.check_finite) for k, h in enumerate(handles)]


def write_tokenizer_files(hf_dir: Path, files: dict[str, bytes], allowed: tuple[str, ...]) -> None:
    """Replace the tokenizer files of `hf_dir` by the built tokenizer's (those named in `allowed`);
    the chat template too: it belongs to the tokenizer (the recipe's `chat_template` is written after)."""
    for name in (*TOKENIZER_FILES, "chat_template.jinja", "chat_template.json"):
        (hf_dir / name).unlink(missing_ok=True)
    for name, data in files.items():
        if name in allowed:
            (hf_dir / name).write_bytes(data)
