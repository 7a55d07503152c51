"""Shakespeare as token ids for training small models: characters or a small BPE, train/val, batches.

    data = shakespeare_data("char")                 # 65-ish symbols, ids of every character
    data = shakespeare_data("bpe", vocab_size=512)  # byte-level BPE trained on the train split
    x, y = data.batch("train", batch_size=16, block_size=128, generator=g)   # (16, 128) each
    # y is x shifted by one token: the model predicts y[:, t] from x[:, :t+1]

The BPE here is Hugging Face ``tokenizers`` (Rust, a second for 4 MB): notebook 01 builds the
same algorithm by hand, and this is the fast library version the later notebooks train on.
The split is the corpus's own (last 10% of every play held out), so val text is unseen text.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .assets import load_shakespeare


class CharTokenizer:
    """One token per character; ids follow sorted order, so they are the same on every machine.

    >>> tok = CharTokenizer("hello")
    >>> tok.encode("hole"), tok.decode([0, 2, 2])
    ([1, 3, 2, 0], 'ell')
    """

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in this tokenizer's vocabulary "
                             f"(built from its training text)") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained with Hugging Face ``tokenizers``.

    >>> tok = BPETokenizer("to be or not to be " * 50, vocab_size=270)
    >>> tok.decode(tok.encode("to be, or not")) == "to be, or not"
    True
    """

    def __init__(self, text: str, vocab_size: int = 512):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        self.tok = Tokenizer(models.BPE())
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        self.tok.train_from_iterator([text], trainer=trainer)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


@dataclass
class TokenData:
    """Train and val token ids (1-D int64 tensors) and the tokenizer that made them."""
    train: torch.Tensor
    val: torch.Tensor
    tokenizer: CharTokenizer | BPETokenizer

    def batch(self, split: str, batch_size: int, block_size: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` windows of ``block_size`` tokens at random offsets: x and y = x shifted by 1."""
        ids = self.split(split)
        if len(ids) <= block_size:
            raise ValueError(f"{split} has {len(ids)} tokens, too few for block_size={block_size}")
        start = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)   # (B,)
        offsets = start[:, None] + torch.arange(block_size)                               # (B, T)
        return ids[offsets], ids[offsets + 1]

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val


def shakespeare_data(kind: str = "char", vocab_size: int = 512, max_chars: int | None = None) -> TokenData:
    """The Shakespeare corpus as ids. ``max_chars`` trims the train text (smoke profiles)."""
    corpus = load_shakespeare()
    train_text = corpus.train[:max_chars] if max_chars else corpus.train
    val_text = corpus.val[:max_chars // 9] if max_chars else corpus.val   # keep the 9:1 ratio
    if kind == "char":
        tok = CharTokenizer(corpus.train + corpus.val)   # all symbols, so val never fails to encode
    elif kind == "bpe":
        tok = BPETokenizer(train_text, vocab_size)
    else:
        raise ValueError(f"kind must be 'char' or 'bpe', got {kind!r}")
    as_ids = lambda text: torch.tensor(tok.encode(text), dtype=torch.long)
    return TokenData(as_ids(train_text), as_ids(val_text), tok)
