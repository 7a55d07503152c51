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
import torch.nn.functional as F

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


class ChatData:
    """Chat examples as training batches for ``labkit.train``: ``.batch(split, batch_size,
    block_size, generator) -> (x, y)``, like ``labkit.data.TokenData``.

    Each batch draws ``batch_size`` examples of the split at random (with replacement, from
    ``generator``). ``x`` is an example's ids without its last token, ``y`` its labels shifted by
    one (the next token, -100 on the prompt), both right-padded to the longest drawn example (pad
    id in ``x``, -100 in ``y``) and cut to ``block_size``. Right padding needs no attention mask:
    under the causal mask no real token attends to the pads that follow it, and the pads carry
    no loss, so ``labkit.train``'s loss on a batch equals ``sft_loss`` on ``pad_batch`` of the
    same examples (tests).

    >>> ex = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [5, 9], "labels": [-100, 9]}]
    >>> data = ChatData(ex, ex, pad_id=0)
    >>> x, y = data.batch("train", 2, 16, torch.Generator().manual_seed(0))   # draws examples 0 and 1
    >>> x.tolist(), y.tolist()
    ([[5, 6, 7], [5, 0, 0]], [[-100, 7, 8], [9, -100, -100]])
    """

    def __init__(self, train: list[dict], val: list[dict], pad_id: int):
        if not train or not val:
            raise ValueError(f"ChatData needs examples in both splits (got {len(train)} train, {len(val)} val)")
        self.examples = {"train": train, "val": val}
        self.pad_id = pad_id

    def split(self, name: str) -> list[dict]:
        if name not in self.examples:
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.examples[name]

    def batch(self, split: str, batch_size: int, block_size: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        examples = self.split(split)
        drawn = [examples[i] for i in torch.randint(len(examples), (batch_size,), generator=generator).tolist()]
        T = min(block_size, max(len(e["input_ids"]) - 1 for e in drawn))
        x = torch.full((batch_size, T), self.pad_id, dtype=torch.long)           # (B, T)
        y = torch.full((batch_size, T), IGNORE_INDEX, dtype=torch.long)          # (B, T)
        for b, e in enumerate(drawn):
            ids, labels = e["input_ids"][:T + 1], e.get("labels", e["input_ids"])[:T + 1]
            x[b, :len(ids) - 1] = torch.tensor(ids[:-1])                        # inputs: all but the last
            y[b, :len(ids) - 1] = torch.tensor(labels[1:])                      # targets: the next token
        return x, y


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
