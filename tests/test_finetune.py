"""Fine-tuning plumbing: the prompt mask scores exactly the assistant turn (= trl's), padding changes
nothing, batched log-probs = a loop, sampling, and the KL estimators against the exact KL."""
import warnings

import pytest
import torch

import labkit
from labkit.assets import AssetUnavailableError, asset_dir
from labkit.finetune import (IGNORE_INDEX, ChatData, batch_losses, char_data_with, chat_data, completion_logprobs,
                             encode_chat, encode_plain, example_from_ids, generate, kl_estimates, mean_loss, pad_batch,
                             sft_loss)

EXAMPLES = [  # (prompt, response): short, multi-line code, leading/trailing spaces, unicode, a number
    ("What is AI?", "The science of making machines think."),
    ("can you write hello world in Python?", "Here it is:\n\n```\nprint('hello world')\n```"),
    ("  spaces around  ", "Sort of.  "),
    ("Which U.S. state has “Garden State” as its nickname?", "New Jersey — since 1876."),
    ("In what year were the first Air Jordan sneakers released?", "1984"),
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(asset_dir("smollm2-135m") / "hf")


def scored_text(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])


def test_prompt_mask_scores_exactly_the_assistant_turn(tok):
    for prompt, response in EXAMPLES:
        ex = encode_chat(tok, prompt, response)
        assert len(ex["input_ids"]) == len(ex["labels"])
        # the response, its end-of-turn token (the model must learn to stop) and the template's newline
        assert scored_text(tok, ex) == response + "<|im_end|>\n", (prompt, scored_text(tok, ex))
        n_prompt = ex["labels"].index(next(t for t in ex["labels"] if t != IGNORE_INDEX))
        assert tok.decode(ex["input_ids"][:n_prompt]).endswith(f"{prompt}<|im_end|>\n<|im_start|>assistant\n")
        assert all(t == IGNORE_INDEX for t in ex["labels"][:n_prompt])
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
        unmasked = encode_chat(tok, prompt, response, mask_prompt=False)
        assert unmasked["labels"] == unmasked["input_ids"] == ex["input_ids"]


def test_prompt_mask_on_every_chatterbot_pair(tok):
    try:
        pairs = labkit.load_chat_pairs()
    except AssetUnavailableError:
        pytest.skip("chatterbot asset not cached and PyPI unreachable")
    for p in pairs:
        assert scored_text(tok, encode_chat(tok, p["prompt"], p["response"])) == p["response"] + "<|im_end|>\n"


def test_a_response_that_starts_with_whitespace_warns_and_is_scored_from_the_divergence(tok):
    # "\n" + "  Sort" tokenizes as "\n  " + "Sort": the prompt's last token ("\n") is not a prefix.
    # Like trl, score from where the two tokenizations diverge, and say so.
    with pytest.warns(UserWarning, match="not a prefix"):
        ex = encode_chat(tok, "Hi", "  Sort of.")
    assert scored_text(tok, ex) == "\n  Sort of.<|im_end|>\n"


def test_system_prompt_multi_turn_and_truncation(tok):
    ex = encode_chat(tok, "Hi", "Hello!", system="Be brief.")
    text = tok.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "SmolLM" not in text
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Your name?"}]
    ex = encode_chat(tok, turns, "LabBot.")
    assert scored_text(tok, ex) == "LabBot.<|im_end|>\n", "earlier assistant turns are context, not scored"
    full = encode_chat(tok, "What is AI?", "The science of making machines think.")
    n_prompt = sum(t == IGNORE_INDEX for t in full["labels"])
    cut = encode_chat(tok, "What is AI?", "The science of making machines think.", max_length=n_prompt + 3)
    assert cut["input_ids"] == full["input_ids"][:n_prompt + 3] and sum(t != IGNORE_INDEX for t in cut["labels"]) == 3
    with pytest.raises(ValueError, match="leaves no response token to score.*max_length"):
        encode_chat(tok, "What is AI?", "The science.", max_length=n_prompt)


def test_masking_equals_trl_prompt_completion_format(tok, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": r}]}
            for p, r in EXAMPLES + [("Hi", "  Sort of.")]]
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, gradient_checkpointing=False, report_to=[],
                     use_cpu=True, max_length=None)
    trainer = SFTTrainer(model=tiny, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    for (prompt, response), row in zip(EXAMPLES + [("Hi", "  Sort of.")], trainer.train_dataset):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # the leading-whitespace case warns (see above)
            ours = encode_chat(tok, prompt, response)
        assert ours["input_ids"] == row["input_ids"], prompt
        assert ours["labels"] == row["labels"], prompt


# ----------------------------------------------------------------------------- batches and log-probs

def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def random_examples(n=5, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        n_p, n_c = 2 + i, 6 - i
        ids = torch.randint(3, vocab, (n_p + n_c,), generator=g).tolist()
        out.append(example_from_ids(ids[:n_p], ids[n_p:]))
    return out


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_batched_logprobs_equal_a_loop_and_hf_loss(which):
    if which == "tiny":
        model, examples = tiny_llama(), random_examples()
    else:
        model, tok = labkit.load_model()
        examples = [encode_chat(tok, p, r) for p, r in EXAMPLES[:3]]
    batch = pad_batch(examples, pad_id=0)
    with torch.no_grad():
        total, per_token, mask = completion_logprobs(model, batch)
        for i, ex in enumerate(examples):                   # the straightforward loop: one sequence at a time
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
            want = [logp[t, ex["input_ids"][t + 1]].item() for t in range(len(ex["input_ids"]) - 1)
                    if ex["labels"][t + 1] != IGNORE_INDEX]
            got = per_token[i][mask[i]].tolist()
            assert got == pytest.approx(want, abs=1e-4), f"example {i}"
            assert total[i].item() == pytest.approx(sum(want), abs=1e-3)
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        assert sft_loss(model, batch).item() == pytest.approx(hf.item(), abs=1e-5)
    assert mask.sum().item() == sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in examples)


def test_completion_logprobs_carry_gradients_and_left_padding_also_works():
    model = tiny_llama()
    examples = random_examples()
    total, _, _ = completion_logprobs(model, pad_batch(examples, pad_id=0))
    total.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    with torch.no_grad():
        right = completion_logprobs(model, pad_batch(examples, pad_id=0))[0]
        left = completion_logprobs(model, pad_batch(examples, pad_id=0, padding_side="left"))[0]
    # left padding shifts every position by the pad count; RoPE only sees position differences
    assert torch.allclose(right, left, atol=1e-4), f"left vs right padding: {(right - left).abs().max():.2e}"


def test_generate_batched_greedy_equals_one_by_one():
    model, tok = labkit.load_model()
    prompts = ["What is the capital of France?", "Say hello."]
    both = generate(model, tok, prompts, max_new_tokens=8, temperature=0)
    for prompt, result in zip(prompts, both):
        alone = generate(model, tok, prompt, max_new_tokens=8, temperature=0)[0]
        assert alone["completion_ids"] == result["completion_ids"], "left padding must not change a completion"
        assert len(result["completion_ids"]) <= 8
        if tok.eos_token_id in result["completion_ids"]:
            assert result["completion_ids"][-1] == tok.eos_token_id
    a = generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    b = generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    assert a == b, "the same seed gives the same samples"
    assert not model.training


# ----------------------------------------------------------------------------- KL estimators

def exact_expectations(p, q):
    """E_{x~p}[k] for k1, k2, k3 computed exactly over the support, and KL(p || q)."""
    logp, logq = p.log(), q.log()
    est = kl_estimates(logp, logq)
    return {k: (p * v).sum().item() for k, v in est.items()}, (p * (logp - logq)).sum().item()


@pytest.mark.parametrize("seed", range(5))
def test_k1_and_k3_are_unbiased_k2_is_not(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 1.5, 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 1.5, 0)
    mean, kl = exact_expectations(p, q)
    assert mean["k1"] == pytest.approx(kl, abs=1e-12) and mean["k3"] == pytest.approx(kl, abs=1e-12)
    assert abs(mean["k2"] - kl) > 0.02 * kl, "k2 is biased: its mean misses the KL of distant distributions (by 4-40% here)"
    assert (kl_estimates(p.log(), q.log())["k3"] >= 0).all()


def test_monte_carlo_means_and_variances_match_schulmans_note():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(8, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(p.log() + 0.1 * torch.randn(8, generator=g, dtype=torch.float64), 0)   # close: KL small
    kl = (p * (p.log() - q.log())).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)        # tokens sampled from the policy p
    est = kl_estimates(p.log()[x], q.log()[x])
    for k in ("k1", "k3"):
        se = est[k].std().item() / len(x) ** 0.5
        assert abs(est[k].mean().item() - kl) < 5 * se, f"{k}: mean {est[k].mean():.5f} vs KL {kl:.5f} (se {se:.1e})"
    # near the reference, k2 and k3 have far lower variance than k1 (the note's point); k2's bias is small
    assert est["k3"].std() < 0.1 * est["k1"].std() and est["k2"].std() < 0.1 * est["k1"].std()   # measured 0.03
    assert abs(est["k2"].mean().item() - kl) < 0.1 * kl


# ----------------------------------------------------------------------------- ChatData (track A's training data)

def test_chat_batches_shift_by_one_mask_the_prompt_and_never_score_padding():
    examples = random_examples()
    data = ChatData(examples, examples[:1], pad_id=0)
    x, y = data.batch("train", 16, 64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape and x.shape[1] == max(len(e["input_ids"]) for e in examples) - 1
    by_ids = {tuple(e["input_ids"][:-1]): e for e in examples}
    for xi, yi in zip(x.tolist(), y.tolist()):
        n = next(len(k) for k in by_ids if list(k) == xi[:len(k)] and all(t == 0 for t in xi[len(k):]))
        e = by_ids[tuple(xi[:n])]
        assert yi[:n] == e["labels"][1:], "y[t] is the label of token t+1 (-100 on the prompt)"
        assert all(t == IGNORE_INDEX for t in yi[n:]), "padding is never scored"
    x, y = data.batch("train", 4, 3, torch.Generator().manual_seed(0))
    assert x.shape == (4, 3), "block_size cuts every example to at most that many predictions"
    with pytest.raises(ValueError, match="split must be"):
        data.batch("test", 1, 8)


def test_chat_batch_loss_equals_sft_loss_on_the_same_examples():
    """lm_loss on ChatData's (x, y) (what labkit.train computes) = sft_loss on pad_batch (HF's shift)."""
    from labkit.train import lm_loss
    model, examples = tiny_llama(), random_examples()
    data = ChatData(examples, [], pad_id=0)
    g = torch.Generator().manual_seed(3)
    picked = torch.randint(len(examples), (6,), generator=torch.Generator().manual_seed(3)).tolist()
    x, y = data.batch("train", 6, 64, g)
    with torch.no_grad():
        ours = lm_loss(model, x, y).item()
        theirs = sft_loss(model, pad_batch([examples[i] for i in picked], pad_id=0)).item()
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_fixed_batches_cover_the_split_once_and_mean_loss_weights_by_tokens():
    model, examples = tiny_llama(), random_examples(n=5)
    data = ChatData([], examples, pad_id=0)
    batches = data.fixed_batches("val", 2, 64)
    assert [x.shape[0] for x, _ in batches] == [2, 2, 1]
    assert sum(int((y != IGNORE_INDEX).sum()) for _, y in batches) == data.scored_tokens("val")
    assert len(data.fixed_batches("val", 2, 64, limit=3)) == 2
    with torch.no_grad():
        per_example = [sft_loss(model, pad_batch([e], pad_id=0)).item() for e in examples]
    counts = [sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in examples]
    want = sum(l * n for l, n in zip(per_example, counts)) / sum(counts)      # the loss over every scored token
    assert mean_loss(model, batches) == pytest.approx(want, abs=1e-5)
    assert mean_loss(model, data.fixed_batches("val", 5, 64)) == pytest.approx(want, abs=1e-5)
    losses, tokens = batch_losses(model, batches)
    assert tokens == [sum(counts[:2]), sum(counts[2:4]), counts[4]] and len(losses) == 3


def test_chat_data_splits_by_prompt_and_scores_the_response(tok):
    pairs = [{"prompt": f"Question {i % 7}?", "response": f"Answer number {i}."} for i in range(40)]
    data = chat_data(tok, pairs, val_fraction=0.3, seed=1, max_length=48)
    decode_prompt = lambda e: tok.decode(e["input_ids"]).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert all(decode_prompt(e) == e["prompt"] for e in data.train + data.val)
    train_prompts, val_prompts = ({e["prompt"] for e in data.train}, {e["prompt"] for e in data.val})
    assert train_prompts and val_prompts and not train_prompts & val_prompts, "a prompt lives in one split only"
    assert len(data.train) + len(data.val) == 40 and len(val_prompts) == 2       # round(0.3 * 7) prompts held out
    assert scored_text(tok, data.train[0]).startswith("Answer number")
    assert data.scored_tokens("train") == sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in data.train)
    assert chat_data(tok, pairs, val_fraction=0.3, seed=1).val == chat_data(tok, pairs, val_fraction=0.3, seed=1).val
    long = [{"prompt": "word " * 100, "response": "ok"}] + pairs
    assert len(chat_data(tok, long, max_length=48).train) + len(chat_data(tok, long, max_length=48).val) == 40, \
        "a pair whose prompt fills max_length is dropped"
    with pytest.raises(ValueError, match="val_fraction"):
        chat_data(tok, pairs, val_fraction=1.0)


def test_plain_format_and_a_char_vocabulary_that_covers_the_chat_text():
    try:
        general = char_data_with("“curly” #%", max_chars=20_000)
    except AssetUnavailableError:
        pytest.skip("shakespeare is not cached")
    tok = general.tokenizer
    assert tok.decode(tok.encode("“curly” #%")) == "“curly” #%"
    ex = encode_plain(tok, "Why?", "Because.")
    assert tok.decode(ex["input_ids"]) == "Q: Why?\nA: Because.\n"
    assert tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX]) == " Because.\n"
    assert len(general.val) > 1000 and general.batch("val", 2, 16)[0].shape == (2, 16)


def test_a_labkit_gpt_learns_plain_chat_data():
    from labkit.data import CharTokenizer
    from labkit.gpt import GPT, GPTConfig
    from labkit.train import TrainConfig, evaluate, train
    pairs = [{"prompt": f"{a}+{b}", "response": str(a + b)} for a in range(10) for b in range(10)]
    tok = CharTokenizer("Q: A\n+0123456789")
    data = chat_data(tok, pairs, val_fraction=0.2)
    assert all(all(t == IGNORE_INDEX for t in e["labels"][:len("Q: 1+2\nA:")]) for e in data.train)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32))
    cfg = TrainConfig(steps=60, batch_size=16, block_size=16, lr=3e-3, warmup_steps=5, eval_batches=2)
    before = evaluate(model, data, cfg)
    history = train(model, data, cfg, progress=False)
    assert history["val_loss"][-1] < 0.7 * before, (before, history["val_loss"][-1])
