"""Plumbing shared by the fine-tuning notebooks: chat examples with the prompt masked, padded
batches, log-probabilities of a completion, sampling completions, and the KL estimators.

The ideas (why mask the prompt, the DPO loss, the reward model, REINFORCE with a KL penalty)
are written out in notebook 12 and track A; this module only does the bookkeeping they share.

A chat example is ``input_ids`` plus ``labels``: the same ids, with -100 on every token the
loss must ignore (Hugging Face's convention: the model shifts labels by one itself). With the
prompt masked, exactly the assistant's turn is scored: its text, its end-of-turn token (so the
model learns to stop) and the newline the chat template puts after it. That is what trl 1.16's
prompt/completion format scores too (tests compare the two on the same examples)::

    ex = encode_chat(tok, "What is AI?", "A field of science.")
    tok.decode([t for t in ex["labels"] if t != -100])     # 'A field of science.<|im_end|>\\n'
    batch = pad_batch([ex, ex2], pad_id=tok.pad_token_id)  # input_ids, attention_mask, labels: (B, T)
    data = ChatData(train_examples, val_examples, tok.pad_token_id)   # batches for labkit.train
    total, per_token, mask = completion_logprobs(model, batch)   # (B,), (B, T-1), (B, T-1)
    samples = generate(model, tok, ["Tell me a joke."], max_new_tokens=32, temperature=1.0, seed=0)
    kl = kl_estimates(logp_policy, logp_ref)["k3"]          # per token, on tokens sampled from the policy

Worked example of the label layout (token ids made up)::

    prompt ids  [5, 6, 7]   response ids  [8, 9, 2]   ->   input_ids [5, 6, 7, 8, 9, 2]
                                                           labels    [-100, -100, -100, 8, 9, 2]
"""
from __future__ import annotations

import warnings

import torch

IGNORE_INDEX = -100   # cross_entropy's ignore_index: positions that carry no loss


# ----------------------------------------------------------------------------- chat examples

def chat_messages(prompt, response: str | None = None, system: str | None = None) -> list[dict]:
    """A prompt (a string, or a list of ``{"role", "content"}`` turns) as chat messages.

    >>> chat_messages("Hi", "Hello!", system="Be brief.")  # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
     {'role': 'assistant', 'content': 'Hello!'}]
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share.

    >>> common_prefix_length([1, 2, 3], [1, 2, 4, 5])
    2
    """
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_chat(tok, prompt, response: str, system: str | None = None, mask_prompt: bool = True,
                max_length: int | None = None) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one chat turn, rendered by the tokenizer's chat template.

    The conversation is tokenized once with the response and once as the prompt alone (with
    the assistant header, ``add_generation_prompt=True``); the tokens they share are the prompt,
    the rest is the response, as trl does. ``mask_prompt=False`` scores every token (plain
    language modelling on the chat text). ``max_length`` cuts the end off, as trl does;
    an example with no scored token left is refused.
    """
    prompt_ids = _ids(tok.apply_chat_template(chat_messages(prompt, system=system), tokenize=True,
                                              add_generation_prompt=True))
    input_ids = _ids(tok.apply_chat_template(chat_messages(prompt, response, system), tokenize=True))
    n_prompt = common_prefix_length(prompt_ids, input_ids)
    if n_prompt < len(prompt_ids):
        warnings.warn(f"the tokenized prompt is not a prefix of the tokenized conversation (the template "
                      f"or a merge across the boundary changes {tok.decode(prompt_ids[n_prompt:])!r}); "
                      f"scoring from where they diverge, as trl does")
    labels = ([IGNORE_INDEX] * n_prompt if mask_prompt else input_ids[:n_prompt]) + input_ids[n_prompt:]
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        raise ValueError(f"the prompt alone has {n_prompt} tokens, so max_length={max_length} leaves no "
                         f"response token to score. Fix: raise max_length or shorten the prompt "
                         f"(the data loaders take max_chars=)")
    return {"input_ids": input_ids, "labels": labels}


def example_from_ids(prompt_ids: list[int], completion_ids: list[int]) -> dict[str, list[int]]:
    """An example that scores ``completion_ids`` given ``prompt_ids`` (e.g. a sampled completion).

    >>> example_from_ids([5, 6, 7], [8, 9, 2])
    {'input_ids': [5, 6, 7, 8, 9, 2], 'labels': [-100, -100, -100, 8, 9, 2]}
    """
    return {"input_ids": list(prompt_ids) + list(completion_ids),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)}


def pad_batch(examples: list[dict], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Stack examples of different lengths: ``input_ids``, ``attention_mask``, ``labels``, each (B, T).

    Padding gets attention 0 and label -100, so it changes neither the outputs at real tokens
    nor the loss. Right padding (the default) keeps every real token at its own position;
    generation needs left padding (``generate`` does that itself).

    >>> b = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}], pad_id=0)
    >>> b["input_ids"].tolist(), b["attention_mask"].tolist(), b["labels"].tolist()
    ([[5, 6, 7], [5, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[-100, 6, 7], [5, -100, -100]])
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}: use 'right' or 'left'")
    T = max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        n = len(e["input_ids"])
        labels = e.get("labels", e["input_ids"])
        pad = lambda seq, value: ([value] * (T - n) + list(seq)) if padding_side == "left" else (list(seq) + [value] * (T - n))
        out["input_ids"].append(pad(e["input_ids"], pad_id))
        out["attention_mask"].append(pad([1] * n, 0))
        out["labels"].append(pad(labels, IGNORE_INDEX))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


# ----------------------------------------------------------------------------- log-probabilities

def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label_t | tokens < t) at every scored position: ``(logp, mask)``, both (B, T-1).

    Position t of the logits predicts token t+1, so logits[:, :-1] are read at labels[:, 1:];
    unscored positions (label -100) get logp 0 and mask False.

    >>> logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]]))   # (1, 3, vocab 2)
    >>> logp, mask = token_logprobs(logits, torch.tensor([[-100, 0, 1]]))
    >>> [round(p, 3) for p in logp.exp()[0].tolist()], mask.tolist()   # p(0 | x0) = 0.5, p(1 | x0 x1) = 0.1
    ([0.5, 0.1], [[True, True]])
    """
    target = labels[:, 1:]                                      # (B, T-1)
    mask = target != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)   # (B, T-1, V); fp32 even for a bf16 model
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def completion_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, per_token, mask)``: log p(completion | prompt) summed per sequence (B,), and per
    token (B, T-1) with its mask. Gradients flow (wrap in ``torch.no_grad()`` for a reference model)."""
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    logits = out.logits if hasattr(out, "logits") else out[0]
    per_token, mask = token_logprobs(logits, batch["labels"].to(device))
    return per_token.sum(-1), per_token, mask


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the scored tokens of a batch (= HF's ``model(..., labels=).loss``)."""
    _, per_token, mask = completion_logprobs(model, batch)
    return -per_token.sum() / mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------- sampling

@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens: int = 32, temperature: float = 1.0, top_k: int | None = None,
             chat: bool = True, system: str | None = None, seed: int | None = None) -> list[dict]:
    """Sample one completion per prompt: ``[{"prompt_ids", "completion_ids", "text"}]``.

    ``chat=True`` wraps each prompt in the chat template (with the assistant header); else the
    prompt is raw text. ``temperature=0`` is greedy. A completion ends after the first
    end-of-sequence token (kept, so its probability can be scored) or at ``max_new_tokens``.
    Prompts are left-padded into one batch, so every prompt's last token is where sampling starts.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if chat:
        prompt_ids = [_ids(tok.apply_chat_template(chat_messages(p, system=system), tokenize=True,
                                                   add_generation_prompt=True)) for p in prompts]
    else:
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = pad_batch([{"input_ids": p} for p in prompt_ids], pad_id, padding_side="left")
    device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=1.0) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=tok.eos_token_id, **sampling)
    finally:
        model.train(was_training)
    results = []
    for p, row in zip(prompt_ids, out[:, batch["input_ids"].shape[1]:].tolist()):
        if tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id) + 1]
        results.append({"prompt_ids": p, "completion_ids": row,
                        "text": tok.decode(row, skip_special_tokens=True)})
    return results


# ----------------------------------------------------------------------------- KL estimators

def kl_estimates(logp: torch.Tensor, logp_ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token estimators of KL(policy || reference) from tokens sampled from the policy.

    With log r = logp_ref - logp (J. Schulman, "Approximating KL divergence", 2020):
    k1 = -log r (unbiased, high variance, can be negative); k2 = (log r)^2 / 2 (biased, low
    variance); k3 = (r - 1) - log r (unbiased and always >= 0: trl's GRPO uses it). Their means
    over policy samples estimate the KL; tests check k1 and k3 against the exact KL.

    >>> est = kl_estimates(torch.tensor([-1.0]), torch.tensor([-1.5]))     # log r = -0.5
    >>> {k: round(v.item(), 4) for k, v in est.items()}
    {'k1': 0.5, 'k2': 0.125, 'k3': 0.1065}
    """
    log_r = logp_ref - logp
    return {"k1": -log_r, "k2": 0.5 * log_r ** 2, "k3": torch.expm1(log_r) - log_r}


# ----------------------------------------------------------------------------- training data (track A)

class ChatData:
    """Chat examples as next-token batches for ``labkit.train.train``: ``x`` (B, T) token ids and
    ``y`` (B, T) the next token at every position, -100 where nothing is scored (the prompt, padding).

    ``train`` and ``val`` are lists of examples ``{"input_ids", "labels"}`` (``encode_chat``'s
    layout: labels aligned with the ids, -100 on the prompt). An example of n tokens gives n - 1
    predictions: ``x = ids[:-1]``, ``y = labels[1:]``. A batch draws ``batch_size`` examples at
    random (with replacement, from ``generator``), cuts each to ``block_size`` predictions and
    right-pads to the longest: padding is never scored and, behind a causal mask, never read.

    >>> data = ChatData(train=[{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
    ...                        {"input_ids": [5, 9], "labels": [-100, 9]}], val=[], pad_id=0)
    >>> x, y = data.batch("train", 2, 8, torch.Generator().manual_seed(0))
    >>> x.tolist(), y.tolist()       # example 0 (3 predictions) and example 1 (1 prediction, padded)
    ([[5, 6, 7], [5, 0, 0]], [[-100, 7, 8], [9, -100, -100]])
    """

    def __init__(self, train: list[dict], val: list[dict], pad_id: int, tokenizer=None):
        self.train, self.val, self.pad_id, self.tokenizer = list(train), list(val), int(pad_id), tokenizer

    def split(self, name: str) -> list[dict]:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        examples = self.train if name == "train" else self.val
        if not examples:
            raise ValueError(f"the {name} split of this ChatData is empty")
        return examples

    def batch(self, split: str, batch_size: int, block_size: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        examples = self.split(split)
        rows = [examples[i] for i in torch.randint(len(examples), (batch_size,), generator=generator).tolist()]
        return self._stack(rows, block_size)

    def fixed_batches(self, split: str, batch_size: int, block_size: int, limit: int | None = None):
        """Every example of ``split`` (or its first ``limit``) once, in order, as (x, y) batches.

        ``labkit.train.evaluate`` draws its val batches with a generator seeded by the run's seed, so
        runs with different seeds are scored on different examples; to compare seeds and settings,
        score every run on these same batches (``batch_losses``).
        """
        examples = self.split(split)[:limit]
        out = []
        for i in range(0, len(examples), batch_size):
            part = ChatData(examples[i:i + batch_size], [], self.pad_id)
            out.append(part._stack(part.train, block_size))
        return out

    def _stack(self, rows: list[dict], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = min(block_size, max(len(e["input_ids"]) - 1 for e in rows))
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)          # (B, T)
        y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)         # (B, T)
        for b, e in enumerate(rows):
            ids, labels = e["input_ids"][:T + 1], e["labels"][:T + 1]
            x[b, :len(ids) - 1] = torch.tensor(ids[:-1])       # what the model reads
            y[b, :len(ids) - 1] = torch.tensor(labels[1:])     # what it must predict next (-100: not scored)
        return x, y

    def scored_tokens(self, split: str) -> int:
        """How many tokens of a split carry loss (the response tokens, without the first one's shift)."""
        return sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in self.split(split))

    def subset(self, n: int) -> "ChatData":
        """The first ``n`` training examples and the same val split (a tiny set to overfit on purpose)."""
        return ChatData(self.train[:n], self.val, self.pad_id, self.tokenizer)


@torch.no_grad()
def batch_losses(model, batches) -> tuple[list[float], list[int]]:
    """The mean next-token loss of each ``(x, y)`` batch (``labkit.train.lm_loss``: the labkit GPT or an
    HF model) and how many tokens it scored (``y != -100``). Their token-weighted mean is the loss
    over every scored token; exp of it, the perplexity."""
    from .train import lm_loss
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, tokens = [], []
    for x, y in batches:
        losses.append(lm_loss(model, x.to(device), y.to(device)).item())
        tokens.append(int((y != IGNORE_INDEX).sum()))
    model.train(was_training)
    return losses, tokens


def mean_loss(model, batches) -> float:
    """The loss over every scored token of ``batches`` (nats): each batch weighted by its scored tokens."""
    losses, tokens = batch_losses(model, batches)
    return sum(l * n for l, n in zip(losses, tokens)) / sum(tokens)


def encode_plain(tok, prompt: str, response: str, max_length: int | None = None) -> dict[str, list[int]]:
    """A Q/A pair for a tokenizer without a chat template (the labkit GPT's character or BPE
    tokenizer): ``"Q: {prompt}\\nA:"`` is the prompt (masked), ``" {response}\\n"`` the response.

    >>> from labkit.data import CharTokenizer
    >>> ex = encode_plain(CharTokenizer("QA: \\nhiyo?"), "hi?", "yo")
    >>> len(ex["input_ids"]), ex["labels"].count(IGNORE_INDEX)     # 'Q: hi?\\nA:' masked, ' yo\\n' scored
    (13, 9)
    """
    prompt_ids = list(tok.encode(f"Q: {prompt}\nA:"))
    response_ids = list(tok.encode(f" {response}\n"))
    ex = example_from_ids(prompt_ids, response_ids)
    if max_length is not None:
        ex = {k: v[:max_length] for k, v in ex.items()}
        if all(t == IGNORE_INDEX for t in ex["labels"]):
            raise ValueError(f"the prompt alone has {len(prompt_ids)} tokens: max_length={max_length} "
                             f"leaves no response token to score")
    return ex


def chat_data(tok, pairs: list[dict], val_fraction: float = 0.1, seed: int = 0, max_length: int | None = None,
              system: str | None = None) -> ChatData:
    """``ChatData`` from ``{"prompt", "response"}`` pairs (``labkit.load_chat_pairs()``), split by prompt.

    Pairs that share a prompt ("What is AI?" has several answers) go to the same split, so val
    measures answers to questions the model never saw. A tokenizer with a chat template (SmolLM2's,
    Qwen's) renders each pair with it (``encode_chat``, prompt masked); one without (the labkit
    GPT's) uses ``encode_plain``. Pairs whose prompt alone fills ``max_length`` are dropped. Each
    example also keeps its ``"prompt"`` text (to sample answers to held-out questions).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    prompts = sorted({p["prompt"] for p in pairs})
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    val_prompts = {prompts[i] for i in order[:max(1, round(val_fraction * len(prompts)))]}
    templated = getattr(tok, "chat_template", None) is not None
    splits = {"train": [], "val": []}
    for p in pairs:
        try:
            ex = (encode_chat(tok, p["prompt"], p["response"], system=system, max_length=max_length) if templated
                  else encode_plain(tok, p["prompt"], p["response"], max_length=max_length))
        except ValueError:          # the prompt alone is longer than max_length: nothing left to score
            continue
        ex["prompt"] = p["prompt"]  # kept for reading samples; batches use only input_ids and labels
        splits["val" if p["prompt"] in val_prompts else "train"].append(ex)
    pad_id = getattr(tok, "pad_token_id", None)
    return ChatData(splits["train"], splits["val"], pad_id if pad_id is not None else 0, tok)


def char_data_with(extra_text: str = "", max_chars: int | None = None):
    """Shakespeare as character ids (``labkit.data.TokenData``), with a vocabulary that also
    covers ``extra_text`` (chat pairs use '#', '%', curly quotes ... that Shakespeare never does).

    The general text of track A's small-model sweeps: the base GPT is pretrained on it, and its
    val split measures what fine-tuning makes the model forget.
    """
    from .assets import load_shakespeare
    from .data import CharTokenizer, TokenData
    corpus = load_shakespeare()
    train_text = corpus.train[:max_chars] if max_chars else corpus.train
    val_text = corpus.val[:max_chars // 9] if max_chars else corpus.val
    tok = CharTokenizer(corpus.train + corpus.val + extra_text)
    ids = lambda text: torch.tensor(tok.encode(text), dtype=torch.long)
    return TokenData(ids(train_text), ids(val_text), tok)
