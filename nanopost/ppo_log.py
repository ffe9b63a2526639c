"""
What a PPO run logs: each iteration's train record (this rank's sums over responses, tokens and minibatch
updates, summed over ranks and divided), its printed line, and the held-out evaluation at start, intervals and end.
"""

import math

import torch

from nanopost.distributed import all_reduce_max, print0, sum_over_ranks

# the record's keys printed on each step's line (all of them go to log.jsonl)
SHOWN = ("score", "gold", "kl", "kl_full", "kl_coef", "entropy", "approx_kl", "clipfrac",
         "pg_loss", "v_loss", "explained_var", "resp_len", "ended", "logprob_diff", "tok_per_s")


def train_record(step, kl_coef, samples, scores, gold, update_sums, n_updates, t_rollout, t_learn, logprobs,
                 ref_logprobs, full_kl, kl, entropy, returns=None, values=None):
    """One iteration's record from this rank's rollout `samples` (nanopost.rollout.Rollout); scores: B raw floats
    (before missing_eos_penalty); gold: (B,) float64 or None; update_sums: {name: sum over the n_updates
    minibatches}; (B, N) each: the recomputed logprobs and ref_logprobs, full_kl, kl (the penalised estimate),
    entropy, and with a value model its returns and values (explained_var). KLs are per response, entropy per
    token. Collective: every rank calls it."""
    mask = samples.response_mask  # (B, N) bool
    ended = samples.ended.to(mask.device)  # (B,) bool
    # sampling and recomputation agree up to kernel noise; a gap is a temperature, position or padding bug
    logprob_gap = (logprobs - samples.logprobs.to(mask.device)).abs()  # (B, N)
    logprob_diff = torch.where(mask, logprob_gap, 0.0).max()
    per_token = dict(kl=logprobs - ref_logprobs, kl_full=full_kl, kl_penalised=kl, entropy=entropy)
    if values is not None:
        err = returns - values  # (B, N) what the value model missed
        per_token.update(ret=returns, ret_sq=returns ** 2, err=err, err_sq=err ** 2)
    b_raw = torch.tensor(scores, dtype=torch.float64, device=mask.device)  # (B,)
    sums = {k: torch.where(mask, v, 0.0).double().sum() for k, v in per_token.items()}
    sums.update(n_resp=b_raw.new_tensor(mask.shape[0]), n_tok=mask.double().sum(), score=b_raw.sum(),
                score_sq=(b_raw * b_raw).sum(), ended=ended.double().sum(), **update_sums)
    if gold is not None:
        sums.update(gold=gold.sum())
    total = sum_over_ranks(sums)
    n_resp, n_tok, dt = total["n_resp"], total["n_tok"], t_rollout + t_learn
    mean_score = total["score"] / n_resp
    record = dict(kind="train", step=step,
                  **{k: total[k] / n_resp for k in ("score", "kl", "kl_full", "kl_penalised")},
                  score_std=math.sqrt(max(total["score_sq"] / n_resp - mean_score ** 2, 0.0)),
                  kl_coef=kl_coef, entropy=total["entropy"] / n_tok,
                  **{k: total[k] / n_updates for k in update_sums},
                  resp_len=n_tok / n_resp, ended=total["ended"] / n_resp, n_responses=int(n_resp),
                  logprob_diff=all_reduce_max(logprob_diff.double()).item(),
                  tok_per_s=n_tok / dt, t_rollout=t_rollout, t_learn=t_learn)
    record["ratio_var"] = record.pop("ratio_sq") - record["ratio_mean"] ** 2
    if "err" in per_token:  # gae
        var_ret, var_err = (total[k + "_sq"] / n_tok - (total[k] / n_tok) ** 2 for k in ("ret", "err"))
        record["explained_var"] = (1.0 - var_err / var_ret) if var_ret > 0 else float("nan")
    if gold is not None:  # the verifier beside the reward model: where proxy and truth part
        record["gold"] = total["gold"] / n_resp
    return record


def log_train(log, max_iters, record):
    """Print the record's SHOWN values on one line (rank 0) and append it to the run log."""
    dt = record["t_rollout"] + record["t_learn"]
    print0(f"step {record['step']}/{max_iters} | "
           + " | ".join(f"{k} {record[k]:.4g}" for k in SHOWN if k in record)
           + f" | {dt:.2f}s (rollout {100 * record['t_rollout'] / dt:.0f}%)")
    log.write(record)


def final_report(evaluate, start, step, seconds, first):
    """The end of a run: the iterations it trained in how long (evals excluded); then, if it trained, the last
    evaluate(step), printed beside the first on rank 0 (the other ranks hold neither)."""
    print0(f"trained iterations {start}..{step} in {seconds / 60:.1f} min (evals excluded)")
    last = evaluate(step) if step > start else first
    if first and last:
        print0("eval before -> after: " + " | ".join(
            f"{k} {first[k]:.4f} -> {last[k]:.4f}" for k in last if k in first))
