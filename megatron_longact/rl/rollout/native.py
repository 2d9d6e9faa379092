"""Native generation with the megatron policy itself: no weight copy, KV cache, batched.

Prompts are left-padded so every row decodes in lockstep; a padding-aware causal mask keeps
pads out of attention and position ids start at each prompt's first real token. The KV cache
is megatron's ``StaticInferenceContext``. Works on CPU (local attention) and GPU, at any TP;
pipeline parallel generation is not supported (use vLLM for PP > 1).
"""

from __future__ import annotations

import torch

from megatron_longact.rl.rollout.types import Rollout, SamplingParams


def sample_next(
    logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples one token per row from ``logits`` [b, V] (fp32).

    Returns ``(tokens [b] int64, logprobs [b])`` where the log-probability is under the
    temperature-scaled distribution (before top-p truncation, as verl/vLLM report it).
    ``temperature`` 0 is greedy decoding (log-probs then at temperature 1).
    """
    if temperature == 0:
        logprobs_all = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)
    logprobs_all = torch.log_softmax(logits / temperature, dim=-1)
    probs = logprobs_all.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    tokens = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)


class NativeEngine:
    """Generates with a (DDP-wrapped) megatron GPTModel chunk. See module docstring."""

    def __init__(self, model, *, pad_token_id: int, batch_size: int = 64):
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError(
                "rl.engine=native does not support pipeline parallel; use "
                "parallel.pipeline_model_parallel_size=1 or rl.engine=vllm"
            )
        from megatron_longact.runtime.setup import unwrap_gpt

        self.model = unwrap_gpt(model)
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def sleep(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Nothing to do: the engine reads the trainer's parameters directly."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """One response per prompt, in input order; batches of ``batch_size``."""
        results: list[Rollout] = []
        generator = torch.Generator().manual_seed(params.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                results.extend(self._generate_batch(chunk, params, generator))
        finally:
            self.model.train(was_training)
        return results

    @torch.no_grad()
    def _generate_batch(self, prompts, params: SamplingParams, generator) -> list[Rollout]:
        from megatron.core.inference.contexts import StaticInferenceContext

        batch = len(prompts)
        prompt_len = max(len(p) for p in prompts)
        total = prompt_len + params.max_new_tokens
        tokens = torch.full((batch, total), self.pad_token_id, dtype=torch.long)
        valid = torch.zeros(batch, total, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens[row, prompt_len - len(prompt) : prompt_len] = torch.tensor(prompt)
            valid[row, prompt_len - len(prompt) : prompt_len] = True
        valid[:, prompt_len:] = True  # generated positions; finished rows are cut afterwards
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        tokens, valid, positions = (t.to(self.device) for t in (tokens, valid, positions))
        stop_ids = torch.tensor(list(params.stop_token_ids) or [-1], device=self.device)

        context = StaticInferenceContext(batch, total)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        lengths = torch.full((batch,), params.max_new_tokens, dtype=torch.long)
        logprobs = torch.zeros(batch, params.max_new_tokens)
        start, end = 0, prompt_len
        for step in range(params.max_new_tokens):
            logits = self.model(
                input_ids=tokens[:, start:end],
                position_ids=positions[:, start:end],
                attention_mask=_padded_causal_mask(valid, start, end),
                inference_context=context,
                runtime_gather_output=True,
            )
            context.sequence_len_offset += end - start
            next_tokens, next_logprobs = sample_next(
                logits[:, -1].float(),
                temperature=params.temperature,
                top_p=params.top_p,
                generator=generator,
            )
            next_tokens = torch.where(finished, self.pad_token_id, next_tokens)
            tokens[:, end] = next_tokens
            logprobs[:, step] = next_logprobs.cpu()
            just_stopped = ~finished & torch.isin(next_tokens, stop_ids)
            lengths[just_stopped.cpu()] = step + 1
            finished |= just_stopped
            if bool(finished.all()):
                break
            start, end = end, end + 1
        rollouts = []
        for row, prompt in enumerate(prompts):
            n = int(lengths[row])
            rollouts.append(
                Rollout(
                    prompt_ids=list(prompt),
                    response_ids=tokens[row, prompt_len : prompt_len + n].tolist(),
                    logprobs=logprobs[row, :n].tolist(),
                    finish_reason="stop"
                    if n < params.max_new_tokens
                    or bool(torch.isin(tokens[row, prompt_len + n - 1], stop_ids))
                    else "length",
                )
            )
        return rollouts


def _padded_causal_mask(valid: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[b, 1, end-start, end] bool, True = masked out: causal, and no attention to pads."""
    keys = torch.arange(end, device=valid.device)
    queries = torch.arange(start, end, device=valid.device)
    future = keys[None, :] > queries[:, None]
    return (future[None] | ~valid[:, None, :end]).unsqueeze(1)
