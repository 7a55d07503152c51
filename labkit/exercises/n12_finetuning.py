"""Exercises of 12_finetuning_and_rlhf: the prompt mask of SFT labels, the KL-penalised reward of
RLHF, and the DPO loss."""
import torch
import torch.nn.functional as F

from . import Case, exercise

IGNORE = -100   # cross_entropy's ignore_index: a label the loss skips

# --- 12.sft_labels --------------------------------------------------------------------------------


def _ids(rows, pad=0):
    """Right-padded ids (B, T) and attention mask from lists of ids."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return ids, mask


def _sft_cases(g):
    ids, mask = _ids([[11, 12, 13, 21, 22, 2], [11, 14, 23, 2]])
    full, full_mask = _ids([[11, 12, 21, 22, 23, 2], [11, 12, 13, 14, 24, 2]])
    one, one_mask = _ids([[11, 12, 13, 14, 15, 2], [11, 12, 13, 2]])
    rnd = torch.randint(3, 50, (3, 9), generator=g)
    rnd_mask = torch.tensor([[1] * 9, [1] * 7 + [0] * 2, [1] * 5 + [0] * 4])
    rnd = rnd * rnd_mask
    return [
        Case(ids, torch.tensor([3, 2]), mask, label="two right-padded rows, prompts of 3 and 2 tokens"),
        Case(full, torch.tensor([2, 4]), full_mask, label="no padding"),
        Case(one, torch.tensor([5, 3]), one_mask, label="a single response token per row (the end-of-turn token)"),
        Case(rnd, torch.tensor([4, 2, 3]), rnd_mask, label="three rows of random ids with 0, 2 and 4 pads"),
    ]


@exercise("12.sft_labels", "the prompt mask of SFT labels", cases=_sft_cases)
def sft_labels(input_ids: torch.Tensor, prompt_lens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels (B, T) for supervised fine-tuning: the input ids where a token is a response token,
    -100 on the prompt (the first prompt_lens[b] tokens of row b) and on padding (attention 0).
    Not shifted: the loss shifts them (position t predicts token t + 1)."""
    T = input_ids.shape[1]
    position = torch.arange(T)[None, :]                              # (1, T)
    is_response = position >= prompt_lens[:, None]                   # (B, T): at or after the prompt's end
    scored = is_response & attention_mask.bool()                     # padding is never scored
    return input_ids.masked_fill(~scored, IGNORE)


@sft_labels.mistake("the prompt tokens are scored: only padding was masked. The model is then also trained "
                    "to write the user's question; set the first prompt_lens[b] labels of row b to -100")
def _(input_ids, prompt_lens, attention_mask):
    return input_ids.masked_fill(~attention_mask.bool(), IGNORE)


@sft_labels.mistake("padding is scored: masking the prompt is not enough, pad tokens (attention_mask 0) "
                    "must get -100 too, or the model learns to predict pad after the end")
def _(input_ids, prompt_lens, attention_mask):
    position = torch.arange(input_ids.shape[1])[None, :]
    return input_ids.masked_fill(position < prompt_lens[:, None], IGNORE)


@sft_labels.mistake("off by one: the first response token is masked too (position > prompt_len instead of >=). "
                    "Token prompt_lens[b] is the first one the model must learn to produce")
def _(input_ids, prompt_lens, attention_mask):
    position = torch.arange(input_ids.shape[1])[None, :]
    scored = (position > prompt_lens[:, None]) & attention_mask.bool()
    return input_ids.masked_fill(~scored, IGNORE)


@sft_labels.mistake("the labels are shifted by one: leave them aligned with input_ids. The loss shifts them "
                    "itself (logits at t are scored against labels at t + 1), so shifting here shifts twice")
def _(input_ids, prompt_lens, attention_mask):
    position = torch.arange(input_ids.shape[1])[None, :]
    scored = (position >= prompt_lens[:, None]) & attention_mask.bool()
    labels = input_ids.masked_fill(~scored, IGNORE)
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)


@sft_labels.mistake("the mask is inverted: the prompt is scored and the response is masked. Keep the tokens "
                    "at positions >= prompt_lens[b] (the answer) and set the prompt to -100")
def _(input_ids, prompt_lens, attention_mask):
    position = torch.arange(input_ids.shape[1])[None, :]
    scored = (position < prompt_lens[:, None]) & attention_mask.bool()
    return input_ids.masked_fill(~scored, IGNORE)


# --- 12.kl_penalised_reward -----------------------------------------------------------------------

def _kl_cases(g):
    B, T = 4, 6
    logp = -3 * torch.rand(B, T, generator=g)
    logp_ref = -3 * torch.rand(B, T, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5, [1] * 3 + [0] * 3]).bool()
    reward = torch.tensor([2.0, 0.0, 1.0, 3.0])
    same = logp.clone()
    return [
        Case(reward, logp, logp_ref, mask, 0.1, label="four completions of 6, 4, 1 and 3 tokens, beta 0.1"),
        Case(reward, logp, logp_ref, mask, 0.0, label="beta = 0: the reward alone (no penalty)"),
        Case(reward, logp, same, mask, 0.5, label="policy = reference: the KL is 0, the reward is unchanged"),
        Case(torch.tensor([1.0, -1.0]), torch.tensor([[-0.1, -0.2, -5.0], [-1.0, -2.0, -3.0]]),
             torch.tensor([[-2.0, -2.0, -1.0], [-1.0, -1.0, -9.0]]),
             torch.tensor([[True, True, False], [True, True, True]]), 2.0,
             label="beta 2, a masked token whose log-probs differ a lot"),
    ]


@exercise("12.kl_penalised_reward", "the KL-penalised reward of RLHF", cases=_kl_cases)
def kl_penalised_reward(reward: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                        beta: float) -> torch.Tensor:
    """r(x) - beta * KL estimate, per completion (B,).

    reward (B,); logp, logp_ref (B, T): log-probs of the sampled tokens under the policy and the
    frozen reference; mask (B, T) True on the completion's tokens. The sequence's KL estimate is
    the sum over its tokens of log pi(token) - log pi_ref(token) (its mean over samples is the KL).
    """
    kl = ((logp - logp_ref) * mask).sum(dim=-1)       # (B,): log pi(x) / pi_ref(x) of each completion
    return reward - beta * kl


@kl_penalised_reward.mistake("the KL has the wrong sign (logp_ref - logp): that pays the policy for moving "
                             "AWAY from the reference. The penalty is + beta * (logp - logp_ref), subtracted")
def _(reward, logp, logp_ref, mask, beta):
    return reward - beta * ((logp_ref - logp) * mask).sum(-1)


@kl_penalised_reward.mistake("beta multiplies the reward instead of the KL: r - beta * KL, not beta * r - KL "
                             "(beta = 0 must give the plain reward)")
def _(reward, logp, logp_ref, mask, beta):
    return beta * reward - ((logp - logp_ref) * mask).sum(-1)


@kl_penalised_reward.mistake("the mask is ignored: tokens after the completion's end (padding) are counted in "
                             "the KL. Multiply (logp - logp_ref) by mask before summing")
def _(reward, logp, logp_ref, mask, beta):
    return reward - beta * (logp - logp_ref).sum(-1)


@kl_penalised_reward.mistake("the KL is averaged over tokens instead of summed: KL(pi || pi_ref) of a completion "
                             "is the sum of its per-token log-ratios (log of a product of probabilities)")
def _(reward, logp, logp_ref, mask, beta):
    return reward - beta * ((logp - logp_ref) * mask).sum(-1) / mask.sum(-1).clamp_min(1)


# --- 12.dpo_loss ----------------------------------------------------------------------------------

def _dpo_cases(g):
    B = 5
    pc, pr, rc, rr = (-20 * torch.rand(B, generator=g) - 5 for _ in range(4))
    zeros = torch.full((3,), -12.0)
    return [
        Case(pc, pr, rc, rr, 0.1, label="five random pairs, beta 0.1"),
        Case(pc, pr, rc, rr, 1.0, label="beta 1"),
        Case(zeros, zeros - 3, zeros, zeros - 3, 0.1, label="policy = reference: loss ln 2 = 0.6931, rewards 0"),
        Case(torch.tensor([-10.0, -200.0]), torch.tensor([-200.0, -10.0]), torch.tensor([-50.0, -50.0]),
             torch.tensor([-50.0, -50.0]), 1.0,
             label="huge margins (+-190 nats): a naive log(sigmoid(x)) gives inf"),
    ]


@exercise("12.dpo_loss", "the DPO loss", cases=_dpo_cases, output_names=("losses", "chosen_rewards", "rejected_rewards"))
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float):
    """DPO's per-pair loss and implicit rewards, all (B,), from summed log-probs of each completion.

    reward = beta * (log pi(y|x) - log pi_ref(y|x)); loss = -log sigmoid(reward_chosen - reward_rejected).
    """
    chosen_logratio = policy_chosen - ref_chosen              # (B,): how much more likely than under the reference
    rejected_logratio = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))   # stable for any margin
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


@dpo_loss.mistake("beta is applied outside the log-sigmoid (-beta * logsigmoid(margin)): it must scale the "
                  "margin inside, -logsigmoid(beta * margin); at policy = reference the loss must be ln 2 for any beta")
def _(pc, pr, rc, rr, beta):
    cl, rl = pc - rc, pr - rr
    return -beta * F.logsigmoid(cl - rl), beta * cl, beta * rl


@dpo_loss.mistake("chosen and rejected are swapped: the loss must fall when the CHOSEN completion gains "
                  "log-probability relative to the reference (margin = chosen - rejected)")
def _(pc, pr, rc, rr, beta):
    cl, rl = pc - rc, pr - rr
    return -F.logsigmoid(beta * (rl - cl)), beta * cl, beta * rl


@dpo_loss.mistake("the reference model is missing: the implicit reward is beta * (log pi - log pi_ref), "
                  "a log-RATIO; without pi_ref the loss is not ln 2 at the start and nothing holds the policy near it")
def _(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * (pc - pr)), beta * pc, beta * pr


@dpo_loss.mistake("computed log(sigmoid(x)): sigmoid underflows to 0 for x below about -88 and the loss is inf. "
                  "Use F.logsigmoid(x), which is exact for any x")
def _(pc, pr, rc, rr, beta):
    cl, rl = pc - rc, pr - rr
    return -torch.log(torch.sigmoid(beta * (cl - rl))), beta * cl, beta * rl


@dpo_loss.mistake("the rewards lack beta: DPO's implicit reward is beta * (log pi - log pi_ref), the quantity "
                  "TRL logs as rewards/chosen and rewards/rejected")
def _(pc, pr, rc, rr, beta):
    cl, rl = pc - rc, pr - rr
    return -F.logsigmoid(beta * (cl - rl)), cl, rl
