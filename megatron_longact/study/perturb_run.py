"""The perturbation experiment end to end: M on calibration prompts, then for each arm the
held-out perplexity, retrieval accuracy and repetition rate; a markdown table and a JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_longact.errors import UserError
from megatron_longact.longact.profile import save_saliency
from megatron_longact.study import probe_tasks
from megatron_longact.study.hf_model import (
    chat_ids,
    greedy,
    load_hf,
    per_sample_saliency,
    profile_from_samples,
)
from megatron_longact.study.perturb import ARMS, clamp_hooks, clamp_masks, repetition_rate

ARM_LABELS = {
    "none": "unperturbed",
    "massive": "w/o high-magnitude (top-λ clamped)",
    "min": "w/o non-high-magnitude (bottom-λ clamped)",
    "random": "random λ clamped",
}


@dataclass(kw_only=True)
class PerturbRunConfig:
    """Settings of ``longact perturb`` (defaults: SmolLM2-135M on 2 CPU cores, ~15 min)."""

    model_dir: str
    """Local HF folder (``longact import-gguf --out DIR`` makes one)."""
    out_dir: str
    """Where perturb.json, perturb.md and saliency.safetensors go."""
    arms: tuple[str, ...] = ARMS
    """Which channels to clamp: none (baseline), massive, min, random."""
    ratio: float = 0.3
    """λ: share of each head's dims clamped (the paper's 30%)."""
    seed: int = 0
    """Seeds the random arm's draw and the probe data (eval uses seed, calibration seed + 1)."""
    context_tokens: int = 1024
    """Document length of the retrieval prompts, tokens."""
    num_facts: int = 4
    """Key-value facts per document."""
    num_eval: int = 24
    """Held-out retrieval questions per arm."""
    num_profile: int = 8
    """Calibration prompts M is measured on (disjoint from the eval ones)."""
    ppl_windows: int = 6
    """Held-out text windows for perplexity."""
    ppl_tokens: int = 512
    """Tokens per perplexity window."""
    answer_new_tokens: int = 16
    """Greedy tokens generated per retrieval question."""
    open_new_tokens: int = 64
    """Greedy tokens generated per open-ended prompt (for the repetition rate)."""
    num_open: int = 4
    """Open-ended prompts per arm (of :data:`probe_tasks.OPEN_PROMPTS`)."""
    ngram: int = 3
    """n of the repeated-n-gram rate."""
    threads: int = 0
    """torch CPU threads (0: leave torch's default)."""


@dataclass(kw_only=True)
class ArmResult:
    arm: str
    perplexity: float
    accuracy: float
    correct: int
    total: int
    repetition: float
    seconds: float
    examples: list[dict] = field(default_factory=list)


def _perplexity(model, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            tokens = torch.tensor([ids])
            logits = model(tokens, use_cache=False).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="sum"))
            count += len(ids) - 1
    return math.exp(nll / count)


def run_arm(model, tokenizer, *, arm, masks, windows, probes, open_ids, config) -> ArmResult:
    """Evaluates one arm with its clamp installed."""
    start = time.time()
    with clamp_hooks(model, masks):
        ppl = _perplexity(model, windows)
        generations, examples, correct = [], [], 0
        for index, probe in enumerate(probes):
            new = greedy(model, tokenizer, chat_ids(tokenizer, probe.message),
                         max_new_tokens=config.answer_new_tokens)  # fmt: skip
            text = tokenizer.decode(new, skip_special_tokens=True)
            ok = probe_tasks.retrieval_correct(text, probe.answer)
            correct += ok
            generations.append(new)
            if index < 2:
                examples.append({"kind": "retrieval", "answer": probe.answer, "output": text})
        for prompt, ids in open_ids:
            new = greedy(model, tokenizer, ids, max_new_tokens=config.open_new_tokens)
            generations.append(new)
            examples.append(
                {
                    "kind": "open",
                    "prompt": prompt,
                    "output": tokenizer.decode(new, skip_special_tokens=True),
                }
            )
    return ArmResult(
        arm=arm,
        perplexity=ppl,
        accuracy=correct / len(probes),
        correct=correct,
        total=len(probes),
        repetition=repetition_rate(generations, n=config.ngram),
        seconds=time.time() - start,
        examples=examples,
    )


def run_perturb(config: PerturbRunConfig) -> list[ArmResult]:
    """Measures M, then every arm; writes the outputs to ``config.out_dir``. Single process."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, shape = load_hf(config.model_dir)
    probe = dict(context_tokens=config.context_tokens, num_facts=config.num_facts)
    calibration = probe_tasks.retrieval_probes(tokenizer, num_samples=config.num_profile,
                                               seed=config.seed + 1, **probe)  # fmt: skip
    probes = probe_tasks.retrieval_probes(tokenizer, num_samples=config.num_eval,
                                          seed=config.seed, **probe)  # fmt: skip
    windows = probe_tasks.perplexity_windows(tokenizer, num_windows=config.ppl_windows,
                                             window_tokens=config.ppl_tokens)  # fmt: skip
    open_ids = [(p, chat_ids(tokenizer, p)) for p in probe_tasks.OPEN_PROMPTS[: config.num_open]]
    print(f"perturb: measuring M on {len(calibration)} prompts", flush=True)
    per_sample = per_sample_saliency(model, [chat_ids(tokenizer, p.message) for p in calibration])
    profile = profile_from_samples(per_sample, shape)
    save_saliency(out / "saliency.safetensors", profile)
    results = []
    for arm in config.arms:
        masks = clamp_masks(profile, arm=arm, ratio=config.ratio, seed=config.seed)
        result = run_arm(model, tokenizer, arm=arm, masks=masks, windows=windows, probes=probes,
                         open_ids=open_ids, config=config)  # fmt: skip
        print(
            f"perturb: {arm:8s} ppl {result.perplexity:9.2f}  retrieval {result.correct}/"
            f"{result.total}  repetition {result.repetition:.3f}  ({result.seconds:.0f} s)",
            flush=True,
        )
        results.append(result)
    payload = {"config": asdict(config), "results": [asdict(r) for r in results]}
    (out / "perturb.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "perturb.md").write_text(format_markdown(results, config))
    return results


def format_markdown(results: list[ArmResult], config: PerturbRunConfig) -> str:
    """The paper's Table 7 layout plus perplexity and repetition, then example outputs."""
    lines = [
        f"λ = {config.ratio}, Q and K of every layer, clamp = global mean of the tensor; "
        f"retrieval: {config.num_facts} facts in ~{config.context_tokens}-token documents; "
        f"perplexity: {config.ppl_windows} x {config.ppl_tokens}-token held-out windows; "
        f"repetition: repeated {config.ngram}-gram share of all generations.",
        "",
        "| setting | retrieval correct / total | accuracy | perplexity | repetition |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {ARM_LABELS[r.arm]} | {r.correct} / {r.total} | {100 * r.accuracy:.1f}% "
            f"| {r.perplexity:.2f} | {r.repetition:.3f} |"
        )
    lines += ["", "Example outputs (greedy):", ""]
    for r in results:
        for example in r.examples[:1] + [e for e in r.examples if e["kind"] == "open"][:1]:
            where = (
                f"retrieval, expected {example['answer']}"
                if example["kind"] == "retrieval"
                else f"open: {example['prompt']}"
            )
            text = example["output"].replace("\n", " ").replace("|", "/")[:240]
            lines.append(f"- **{ARM_LABELS[r.arm]}** ({where}): `{text}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``longact perturb --model DIR --out DIR [--ratio 0.3 --arms none,massive,min,random]``."""
    parser = argparse.ArgumentParser(
        prog="longact perturb",
        description="clamp massive / min / random Q-K channels to the mean (paper Table 7)",
    )
    defaults = PerturbRunConfig(model_dir="", out_dir="")
    parser.add_argument("--model", required=True, help="local HF folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {ARMS}")
    for name in ("ratio", "seed", "context_tokens", "num_facts", "num_eval", "num_profile",
                 "ppl_windows", "ppl_tokens", "answer_new_tokens", "open_new_tokens",
                 "num_open", "ngram", "threads"):  # fmt: skip
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise UserError(f"--arms: {bad} not among {ARMS}")
    values = {k: v for k, v in vars(args).items() if k not in ("model", "out", "arms")}
    run_perturb(PerturbRunConfig(model_dir=args.model, out_dir=args.out, arms=arms, **values))
    print(f"wrote {Path(args.out) / 'perturb.md'}")
    return 0
