"""The GPU check (issue 22): what can be measured on a lent GPU in a few minutes, written to JSON as it goes.

    bash scripts/gpu-check.sh             # on the GPU machine: builds rasd, runs this and the CUDA tests
    python -m benchmarks.gpu_check run --device cuda --out DIR --seconds 300
    python -m benchmarks.gpu_check run --device cpu --out DIR          # the CPU form: tiny shapes, ~1 min
    python -m benchmarks.gpu_report markdown DIR/gpu.json              # the RESULTS.md section

No weights travel to the GPU machine (64 MiB of files do), so every model is a random-weight Qwen2 of a real
shape (Qwen2.5-1.5B, Qwen2.5-7B) built there from a config. Cost depends on shape, not weights, so the
verification-cost curve is real; acceptance rates and end-to-end speed-ups are not, and none is claimed.

Phases, each given a share of the time left and recorded in ``gpu.json`` as it finishes (so a run cut short
still leaves every finished figure):

- **identity**: greedy output of rasd against HF ``generate`` on the same model and dtype (fp32, bf16,
  fp16), prompts of random ids (a few long ones). Random weights would accept nothing from a real drafter,
  so the drafts are made to hit: ``oracle`` trees plant HF's own continuation among wrong siblings, near
  misses and duplicates; ``retrieval`` looks up a datastore holding the target's own greedy outputs;
  ``draft`` uses the target itself as the draft model; ``fused`` is both; ``off`` is no speculation (the
  control: what the verification path alone changes). Accepted tokens are counted, so acceptance and KV
  compaction are really exercised. A divergence is located and HF's logit margin between its token and
  rasd's at that position is recorded: a margin within the dtype's rounding is a numeric tie (two kernels
  summing in different orders), a larger one is a bug.
- **cost**: T(n) for n = 1..256 tokens fed at contexts 512 and 4096 (7B shape, bf16): stock transformers
  (a causal forward on the KV cache), rasd's verification of a chain (:func:`rasd.profile_verify`) and of a
  random tree of n - 1 nodes (:class:`rasd.verify.TargetSession`), and the tree size rasd's planner keeps
  on that curve for given per-node acceptance probabilities (an input, not a measurement).
- **transfers**: host-device copies and synchronisations per decoding step with the datastore, Token
  Recycling, static trees of 8 and 64 nodes and the draft model beside a CUDA target.
- **sampling**: the chi-square checks of lossless tree sampling (``tests/test_verify.py``) on the device.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_probes import (
    SHAPES,
    SyncCounter,
    TransferCounter,
    build_model,
    chi_square_pvalue,
    log,
    profiled_memcpys,
    stopwatch,
)
from benchmarks.gpu_report import summary, write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# |HF logit of its token - HF logit of rasd's token| at a divergence, below which the two tokens are a
# numeric tie in that dtype: a few units in the last place of logits of magnitude 2-4 (fp32: far above
# the ~1e-5 that reordered fp32 sums give, far below the ~0.1 typical top-2 gap of these models).
TIE_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.125, "float16": 0.03}
IDENTITY_CONFIGS = ("oracle", "retrieval", "draft", "fused", "off")
P_MIN = 1e-3  # chi-square checks pass above this p-value (as in tests/test_verify.py)
SCHEMA = 1


@dataclass(frozen=True)
class Profile:
    """What one run measures. ``real``: the GPU check (real shapes, minutes on an H200); ``tiny``: the CPU
    form, the same code on tiny shapes in about a minute on 2 cores."""

    name: str
    small: str  # key of SHAPES: the Qwen2.5-1.5B shape (or its stand-in)
    large: str  # the 7B-class shape
    short_prompt: tuple[int, int]  # prompt lengths drawn in [a, b]
    long_prompts: tuple[int, ...]  # a few long prompts, interleaved with the short ones
    short_new: int  # new tokens per short prompt
    long_new: int
    prompts: int  # short prompts planned per model and dtype (the time share may stop earlier)
    cost_sizes: tuple[int, ...]
    cost_contexts: tuple[int, ...]
    cost_repeats: int
    sampling_trials: int  # draws per acceptance chi-square check
    joint_trials: int  # generate() calls for the two-token joint distribution
    transfer_steps: int  # decoding steps measured per transfer configuration
    transfer_context: int
    flat_cost: bool = False  # price trees on a flat cost curve (see planner_for)
    # The draft model is the target itself: short expansions keep each step to a few forwards.
    draft_depth: int = 3
    draft_top_k: int = 4


PROFILES = {
    "real": Profile(
        "real",
        "qwen2.5-1.5b",
        "qwen2.5-7b",
        short_prompt=(8, 256),
        long_prompts=(1800, 3900),
        short_new=40,
        long_new=64,
        prompts=40,
        cost_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        cost_contexts=(512, 4096),
        cost_repeats=5,
        sampling_trials=4000,
        joint_trials=1000,
        transfer_steps=6,
        transfer_context=1024,
    ),
    "tiny": Profile(
        "tiny",
        "tiny-1.5b",
        "tiny-7b",
        short_prompt=(4, 40),
        long_prompts=(300,),
        short_new=20,
        long_new=24,
        prompts=1,
        cost_sizes=(1, 2, 8, 32),
        cost_contexts=(32, 128),
        cost_repeats=2,
        sampling_trials=1200,
        joint_trials=300,
        transfer_steps=3,
        transfer_context=64,
        flat_cost=True,
    ),
}


# ------------------------------------------------------------------------------------------------------
# Greedy identity
# ------------------------------------------------------------------------------------------------------


class OracleTrees:
    """Tree function for :class:`rasd.drafting.StaticTreeDrafter` that plants the reference continuation
    among wrong tokens, cycling through kinds that stress acceptance and KV compaction: a right chain under
    wrong siblings (the accepted path is not a prefix of the node order: the gather runs), a near miss
    (right, wrong, right), many wrong siblings before the right one, a duplicated token with different
    subtrees, random junk, and nothing."""

    KINDS = ("chain", "near_miss", "wide", "duplicates", "junk", "empty")

    def __init__(self, reference: Sequence[int], prompt_len: int, vocab: int, seed: int = 0) -> None:
        self.reference = list(reference)
        self.prompt_len = prompt_len
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)
        self.step = 0

    def __call__(self, committed: list[int]) -> Any:
        from rasd.tree import Source, TokenTree

        pos = len(committed) - self.prompt_len
        truth = self.reference[pos : pos + 12]
        kind = self.KINDS[self.step % len(self.KINDS)]
        self.step += 1
        tokens: list[int] = []
        parents: list[int] = []

        def add(token: int, parent: int) -> int:
            tokens.append(int(token) % self.vocab)
            parents.append(parent)
            return len(tokens) - 1

        def wrong(token: int) -> int:
            return (token + 1 + int(self.rng.integers(0, self.vocab - 1))) % self.vocab

        if kind == "chain" and truth:
            node = -1
            for t in truth[: int(self.rng.integers(1, len(truth) + 1))]:
                add(wrong(t), node)  # a wrong sibling first: the verifier must skip it
                node = add(t, node)
        elif kind == "near_miss" and len(truth) > 2:
            k = int(self.rng.integers(1, len(truth) - 1))
            node = -1
            for t in [*truth[:k], wrong(truth[k]), *truth[k + 1 :]]:
                node = add(t, node)
        elif kind == "wide" and truth:
            for _ in range(16):
                add(wrong(truth[0]), -1)
            node = -1
            for t in truth[:4]:
                node = add(t, node)
        elif kind == "duplicates" and truth:
            a, b = add(truth[0], -1), add(truth[0], -1)
            for t in self.rng.integers(0, self.vocab, 3):
                a = add(int(t), a)
            for t in truth[1:6]:
                b = add(t, b)
        elif kind == "junk":
            for i in range(int(self.rng.integers(1, 24))):
                add(int(self.rng.integers(0, self.vocab)), int(self.rng.integers(-1, i)))
        sources = np.full(len(tokens), int(Source.CORPUS), np.uint8)
        return TokenTree(np.asarray(tokens, np.int32), np.asarray(parents, np.int32), sources=sources)


@dataclass
class Tally:
    """Outcome of one identity configuration over the prompts done so far."""

    prompts: int = 0
    identical: int = 0
    ties: int = 0  # diverged at a numeric tie (|margin| <= the dtype's tolerance)
    diverged: int = 0  # diverged where HF's choice was clear: a bug
    accepted: int = 0  # tree tokens accepted (committed tokens minus one bonus token per step)
    steps: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    divergences: list[dict[str, Any]] = field(default_factory=list)  # the first few, located

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tokens_per_step"] = self.new_tokens / self.steps if self.steps else 0.0
        return out


def random_prompts(profile: Profile, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, new tokens) pairs: short prompts of random ids, a long one after the 1st, 4th, 7th ...
    short one, so that a run stopped early still has some."""
    rng = np.random.default_rng(seed)
    low, high = profile.short_prompt
    shorts = [
        (rng.integers(2, vocab, int(rng.integers(low, high + 1))).tolist(), profile.short_new)
        for _ in range(profile.prompts)
    ]
    longs = [(rng.integers(2, vocab, n).tolist(), profile.long_new) for n in profile.long_prompts]
    out: list[tuple[list[int], int]] = []
    for i, item in enumerate(shorts):
        out.append(item)
        if i % 3 == 0 and longs:
            out.append(longs.pop(0))
    return out + longs


def hf_greedy(model: Any, prompt: list[int], new: int) -> list[int]:
    """HF ``generate``'s greedy continuation (the reference)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return out[0, len(prompt) :].tolist()


def locate(model: Any, prompt: list[int], ref: list[int], got: list[int], dtype: str) -> dict[str, Any]:
    """Where ``got`` leaves ``ref`` and HF's logit margin between the two tokens there (same model, dtype)."""
    d = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
    out: dict[str, Any] = {"prompt_len": len(prompt), "position": d}
    if d >= min(len(ref), len(got)):
        out["reason"] = f"lengths differ: {len(got)} tokens, reference {len(ref)}"
        return out
    device = next(model.parameters()).device
    with torch.inference_mode():
        ids = torch.tensor([prompt + ref[:d]], device=device)
        logits = model(ids, logits_to_keep=1).logits[0, -1].float()
    top2 = logits.topk(2).values
    margin = float(logits[ref[d]] - logits[got[d]])
    out.update(
        hf_token=ref[d],
        rasd_token=got[d],
        margin=margin,
        top2_gap=float(top2[0] - top2[1]),
        tie=abs(margin) <= TIE_TOLERANCE[dtype],
    )
    return out


def planner_for(profile: Profile) -> Any:
    """The ``planner=`` of every speculative generator: "auto" (this machine's measured cost curve, as users
    get it), or in the CPU form a fresh planner on a flat curve, as a GPU's is: on a loaded 2-core machine
    the quick calibration's noise can make every tree look unprofitable (measured: T(4) = 2.9 T(1) and
    T(16) = 0.5 T(1) on a tiny model), and then nothing is verified and acceptance is not exercised."""
    if not profile.flat_cost:
        return "auto"
    from rasd.costmodel import CostCurve
    from rasd.planner import Planner

    return Planner(CostCurve((1, 256), (1e-3, 1e-3)))


def identity_generators(model: Any, store: Any, profile: Profile) -> dict[str, Callable[[Any], Any]]:
    """Factories (reference box -> SpeculativeGenerator) of every identity configuration; one generator per
    configuration and model (the planner learns across prompts), a fresh one per prompt for ``oracle``."""
    import rasd
    from rasd.drafting import DraftTreeConfig, StaticTreeDrafter

    draft_config = DraftTreeConfig(top_k=profile.draft_top_k, max_depth=profile.draft_depth)
    vocab = model.get_output_embeddings().weight.shape[0]
    kwargs: dict[str, dict[str, Any]] = {
        "retrieval": {"datastore": store, "prompt_lookup": True},
        "draft": {"draft": model, "prompt_lookup": False, "draft_config": draft_config},
        "fused": {"draft": model, "datastore": store, "prompt_lookup": True, "draft_config": draft_config},
    }
    made: dict[str, Any] = {}

    def get(name: str, box: dict[str, Any]) -> Any:
        if name == "oracle":
            trees = OracleTrees(box["reference"], box["prompt_len"], vocab, seed=box["seed"])
            drafter = StaticTreeDrafter(trees)
            return rasd.SpeculativeGenerator(
                model, drafter=drafter, planner=planner_for(profile), fast_path=False
            )
        if name not in made:
            if name == "off":
                made[name] = rasd.SpeculativeGenerator(
                    model, prompt_lookup=False, planner=None, max_tree_nodes=0, fast_path=False
                )
            else:
                made[name] = rasd.SpeculativeGenerator(
                    model, planner=planner_for(profile), fast_path=False, **kwargs[name]
                )
        return made[name]

    return {name: functools.partial(get, name) for name in IDENTITY_CONFIGS}


def identity(
    model: Any,
    dtype: str,
    prompts: Sequence[tuple[list[int], int]],
    profile: Profile,
    *,
    deadline: float,
    configs: Sequence[str] = IDENTITY_CONFIGS,
    on_prompt: Callable[[dict[str, Any]], None] | None = None,
    keep_divergences: int = 5,
) -> dict[str, Any]:
    """Greedy identity of rasd against HF ``generate`` for ``model`` as it is (its dtype named ``dtype``).

    Prompts run in order until the next one would likely pass ``deadline`` (at least one always runs).
    The datastore of ``retrieval``/``fused`` holds every prompt with HF's continuation, added before the
    prompt is decoded: a lookup of the target's own output, so retrieval trees are accepted.
    """
    import rasd

    vocab = model.get_output_embeddings().weight.shape[0]
    store = rasd.Datastore(vocab_size=vocab)
    box: dict[str, Any] = {}
    factories = identity_generators(model, store, profile)
    tallies = {name: Tally() for name in configs}
    result: dict[str, Any] = {
        "dtype": dtype,
        "prompts_planned": len(prompts),
        "prompts_done": 0,
        "prompt_lengths": [],
        "hf_seconds": 0.0,
        "tie_tolerance": TIE_TOLERANCE[dtype],
        "configs": {},
    }
    slowest = 0.0
    for index, (prompt, new) in enumerate(prompts):
        if index and time.time() + slowest > deadline:
            break
        began = time.time()
        with stopwatch(next(model.parameters()).device) as hf_time:
            ref = hf_greedy(model, prompt, new)
        result["hf_seconds"] += hf_time[0]
        store.add(prompt + ref)
        box.update(reference=ref, prompt_len=len(prompt), seed=index)
        for name in configs:
            gen = factories[name](box)
            start = time.perf_counter()
            out = gen.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
            tally = tallies[name]
            tally.seconds += time.perf_counter() - start
            got = out.sequences[0, len(prompt) :].tolist()
            stats = out.stats
            tally.prompts += 1
            tally.steps += stats.steps
            tally.new_tokens += stats.new_tokens
            tally.accepted += max(stats.new_tokens - stats.steps, 0)
            if got == ref:
                tally.identical += 1
                continue
            where = locate(model, prompt, ref, got, dtype)
            if where.get("tie"):
                tally.ties += 1
            else:
                tally.diverged += 1
            if len(tally.divergences) < keep_divergences:
                tally.divergences.append(where)
        result["prompts_done"] = index + 1
        result["prompt_lengths"].append(len(prompt))
        result["configs"] = {name: t.to_dict() for name, t in tallies.items()}
        slowest = max(slowest, time.time() - began)
        if on_prompt is not None:
            on_prompt(result)
    return result


# ------------------------------------------------------------------------------------------------------
# Verification cost and the planner's choice
# ------------------------------------------------------------------------------------------------------


def stock_profile(
    model: Any, sizes: Sequence[int], context: int, repeats: int, seed: int = 0
) -> dict[int, float]:
    """Median seconds of a stock transformers forward of n new tokens on a KV cache of ``context`` tokens
    (its own causal mask, no tree), sizes round-robin like :func:`rasd.profile_verify`."""
    from transformers import DynamicCache

    from rasd.verify import with_cache

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=model.config)
    feeds = {n: torch.randint(0, vocab, (1, n), generator=gen).to(device) for n in sizes}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    with torch.inference_mode():
        prefix = torch.randint(0, vocab, (1, context), generator=gen).to(device)
        model(prefix, use_cache=True, **with_cache(model, cache))
        for round_ in range(repeats + 1):  # round 0 warms up
            for n in sizes:
                with stopwatch(device) as took:
                    model(feeds[n], use_cache=True, **with_cache(model, cache))
                cache.crop(-(cache.get_seq_length() - context))
                if round_:
                    times[n].append(took[0])
    return {n: float(np.median(t)) for n, t in times.items()}


def tree_profile(
    model: Any, sizes: Sequence[int], context: int, repeats: int, seed: int = 0
) -> dict[int, float]:
    """Median seconds of rasd's verification of a random tree of n - 1 nodes (mask and positions built on
    the host, as in decoding), after ``context`` tokens."""
    from rasd.tree import TokenTree
    from rasd.verify import TargetSession

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    rng = np.random.default_rng(seed)
    session = TargetSession(model, torch.from_numpy(rng.integers(0, vocab, context)))
    trees = {
        n: TokenTree(rng.integers(0, vocab, n - 1), [int(rng.integers(-1, i)) for i in range(n - 1)])
        for n in sizes
    }
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for round_ in range(repeats + 1):
        for n in sizes:
            with stopwatch(device) as took:
                session.verify(trees[n])
            session.discard()
            if round_:
                times[n].append(took[0])
    return {n: float(np.median(t)) for n, t in times.items()}


def planner_choices(profile: dict[int, float], max_nodes: int) -> list[dict[str, Any]]:
    """The tree size rasd's planner keeps on a measured cost curve when offered a chain of ``max_nodes``
    draft nodes, each expected to be accepted with probability p given its parent, or an EAGLE-like top-4
    tree (children of rank 1-4 expected at 0.55/0.25/0.075/0.035). The p are assumptions, not measurements;
    they are centres of the planner's probability bins, so its estimate equals them."""
    from rasd.costmodel import CostCurve
    from rasd.planner import Planner
    from rasd.tree import Source, TokenTree

    planner = Planner(CostCurve.from_profile(profile))
    offers: list[tuple[str, Any]] = [
        (
            f"chain, p={p}",
            TokenTree(
                np.arange(max_nodes) % 50,
                np.arange(-1, max_nodes - 1),
                draft_probs=np.full(max_nodes, p),
                sources=np.full(max_nodes, int(Source.DRAFT), np.uint8),
            ),
        )
        for p in (0.55, 0.75, 0.85, 0.925, 0.97)
    ]
    offers.append(("top-4 tree, 0.55/0.25/0.075/0.035", _eagle_like(max_nodes)))
    base = planner.verify_seconds(0)
    rows = []
    for label, tree in offers:
        kept = planner.trim(tree, 0.0, max_nodes=max_nodes)
        expected = planner.expected_tokens(kept)
        rows.append(
            {
                "offered": label,
                "planner's p of a first node": float(planner.acceptance.node_probs(tree)[0]),
                "nodes": len(tree),
                "kept": len(kept),
                "expected tokens": expected,
                "rate vs plain": expected * base / planner.verify_seconds(len(kept)),
            }
        )
    return rows


def _eagle_like(nodes: int) -> Any:
    """A best-first tree of ``nodes`` nodes whose children are accepted with 0.55/0.25/0.075/0.035 by rank
    (bin centres of the planner, like the chains' p)."""
    import heapq

    from rasd.tree import Source, TokenTree

    ranks = (0.55, 0.25, 0.075, 0.035)
    heap = [(-p, i, -1, p) for i, p in enumerate(ranks)]
    parents, probs, counter = [], [], len(ranks)
    while heap and len(parents) < nodes:
        neg_path, _, parent, p = heapq.heappop(heap)
        parents.append(parent)
        probs.append(p)
        me = len(parents) - 1
        for q in ranks:
            heapq.heappush(heap, (neg_path * q, counter, me, q))
            counter += 1
    n = len(parents)
    return TokenTree(
        np.arange(n) % 50, parents, draft_probs=probs, sources=np.full(n, int(Source.DRAFT), np.uint8)
    )


def cost(
    model: Any, profile: Profile, *, deadline: float, on_context: Callable | None = None
) -> dict[str, Any]:
    """T(n) stock vs rasd (chain and tree) per context, and the planner's choices on rasd's curve."""
    import rasd

    out: dict[str, Any] = {
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "contexts": {},
    }
    sizes = list(profile.cost_sizes)
    for context in profile.cost_contexts:
        if out["contexts"] and time.time() > deadline:
            out["stopped"] = f"out of time before context {context}"
            break
        repeats = profile.cost_repeats
        paths: dict[str, Callable[[], dict[int, float]]] = {
            "stock": functools.partial(stock_profile, model, sizes, context, repeats),
            "chain": functools.partial(
                rasd.profile_verify, model, sizes, context_length=context, repeats=repeats, fast_path=False
            ),
            "tree": functools.partial(tree_profile, model, sizes, context, repeats),
        }
        # The paths run one after another (each round-robins its sizes); their order rotates per context.
        order = list(paths)[len(out["contexts"]) % 3 :] + list(paths)[: len(out["contexts"]) % 3]
        measured = {name: paths[name]() for name in order}
        stock, chain, tree = measured["stock"], measured["chain"], measured["tree"]
        rows = [
            {
                "n": n,
                "stock ms": 1e3 * stock[n],
                "rasd chain ms": 1e3 * chain[n],
                "rasd tree ms": 1e3 * tree[n],
                "stock T(n)/T(1)": stock[n] / stock[sizes[0]],
                "rasd T(n)/T(1)": tree[n] / tree[sizes[0]],
                "rasd/stock": tree[n] / stock[n],
            }
            for n in sizes
        ]
        out["contexts"][str(context)] = {
            "rows": rows,
            "free_up_to": _free_up_to(rows, 1.1),
            "doubles_at": next((r["n"] for r in rows if r["rasd T(n)/T(1)"] >= 2.0), None),
            "planner": planner_choices(chain, max_nodes=sizes[-1] - 1),
        }
        if on_context is not None:
            on_context(out)
    return out


def _free_up_to(rows: list[dict[str, Any]], factor: float) -> int:
    """The largest n such that every size up to it costs at most ``factor`` x T(1) on rasd's path."""
    best = rows[0]["n"]
    for r in rows:
        if r["rasd T(n)/T(1)"] > factor:
            break
        best = r["n"]
    return best


# ------------------------------------------------------------------------------------------------------
# Host-device traffic per decoding step
# ------------------------------------------------------------------------------------------------------


def transfer_generators(model: Any, store: Any, profile: Profile) -> dict[str, Any]:
    """The configurations whose per-step traffic is counted: CPU-side drafters beside the target, fixed
    static trees of two sizes (the count must not grow with the tree), and the draft model."""
    import rasd
    from rasd.drafting import DraftTreeConfig, StaticTreeDrafter
    from rasd.tree import TokenTree

    vocab = model.get_output_embeddings().weight.shape[0]
    rng = np.random.default_rng(0)

    def static(n: int) -> Any:
        tree = TokenTree(rng.integers(0, vocab, n), [int(rng.integers(-1, i)) for i in range(n)])
        return rasd.SpeculativeGenerator(
            model, drafter=StaticTreeDrafter(lambda _c: tree), planner=None, fast_path=False
        )

    draft_config = DraftTreeConfig(top_k=profile.draft_top_k, max_depth=profile.draft_depth)
    return {
        "datastore + prompt lookup": lambda: rasd.SpeculativeGenerator(
            model, datastore=store, prompt_lookup=True, planner=planner_for(profile), fast_path=False
        ),
        "token recycling": lambda: rasd.SpeculativeGenerator(
            model, prompt_lookup=False, recycling=True, planner=planner_for(profile), fast_path=False
        ),
        "static tree, 8 nodes": lambda: static(8),
        "static tree, 64 nodes": lambda: static(64),
        "draft model (the target)": lambda: rasd.SpeculativeGenerator(
            model,
            draft=model,
            prompt_lookup=False,
            draft_config=draft_config,
            planner=planner_for(profile),
            fast_path=False,
        ),
    }


@contextmanager
def _steps(gen: Any, prompt: list[int], tokens: int) -> Iterator[Callable[[int], None]]:
    """``advance(k)`` runs k more decoding steps of one request of at most ``tokens`` new tokens (each step
    a propose/verify/commit and the drafter's update for the previous step)."""
    stream = gen.stream(torch.tensor(prompt), max_new_tokens=tokens, do_sample=False)

    def advance(k: int) -> None:
        for _ in range(k):
            next(stream)

    try:
        yield advance
    finally:
        stream.close()


def transfers(
    model: Any, profile: Profile, *, deadline: float, on_config: Callable | None = None
) -> dict[str, Any]:
    """Per-step host-device copies (dispatcher, by call site), synchronisations and profiler memcpys."""
    import rasd

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    rng = np.random.default_rng(1)
    prompt = rng.integers(2, vocab, profile.transfer_context).tolist()
    store = rasd.Datastore(vocab_size=vocab)
    store.add(prompt + hf_greedy(model, prompt, 16))
    for _ in range(20):
        store.add(rng.integers(2, vocab, 500).tolist())
    k = profile.transfer_steps
    out: dict[str, Any] = {"steps": k, "context": len(prompt), "configs": {}}
    for name, make in transfer_generators(model, store, profile).items():
        if out["configs"] and time.time() > deadline:
            out["stopped"] = f"out of time before {name!r}"
            break
        row: dict[str, Any] = {}
        try:
            # Every step commits 1..65 tokens (64 nodes at most plus the bonus): never the request's end.
            with _steps(make(), prompt, (2 + 3 * k) * 65) as advance:
                advance(2)  # warm-up: first-call allocations, the planner's first estimates
                with TransferCounter() as copies:
                    advance(k)
                row["per step"] = {d: n / k for d, n in copies.totals().items()}
                row["sites"] = {site: n / k for site, n in copies.by_site().items()}
                if device.type == "cuda":
                    with SyncCounter() as syncs:
                        advance(k)
                    row["syncs per step"] = syncs.total / k
                    row["sync sites"] = {site: n / k for site, n in syncs.by_site.items()}
                    prof = profiled_memcpys(lambda: advance(k))
                    row["profiler per step"] = {
                        key: (value / k if isinstance(value, (int, float)) else value)
                        for key, value in prof.items()
                    }
        except Exception as exc:  # one failing configuration must not lose the others
            row["error"] = f"{type(exc).__name__}: {exc}"
        out["configs"][name] = row
        if on_config is not None:
            on_config(out)
    return out


# ------------------------------------------------------------------------------------------------------
# Lossless sampling on the device
# ------------------------------------------------------------------------------------------------------

V = 8  # vocabulary of the sampling checks: small enough for exact distributions and chi-square cells


def _sampling_trees(device: torch.device) -> dict[str, Callable[[torch.Generator], Any]]:
    """The three tree kinds of tests/test_verify.py: a deterministic chain, several deterministic candidates
    per node, and draft-sampled children (q on the device) before deterministic ones."""
    from rasd.tree import TokenTree

    q = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(99)), -1)

    def mixed(gen: torch.Generator) -> Any:
        w = q.clone()
        sampled = []
        for _ in range(2):  # two draws without replacement
            x = int(torch.multinomial(w / w.sum(), 1, generator=gen))
            sampled.append(x)
            w[x] = 0
        det = [t for t in (0, 7) if t not in sampled]
        tokens = sampled + det
        return TokenTree(
            tokens, [-1] * len(tokens), q_rows=[0, 0] + [-1] * len(det), q_dists=q[None].to(device)
        )

    return {
        "chain": lambda gen: TokenTree([2, 5, 1], [-1, 0, 1]),
        "multi": lambda gen: TokenTree([3, 0, 6, 1, 4, 2], [-1, -1, -1, 0, 0, 1]),
        "mixed": mixed,
    }


def sampling(device: torch.device, profile: Profile, *, deadline: float) -> dict[str, Any]:
    """Chi-square checks that tree sampling keeps the target's distribution, with logits, draft
    distributions and the random generator on ``device``: the first token through ``accept_sampling`` for
    three tree kinds (plus a negative control that must be rejected), and the joint distribution of two
    tokens through the whole loop (tree forward, acceptance, KV compaction) on a tiny model."""
    from rasd.drafting import StaticTreeDrafter
    from rasd.generate import SpeculativeGenerator
    from rasd.testing import tiny_model
    from rasd.tree import TokenTree
    from rasd.verify import SamplingConfig, accept_sampling

    logits = (torch.randn(40, V, generator=torch.Generator().manual_seed(1)) * 1.5).to(device)
    config = SamplingConfig(do_sample=True, temperature=0.8, top_k=6)
    target = config.probs(logits[:1])[0].cpu()
    out: dict[str, Any] = {"device": str(device), "checks": []}
    counts_by_tree: dict[str, np.ndarray] = {}
    for name, tree_fn in _sampling_trees(device).items():
        tree_gen = torch.Generator().manual_seed(0)
        accept_gen = torch.Generator(device=device).manual_seed(0)
        counts = np.zeros(V)
        for _ in range(profile.sampling_trials):
            tree = tree_fn(tree_gen)
            counts[accept_sampling(tree, logits[: len(tree) + 1], config, accept_gen).tokens[0]] += 1
        counts_by_tree[name] = counts
        out["checks"].append(_check(f"first token, {name} tree", counts, target))
    # Power: the same draws tested against a different distribution (temperature 1, no top-k) must fail.
    wrong = SamplingConfig(do_sample=True).probs(logits[:1])[0].cpu()
    out["checks"].append(
        _check("negative control (wrong target)", counts_by_tree["multi"], wrong, power=True)
    )
    if time.time() > deadline:
        out["stopped"] = "out of time before the joint check"
        return out
    model = tiny_model("llama", vocab_size=V, init_std=0.5).to(device)
    prompt = torch.tensor([[2, 5, 3, 1, 6]])
    with torch.inference_mode():
        p1 = torch.softmax(model(prompt.to(device)).logits[0, -1].float(), -1)
        both = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], 1).to(device)
        p2 = torch.softmax(model(both).logits[:, -1].float(), -1)
    joint = (p1[:, None] * p2).flatten().cpu()
    fixed = TokenTree([1, 4, 0, 6, 2, 5], [-1, -1, 0, 0, 1, 1])
    # No planner: the whole mixed tree is verified every step, as the check intends.
    generator = SpeculativeGenerator(
        model, StaticTreeDrafter(lambda _c: fixed), planner=None, fast_path=False
    )
    gen = torch.Generator(device=device).manual_seed(0)
    counts = np.zeros(V * V)
    trials = 0
    while trials < profile.joint_trials and (trials < profile.joint_trials // 2 or time.time() < deadline):
        seq = generator.generate(
            prompt, max_new_tokens=2, do_sample=True, top_k=0, eos_token_id=[], generator=gen
        )
        t1, t2 = seq.sequences[0, -2:].tolist()
        counts[t1 * V + t2] += 1
        trials += 1
    out["checks"].append(_check("two-token joint, whole loop", counts, joint))
    return out


def _check(name: str, counts: np.ndarray, probs: torch.Tensor, *, power: bool = False) -> dict[str, Any]:
    """One chi-square record: draws that must fit ``probs`` (p > 1e-3), or with ``power`` must not (p <
    1e-6: the test can tell a wrong distribution from the right one)."""
    p = chi_square_pvalue(counts, probs)
    return {
        "check": name,
        "trials": int(counts.sum()),
        "p": p,
        "expect": "p < 1e-6" if power else f"p > {P_MIN:g}",
        "passed": p < 1e-6 if power else p > P_MIN,
    }


# ------------------------------------------------------------------------------------------------------
# The run: phases under one deadline, JSON after every step
# ------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, hardware and the GPU (where there is one)."""
    import transformers

    from benchmarks.harness import environment as base

    env = base()
    env["transformers"] = transformers.__version__
    env["cuda"] = torch.version.cuda
    if env.get("git_commit") is None:
        env["git_commit"] = os.environ.get("RASD_COMMIT")  # the GPU machine's copy has no .git
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
        )
    return env


class Run:
    """One check run: the payload, its file, and phases that share the time left by weight."""

    def __init__(
        self, device: torch.device, profile: Profile, out_dir: Path, seconds: float, meta: dict
    ) -> None:
        self.device = device
        self.profile = profile
        self.path = out_dir / "gpu.json"
        self.start = time.time()
        self.deadline = self.start + seconds
        self.payload: dict[str, Any] = {
            "kind": "rasd-gpu-check",
            "schema": SCHEMA,
            "device": device.type,
            "profile": profile.name,
            "status": "running",
            "command": " ".join(["python", "-m", "benchmarks.gpu_check", *sys.argv[1:]]),
            "budget_seconds": seconds,
            "environment": environment(device),
            "install": meta,
            "shapes": {},
            "phases": {},
            "identity": {},
            "cost": None,
            "transfers": None,
            "sampling": None,
        }
        self.save()

    def save(self) -> None:
        write_json(self.path, self.payload)

    @contextmanager
    def phase(self, name: str, share: float) -> Iterator[float]:
        """Run a phase with deadline = now + ``share`` of the time left; record seconds and errors. An
        exception ends the phase, not the run."""
        left = max(self.deadline - time.time(), 0.0)
        deadline = time.time() + share * left
        record: dict[str, Any] = {"status": "running"}
        self.payload["phases"][name] = record
        log(f"[gpu-check] {name}: up to {share * left:.0f} s")
        start = time.time()
        try:
            yield deadline
            record["status"] = "ok"
        except Exception as exc:
            record["status"] = "error"
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc(limit=8)[-3000:]
            log(f"[gpu-check] {name} failed: {record['error']}")
        finally:
            record["seconds"] = round(time.time() - start, 2)
            if self.device.type == "cuda":
                record["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 1)
                torch.cuda.reset_peak_memory_stats(self.device)
            self.save()

    def skip(self, name: str, why: str) -> None:
        self.payload["phases"][name] = {"status": f"skipped: {why}", "seconds": 0.0}
        self.save()

    def out_of_time(self) -> bool:
        return time.time() >= self.deadline


def run(device: torch.device, profile: Profile, out_dir: Path, seconds: float, meta: dict) -> dict[str, Any]:
    """Every phase in priority order (see the module docstring); returns the payload (also in gpu.json)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out_dir.mkdir(parents=True, exist_ok=True)
    r = Run(device, profile, out_dir, seconds, meta)
    dtypes = list(DTYPES)
    # (phase, share of the time left when it starts): the shares of the remaining phases, normalised.
    plan: list[tuple[str, float]] = [
        ("build small", 0.02),
        *[(f"identity small {d}", w) for d, w in zip(dtypes, (0.13, 0.07, 0.07), strict=True)],
        ("build large", 0.03),
        ("identity large float32", 0.12),
        ("cost large bfloat16", 0.12),
        ("transfers large bfloat16", 0.06),
        ("identity large bfloat16", 0.07),
        ("identity large float16", 0.07),
        ("sampling", 0.10),
    ]
    weights = dict(plan)
    names = [name for name, _ in plan]

    def share(name: str) -> float:
        rest = names[names.index(name) :]
        return weights[name] / sum(weights[n] for n in rest)

    def record_identity(key: str) -> Callable[[dict[str, Any]], None]:
        def save(result: dict[str, Any]) -> None:
            r.payload["identity"][key] = result
            r.save()

        return save

    for size in ("small", "large"):
        shape = SHAPES[getattr(profile, size)]
        model = None
        with r.phase(f"build {size}", share(f"build {size}")):
            with stopwatch(device) as took:
                model = build_model(shape, device, seed=0 if size == "small" else 1)
            r.payload["shapes"][size] = {
                "name": shape.name,
                "parameters": shape.parameters,
                "hidden": shape.hidden,
                "layers": shape.layers,
                "heads": shape.heads,
                "kv_heads": shape.kv_heads,
                "vocab": shape.vocab,
                "init_std": shape.init_std,
                "build_seconds": took[0],
            }
        if model is None:
            for name in names:
                if f" {size} " in f" {name} " and not name.startswith("build"):
                    r.skip(name, f"the {size} model could not be built")
            continue
        prompts = random_prompts(profile, shape.vocab, seed=7 if size == "small" else 8)
        for dtype in dtypes:
            model.to(DTYPES[dtype])
            if size == "large" and dtype == "bfloat16":
                _cost_and_transfers(r, model, share)
            name = f"identity {size} {dtype}"
            if r.out_of_time():
                r.skip(name, "out of time")
                continue
            with r.phase(name, share(name)) as deadline:
                identity(
                    model,
                    dtype,
                    prompts,
                    profile,
                    deadline=deadline,
                    on_prompt=record_identity(f"{shape.name}/{dtype}"),
                )
        model = None  # free the small model before the large one is built
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if r.out_of_time():
        r.skip("sampling", "out of time")
    else:
        with r.phase("sampling", share("sampling")) as deadline:
            r.payload["sampling"] = sampling(device, profile, deadline=deadline)
    r.payload["status"] = "complete"
    r.payload["seconds"] = round(time.time() - r.start, 1)
    r.save()
    return r.payload


def _cost_and_transfers(r: Run, model: Any, share: Callable[[str], float]) -> None:
    for name in ("cost large bfloat16", "transfers large bfloat16"):
        if r.out_of_time():
            r.skip(name, "out of time")
            continue
        with r.phase(name, share(name)) as deadline:
            if name.startswith("cost"):

                def save_cost(result: dict[str, Any]) -> None:
                    r.payload["cost"] = result
                    r.save()

                cost(model, r.profile, deadline=deadline, on_context=save_cost)
            else:

                def save_transfers(result: dict[str, Any]) -> None:
                    r.payload["transfers"] = result
                    r.save()

                transfers(model, r.profile, deadline=deadline, on_config=save_transfers)


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="measure, writing OUT/gpu.json as it goes")
    p.add_argument("--device", default="cuda", help="cuda (real shapes) or cpu (tiny shapes)")
    p.add_argument("--profile", choices=PROFILES, default=None, help="default: real on cuda, tiny on cpu")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=300.0, help="time for all phases together")
    p.add_argument("--install", default="not recorded", help="how rasd was installed (from the script)")
    p.add_argument("--install-seconds", type=float, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu for the CPU form")
    profile = PROFILES[args.profile or ("real" if device.type == "cuda" else "tiny")]
    if device.type == "cpu":
        # Tiny forwards gain nothing from torch's OpenMP workers, whose spinning made them 4x slower on a
        # shared 2-core machine (sampling phase: 29 s at 2 threads, 7 s at 1).
        torch.set_num_threads(1)
    meta = {"method": args.install, "seconds": args.install_seconds}
    payload = run(device, profile, args.out, args.seconds, meta)
    print(summary(payload))
    return 0 if all(p["status"] == "ok" for p in payload["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
