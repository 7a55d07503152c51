"""Exercises of 08_mixture_of_experts: top-k routing with renormalised gates, the Switch balancing loss."""
import torch

from . import Case, exercise

# --- 08.route -------------------------------------------------------------------------------------


@exercise("08.route", "top-k routing with renormalised gates", output_names=("probs", "gates", "chosen"),
          cases=lambda g: [
              Case(torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g), 2, label="6 tokens, 4 experts, top-2"),
              Case(torch.randn(5, 8, generator=g), torch.randn(8, 8, generator=g), 3, label="8 experts, top-3"),
              Case(torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), 1,
                   label="top-1: a renormalised gate is exactly 1"),
              Case(torch.randn(1, 8, generator=g), torch.randn(4, 8, generator=g), 2, label="one token"),
              Case(torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g), 2, False,
                   label="renormalise=False: Switch Transformer's gate, the raw probability")])
def route(x: torch.Tensor, w_router: torch.Tensor, k: int, renormalise: bool = True):
    """x (N, C), w_router (E, C) -> probs (N, E), gates (N, k), chosen (N, k) expert ids, best first."""
    probs = (x @ w_router.T).softmax(dim=-1)                      # (N, E) a distribution over experts, per token
    top_p, chosen = probs.topk(k, dim=-1)                         # (N, k) the k most probable, best first
    if not renormalise:                                           # Switch Transformer: the raw probability
        return probs, top_p, chosen
    return probs, top_p / top_p.sum(dim=-1, keepdim=True), chosen   # gates of each token sum to 1


@route.mistake("the gates are not renormalised: divide the k chosen probabilities by their sum, so each "
               "token's gates add up to 1 (Mixtral's recipe)")
def _(x, w_router, k, renormalise=True):
    probs = (x @ w_router.T).softmax(dim=-1)
    top_p, chosen = probs.topk(k, dim=-1)
    return probs, top_p, chosen


@route.mistake("the softmax runs over the tokens (dim=0): each token needs a distribution over the EXPERTS, "
               "softmax(dim=-1) of its (E,) scores")
def _(x, w_router, k, renormalise=True):
    probs = (x @ w_router.T).softmax(dim=0)
    top_p, chosen = probs.topk(k, dim=-1)
    return probs, (top_p / top_p.sum(dim=-1, keepdim=True) if renormalise else top_p), chosen


@route.mistake("the chosen expert ids were sorted, but the gates were not reordered with them: gate j must "
               "belong to expert chosen[:, j]. Keep topk's order (best first) for both")
def _(x, w_router, k, renormalise=True):
    probs = (x @ w_router.T).softmax(dim=-1)
    top_p, chosen = probs.topk(k, dim=-1)
    gates = top_p / top_p.sum(dim=-1, keepdim=True) if renormalise else top_p
    return probs, gates, chosen.sort(dim=-1).values


@route.mistake("the renormalise flag is ignored: with renormalise=False the gate is the raw router "
               "probability (Switch Transformer), not the renormalised one")
def _(x, w_router, k, renormalise=True):
    probs = (x @ w_router.T).softmax(dim=-1)
    top_p, chosen = probs.topk(k, dim=-1)
    return probs, top_p / top_p.sum(dim=-1, keepdim=True), chosen


# --- 08.load_balancing_loss -----------------------------------------------------------------------

def _routed(g, N, E, k, logits_shift=None):
    """(probs, chosen, E) of N random tokens routed top-k; logits_shift biases the router."""
    logits = torch.randn(N, E, generator=g) + (0 if logits_shift is None else logits_shift)
    probs = logits.softmax(-1)
    return probs, probs.topk(k, dim=-1).indices, E


@exercise("08.load_balancing_loss", "the Switch load-balancing loss", atol=1e-6, cases=lambda g: [
    Case(*_routed(g, 12, 4, 2), label="12 tokens, 4 experts, top-2"),
    Case(*_routed(g, 10, 4, 1), label="top-1"),
    Case(*_routed(g, 9, 8, 3), label="8 experts, top-3"),
    Case(*_routed(g, 16, 4, 1, torch.tensor([6.0, 0, 0, 0])), label="collapsed: every token to expert 0 (aux -> E)"),
    Case(*_routed(g, 1, 4, 2), label="a single token")])
def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, n_experts: int) -> torch.Tensor:
    """probs (N, E), chosen (N, k) -> scalar E * sum_e f_e * P_e: 1.0 when balanced, up to E when collapsed."""
    f = torch.bincount(chosen.flatten(), minlength=n_experts).float() / chosen.numel()   # (E,) share of the N*k assignments
    P = probs.mean(dim=0)                                         # (E,) mean router probability: the gradient path
    return n_experts * (f * P).sum()


@load_balancing_loss.mistake("f_e must be the share of ASSIGNMENTS (a count over the N*k chosen slots, no "
                             "gradient), not the mean probability: with f = P the loss is E * sum P², another quantity")
def _(probs, chosen, n_experts):
    P = probs.mean(dim=0)
    return n_experts * (P * P).sum()


@load_balancing_loss.mistake("the factor E (n_experts) is missing: E * sum f_e P_e is 1.0 when balanced whatever "
                             "the number of experts; without E it is 1/E")
def _(probs, chosen, n_experts):
    f = torch.bincount(chosen.flatten(), minlength=n_experts).float() / chosen.numel()
    return (f * probs.mean(dim=0)).sum()


@load_balancing_loss.mistake("the counts are divided by the number of TOKENS N, not of assignments N*k: with "
                             "top-k the shares then sum to k, not 1 (use chosen.numel())")
def _(probs, chosen, n_experts):
    f = torch.bincount(chosen.flatten(), minlength=n_experts).float() / chosen.shape[0]
    return n_experts * (f * probs.mean(dim=0)).sum()


@load_balancing_loss.mistake("P_e is summed over the tokens instead of averaged: it must be a mean (probs.mean(0)) "
                             "so that sum_e P_e = 1 and a balanced router scores 1.0 at any batch size")
def _(probs, chosen, n_experts):
    f = torch.bincount(chosen.flatten(), minlength=n_experts).float() / chosen.numel()
    return n_experts * (f * probs.sum(dim=0)).sum()
