"""Batched speculative generation: every row's tree verified in one target forward per step.

On a CPU the cost of a forward is the weights it streams, nearly flat in the tokens fed up to about 8-16
(:mod:`rasd.fastpath`), so B rows with small trees share one weight read instead of paying for B. One step
of :class:`BatchedGenerator`, for the rows in flight::

    proposals = [row.drafter.propose(budget) for row in rows]  # per-row drafters, one step contract
    trees, Q  = plan_batch(...)               # one planner sizes the B trees together: T(B * Q)
    logits    = session.verify(trees)         # ONE forward over [B, Q] (ragged trees, padded)
    accs      = [accept(tree_b, logits_b)]    # per row, greedy or lossless sampling (rasd.verify)
    session.commit(accs); finished rows leave the batch, queued requests join it

The batched KV cache (:class:`BatchedSession`, one cache whose batch dimension is the rows: a
:class:`rasd.lean.LeanCache` on the lean forward of fp32 CPU Qwen2 / Llama targets, else a ``DynamicCache``)::

    row b: [ committed past of row b | holes (masked) | [root] + tree of row b | padding ]
           0                  past_b               P                      P + n_b + 1    P + Q

- P, the cache's width before a step, is the longest row's past; a shorter row's columns [past_b, P)
  are holes that every query of the row is masked from.
- Each step appends every row's [root] + tree at the same new columns [P, P + Q), Q = max n_b + 1. A row
  with a smaller tree pads its queries with its root token; a padded query attends to its own key only
  (no softmax row is empty, so no NaN), nobody attends to it, and its output is never read.
- Positions are row b's own: past_b + depth, exactly as if the row were verified alone; the holes do not
  count. The tree part of every row's mask comes from :func:`rasd.tree.attention_inputs`.
- Commit gathers row b's root and accepted path to columns [past_b, past_b + 1 + len(path_b)) and crops
  the cache to the longest row. A finished row leaves by an ``index_select`` on the batch dimension; a
  new row is prefilled (packed with the other rows joining with it, :meth:`BatchedSession.add_many`) and
  joins with its past padded to the common width (or the batch's to its).

Planning: the padded forward feeds B * Q tokens whatever the trees, so its cost is T(B * Q) (the planner's
measured curve, rescaled online by measured / predicted time) and the only choice is the common width Q.
Each row fills its Q - 1 nodes best first (path probabilities from the shared acceptance model, with that
row's own request factors); Q maximises the batch's expected tokens per second,
sum_b (1 + sum of row b's first min(Q - 1, len_b) path probabilities) / (drafting seconds + T(B * Q)).
Nodes below the width are free, so a row with a confident long match keeps more of its tree than a row
whose drafters found little.

Draft models: a draft model per row (built-in ``draft=``) is supported; each row runs its own draft forwards
one after another, so B rows pay B times the draft's cost per step (see benchmarks/bench_batch.py for when
that pays). Retrieval drafters (prompt / corpus lookup) and Token Recycling cost microseconds per row; the
recycling table is shared by every row of a generator, as it is shared by every request of one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rasd.costmodel import CostCurve
from rasd.datastore import Datastore
from rasd.drafting.base import DraftContext, Drafter, Proposal, StepBudget, StepResult
from rasd.drafting.draft_model import DraftModel
from rasd.drafting.fused import Fused
from rasd.drafting.lookup import CorpusLookup, PromptLookup
from rasd.drafting.recycling import RecyclingConfig, TokenRecycling
from rasd.fastpath import ForwardPlan
from rasd.generate import (
    GenerationResult,
    GenerationStats,
    SpeculativeGenerator,
    _as_ids,
    _book_draft_reports,
    _check_max_new_tokens,
    _deferred_prefill_seconds,
    _pad_id,
    _padded_rows,
    _row_prompts,
    _source_names,
    _StopChecker,
    _warn_past_positions,
)
from rasd.lean import LeanCache, LeanDecoder, lean_applies
from rasd.planner import AcceptanceModel, Planner
from rasd.tree import TokenTree, attention_inputs, best_first_order, keep_first
from rasd.verify import (
    Acceptance,
    SamplingConfig,
    accept,
    check_model,
    fill_cache,
    with_cache,
)

# EMA weight of each step's measured / predicted forward time (as the planner's cost_smoothing).
_COST_SMOOTHING = 0.1


# -- planning --------------------------------------------------------------------------------------------
def choose_width(
    gains: Sequence[np.ndarray],
    cost: Callable[[int], float],
    sunk_seconds: float = 0.0,
    max_width: int | None = None,
) -> int:
    """The common query width Q (root included) that maximises the batch's expected tokens per second.

    gains:  per row, float [len_b + 1]: ``gains[b][k]`` = expected tokens the row commits when it verifies
            the first k nodes of its best-first order (``1 + sum`` of their path probabilities).
    cost:   seconds of one forward feeding ``n`` tokens in all (B * Q: padded queries cost like real ones).
    Returns Q in [1, max_width]: row b verifies min(Q - 1, len_b) nodes.
    """
    if not gains:
        raise ValueError("choose_width needs at least one row")
    rows = len(gains)
    widest = max(len(g) for g in gains)
    if max_width is not None:
        widest = max(1, min(widest, max_width))
    best_q, best_rate = 1, -1.0
    for q in range(1, widest + 1):
        expected = sum(float(g[min(q - 1, len(g) - 1)]) for g in gains)
        rate = expected / (sunk_seconds + cost(rows * q))
        if rate > best_rate:
            best_q, best_rate = q, rate
    return best_q


def plan_batch(
    trees: Sequence[TokenTree],
    acceptance: Sequence[AcceptanceModel],
    cost: Callable[[int], float],
    *,
    sunk_seconds: float = 0.0,
    max_nodes: int | None = None,
) -> tuple[list[TokenTree], int]:
    """Trim every row's proposal for one batched forward: (trees to verify, common width Q).

    acceptance: per row, the model that estimates its nodes' acceptance (the shared table, the row's own
    request factors). Each row keeps the best-first prefix of at most ``min(Q - 1, max_nodes)`` nodes.
    """
    orders, gains = [], []
    for tree, model in zip(trees, acceptance, strict=True):
        path = model.path_probs(tree) if len(tree) else np.zeros(0)
        order = best_first_order(tree.parents, path)
        if max_nodes is not None:
            order = order[:max_nodes]
        orders.append(order)
        gains.append(np.concatenate([[1.0], 1.0 + np.cumsum(path[order])]))
    q = choose_width(gains, cost, sunk_seconds)
    kept = [keep_first(t, o, min(q - 1, len(o))) for t, o in zip(trees, orders, strict=True)]
    return kept, max(q, 1 + max(len(t) for t in kept))  # sampled nodes are never cut (keep_first)


# -- the batched KV cache -----------------------------------------------------------------------------------
def batch_inputs(
    trees: Sequence[TokenTree],
    past: Sequence[int],
    roots: Sequence[int],
    width: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of one batched verification forward (see the module docstring for the layout).

    trees: B trees; past: committed tokens per row in the cache (row b in columns [0, past[b])); roots:
    each row's last committed token (fed first); width: the cache's width P = max(past) (or more).
    Returns ``input_ids`` [B, Q], ``mask`` [B, 1, Q, P + Q] (additive: 0 where attending, the dtype's
    minimum elsewhere) and ``position_ids`` [B, Q], with Q = 1 + max len(tree).
    """
    rows = len(trees)
    q = 1 + max((len(t) for t in trees), default=0)
    allowed = np.zeros((rows, q, width + q), dtype=bool)
    ids = np.empty((rows, q), dtype=np.int64)
    positions = np.empty((rows, q), dtype=np.int64)
    for b, tree in enumerate(trees):
        if past[b] > width:
            raise ValueError(f"row {b} has {past[b]} cached tokens, more than the width {width}")
        n = len(tree) + 1
        block, pos = attention_inputs(tree, 0, dtype=torch.float32)  # [1, 1, n, n], [1, n]
        allowed[b, :n, : past[b]] = True
        allowed[b, :n, width : width + n] = block[0, 0].numpy() == 0
        pad = np.arange(n, q)
        allowed[b, pad, width + pad] = True  # a padded query sees itself only
        ids[b, 0], ids[b, 1:n], ids[b, n:] = roots[b], tree.tokens, roots[b]
        positions[b, :n] = past[b] + pos[0].numpy()
        positions[b, n:] = past[b]
    mask = torch.zeros((rows, 1, q, width + q), dtype=dtype, device=device)
    mask.masked_fill_(torch.from_numpy(~allowed).to(device)[:, None], torch.finfo(dtype).min)
    return torch.from_numpy(ids).to(device), mask, torch.from_numpy(positions).to(device)


class BatchedSession:
    """The target's KV cache for a batch of sequences, advanced one batched verification at a time.

    Invariant: row b holds its committed past (``past[b]`` tokens) in columns [0, past[b]) of the cache,
    whose width is ``max(past)``; ``roots[b]``, the row's last committed token, is not cached yet.
    Rows are numbered by their position in the batch; :meth:`select` renumbers them.
    """

    def __init__(self, model: torch.nn.Module, *, plan: ForwardPlan | None = None, lean: bool = True) -> None:
        check_model(model)
        self.model = model
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.plan = plan or ForwardPlan()
        # The model's arithmetic on rasd.lean where it applies (fp32 CPU Qwen2 / Llama), as TargetSession.
        self.lean = LeanDecoder(model) if lean and lean_applies(model) else None
        self.cache = self._new_cache(1)
        self.past: list[int] = []
        self.roots: list[int] = []
        self._appended = 0  # queries appended by the last verify, until commit

    def __len__(self) -> int:
        return len(self.past)

    @property
    def width(self) -> int:
        """Columns of the cache holding committed tokens: the longest row's past."""
        return max(self.past, default=0)

    def add(self, prompt: Sequence[int] | torch.Tensor) -> int:
        """Prefill ``prompt`` (1-D token ids) and append it as the last row; returns its row index.
        Not between :meth:`verify` and :meth:`commit`."""
        return self.add_many([prompt])[0]

    def add_many(self, prompts: Sequence[Sequence[int] | torch.Tensor]) -> list[int]:
        """Prefill ``prompts`` (1-D token ids each) together and append them as the last rows; returns their
        row indices. Not between :meth:`verify` and :meth:`commit`.

        Prompts are packed end to end into one sequence per :func:`prefill_packs` pack and prefilled in
        one forward, each attending only to itself (a block-diagonal causal mask, positions restarting at
        0 for every prompt: each row's keys and values are its own prefill's arithmetic, up to the rounding
        of taller GEMMs and a masked rather than causal attention kernel, as for any batched prefill): one
        large GEMM per layer over the real tokens only, no padding. Qwen2.5-Coder-1.5B on 2 EPYC (Zen 4)
        cores, the benchmark's four prompts of 187, 67, 132 and 50 tokens: 8.5-9.3 s packed vs 11.1-12.5 s
        one by one and 11.5-12.7 s in padded groups of similar length (this class's previous prefill).
        """
        if self._appended:
            raise RuntimeError("add() between verify() and commit(): commit the step first")
        rows = []
        for prompt in prompts:
            ids = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
            if ids.numel() == 0:
                raise ValueError("the prompt is empty: a row needs at least one token")
            if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
                raise ValueError(
                    f"prompt ids outside [0, {self.vocab_size}): wrong tokenizer for this model?"
                )
            rows.append(ids)
        if not rows:
            return []
        lengths = [ids.numel() - 1 for ids in rows]  # the last token of each prompt is its first root
        per_row: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = [None] * len(rows)
        for pack in prefill_packs(lengths, PACK_TOKENS):
            fresh = self._new_cache(1)
            self._fill([rows[b][:-1] for b in pack], fresh)
            layers = _layer_tensors(fresh)
            start = 0
            for b in pack:
                end = start + lengths[b]
                per_row[b] = [(k[:, :, start:end], v[:, :, start:end]) for k, v in layers]
                start = end
        mine = _layer_tensors(self.cache)
        template = mine if mine is not None else next((x for x in per_row if x is not None), None)
        if template is not None:
            width = max(self.width, *lengths)
            parts = [_padded(mine, template, len(self.past), width)]
            parts += [_padded(x, template, 1, width) for x in per_row]
            self.cache = self._from_layers(
                [
                    (torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts]))
                    for i in range(len(template))
                ]
            )
        first = len(self.past)
        self.past.extend(lengths)
        self.roots.extend(int(ids[-1]) for ids in rows)
        return list(range(first, len(self.past)))

    def _new_cache(self, rows: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config) if self.lean is None else self.lean.new_cache(rows)

    def _fill(self, sequences: list[torch.Tensor], cache: Any) -> None:
        """Prefill ``sequences`` (1-D, non-empty) packed end to end into the one row of an empty ``cache``,
        each attending causally to itself only; no logits."""
        ids = torch.cat(sequences)[None].to(self.device)
        mask = positions = None
        if len(sequences) > 1:
            lengths = [len(x) for x in sequences]
            mask, positions = packed_inputs(lengths, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            if self.lean is not None:
                self.lean.forward_batch(ids, cache, mask=mask, positions=positions, logits="none")
            else:
                fill_cache(self.model, ids, cache, mask=mask, positions=positions)

    def _from_layers(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """A cache holding per-layer (keys, values) [B, H, S, D]."""
        if self.lean is not None:
            return LeanCache.from_layers(layers)
        from transformers import DynamicCache

        merged = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(layers):
            merged.update(k, v, i)
        return merged

    def verify(self, trees: Sequence[TokenTree]) -> list[torch.Tensor]:
        """One forward over every row's ``[root] + tree``; returns per row the logits [n_b + 1, V] (float32).

        Afterwards the cache holds width + Q columns until :meth:`commit` compacts it.
        """
        if len(trees) != len(self.past):
            raise ValueError(f"{len(trees)} trees for a batch of {len(self.past)} rows")
        if self._appended:
            raise RuntimeError("verify() twice without commit()")
        for tree in trees:
            if len(tree) and int(tree.tokens.max()) >= self.vocab_size:
                raise ValueError(
                    f"a tree contains token ids >= the target's vocabulary size {self.vocab_size}"
                )
        ids, mask, positions = batch_inputs(
            trees, self.past, self.roots, self.width, dtype=self.dtype, device=self.device
        )
        with torch.inference_mode(), self.plan.forward(ids.numel()):
            if self.lean is not None:
                out = self.lean.forward_batch(ids, self.cache, mask=mask, positions=positions)
            else:
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **with_cache(self.model, self.cache),
                ).logits
        self._appended = ids.shape[1]
        logits = out.float()  # [B, Q, V]
        return [logits[b, : len(tree) + 1] for b, tree in enumerate(trees)]

    def commit(self, acceptances: Sequence[Acceptance]) -> None:
        """Per row: keep the root and the accepted path right after the row's past, drop the rest, advance
        the root; then crop the cache to the longest row."""
        if not self._appended:
            raise RuntimeError("commit() without verify()")
        if len(acceptances) != len(self.past):
            raise ValueError(f"{len(acceptances)} acceptances for a batch of {len(self.past)} rows")
        start = self.width  # where this step's queries begin
        rows, dst, src = [], [], []
        for b, acc in enumerate(acceptances):
            kept = [start] + [start + 1 + node for node in acc.path]  # root, then the accepted nodes
            for j, column in enumerate(kept):
                if column != self.past[b] + j:
                    rows.append(b)
                    dst.append(self.past[b] + j)
                    src.append(column)
            self.past[b] += len(kept)
            self.roots[b] = acc.bonus
        if rows:
            index = [torch.tensor(x, device=self.device) for x in (rows, src, dst)]
            with torch.inference_mode():  # the cache tensors are inference tensors
                for layer in self.cache.layers:
                    for name in ("keys", "values"):
                        t = getattr(layer, name)  # [B, H, S, D]
                        t[index[0], :, index[2]] = t[index[0], :, index[1]]  # reads before it writes
        self._crop_to(self.width)
        self._appended = 0

    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order): finished rows leave the batch."""
        if self._appended:
            raise RuntimeError("select() between verify() and commit(): commit the step first")
        rows = list(rows)
        if rows == list(range(len(self.past))):
            return
        self.past = [self.past[b] for b in rows]
        self.roots = [self.roots[b] for b in rows]
        if _layer_tensors(self.cache) is not None:
            with torch.inference_mode():
                self.cache.batch_select_indices(torch.tensor(rows, dtype=torch.long, device=self.device))
        self._crop_to(self.width)

    def _crop_to(self, width: int) -> None:
        extra = self.cache.get_seq_length() - width
        if extra > 0:
            self.cache.crop(-extra)


# Most tokens one packed prefill holds. Packing pays while the GEMMs are short of their efficiency (prompts
# of tens to a couple of hundred tokens); its attention is computed over the whole pack (the mask only
# zeroes the other prompts' weights), a waste that grows quadratically. Qwen2.5-Coder-1.5B, 2 EPYC (Zen 4)
# cores, random prompts, 2 rounds: four of 250 tokens 18.0-20.0 s one by one, 17.7-20.7 s in two packs of
# 500, 18.2-22.1 s in one of 1,000; four of 500 38.0-40.2 s alone, 40.2-45.3 s in packs of 1,000.
PACK_TOKENS = 512


def prefill_packs(lengths: Sequence[int], max_tokens: int = PACK_TOKENS) -> list[list[int]]:
    """Rows to prefill as one packed sequence: indices into ``lengths`` (tokens to prefill per row), first
    fit in order of decreasing length into packs of at most ``max_tokens`` tokens; a longer row is a pack
    of its own. Rows with nothing to prefill are in no pack."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    packs: list[list[int]] = []
    sizes: list[int] = []
    for b in sorted((b for b, n in enumerate(lengths) if n > 0), key=lambda b: -lengths[b]):
        fit = next((i for i, size in enumerate(sizes) if size + lengths[b] <= max_tokens), None)
        if fit is None:
            packs.append([b])
            sizes.append(lengths[b])
        else:
            packs[fit].append(b)
            sizes[fit] += lengths[b]
    return packs


def packed_inputs(
    lengths: Sequence[int], *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and positions of sequences of ``lengths`` tokens packed end to end into one row, each causal
    over itself only: additive ``mask`` [1, 1, N, N] (0 where attending, the dtype's minimum elsewhere)
    and ``position_ids`` [1, N] restarting at 0 for every sequence, N = sum(lengths). Built by the one mask
    function, :func:`rasd.tree.attention_inputs`, as a forest of chains fed with no committed chain."""
    counts = np.asarray(lengths, dtype=np.int64)
    n = int(counts.sum())
    starts = np.cumsum(counts) - counts
    parents = np.arange(-1, n - 1, dtype=np.int32)
    parents[starts[starts < n]] = -1  # each sequence's first token is a root of the forest
    forest = TokenTree(np.zeros(n, dtype=np.int64), parents)
    return attention_inputs(forest, 0, chain=0, dtype=dtype, device=device)


def _layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(keys, values) [B, H, S, D] per layer, or None while the cache holds nothing."""
    if cache.get_seq_length() == 0:
        return None
    return [(layer.keys, layer.values) for layer in cache.layers]


def _padded(
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None,
    template: list[tuple[torch.Tensor, torch.Tensor]],
    rows: int,
    width: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``layers`` right-padded with zeros to ``width`` columns (holes, masked), or all zeros for ``rows``
    rows with nothing cached yet (shapes from ``template``)."""
    out = []
    for i, (k, v) in enumerate(template):
        if layers is None:
            shape_k, shape_v = (rows, *k.shape[1:2], 0, k.shape[3]), (rows, *v.shape[1:2], 0, v.shape[3])
            mine_k, mine_v = k.new_zeros(shape_k), v.new_zeros(shape_v)
        else:
            mine_k, mine_v = layers[i]
        pad = width - mine_k.shape[2]
        if pad > 0:
            mine_k = torch.nn.functional.pad(mine_k, (0, 0, 0, pad))
            mine_v = torch.nn.functional.pad(mine_v, (0, 0, 0, pad))
        out.append((mine_k, mine_v))
    return out


# -- statistics -------------------------------------------------------------------------------------------
@dataclass
class BatchStats(GenerationStats):
    """:class:`GenerationStats` of a batched run: ``steps`` counts batched forwards, ``tokens_per_step`` and
    ``tree_sizes`` are summed over the rows of each forward. Per forward, also: the rows in it (request
    indices), the tokens each row fed (root + its nodes: the planner's split) and the padded width Q."""

    batch_rows: list[tuple[int, ...]] = field(default_factory=list)
    fed_tokens: list[tuple[int, ...]] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)

    @property
    def row_steps(self) -> int:
        """Row verifications (each row of each forward)."""
        return sum(len(r) for r in self.batch_rows)

    @property
    def tokens_per_row_step(self) -> float:
        """Mean tokens a row commits per forward it is in (the per-row accepted length)."""
        return self.new_tokens / self.row_steps if self.row_steps else 0.0

    @property
    def padding_share(self) -> float:
        """Fraction of the fed [B, Q] tokens that were padding."""
        padded = sum(len(r) * w for r, w in zip(self.batch_rows, self.widths, strict=True))
        return 1.0 - sum(map(sum, self.fed_tokens)) / padded if padded else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out |= {
            "row_steps": self.row_steps,
            "tokens_per_row_step": self.tokens_per_row_step,
            "padding_share": self.padding_share,
            "mean_width": float(np.mean(self.widths)) if self.widths else 0.0,
            "mean_fed_per_row": (
                float(np.mean([f for fed in self.fed_tokens for f in fed])) if self.fed_tokens else 0.0
            ),
        }
        return out


# -- the loop ---------------------------------------------------------------------------------------------
@dataclass
class _Row:
    """One request in flight."""

    request: int  # index of the request (output row)
    prompt: list[int]
    drafter: Drafter | None
    acceptance: AcceptanceModel
    slot: int  # the drafter slot it holds
    generated: list[int] = field(default_factory=list)


class BatchedGenerator:
    """Speculative generation for many prompts at once: all rows' trees in one target forward per step.

    Built from a :class:`rasd.SpeculativeGenerator` (same target, forward plan, planner and drafter parts;
    ``SpeculativeGenerator.generate`` with B > 1 rows uses one), or directly with the same arguments.
    The generator's drafters must be built-in ones (prompt / corpus lookup, recycling, draft model): each
    row gets its own, assembled from the same parts. A custom drafter instance cannot be copied per row:
    pass ``drafter_factory`` (a zero-argument callable returning a fresh :class:`rasd.drafting.Drafter`).
    """

    def __init__(
        self,
        generator: SpeculativeGenerator | torch.nn.Module,
        *,
        drafter_factory: Callable[[], Drafter | None] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(generator, SpeculativeGenerator):
            generator = SpeculativeGenerator(generator, **kwargs)
        elif kwargs:
            raise TypeError(
                f"pass either a SpeculativeGenerator or its arguments, not both: {sorted(kwargs)}"
            )
        self.base = generator
        self.target = generator.target
        self.plan = generator.plan
        self.planner: Planner | None = generator.planner
        self.max_tree_nodes = generator.max_tree_nodes
        self.cost_scale = 1.0  # measured / predicted seconds of batched forwards (context, padding, load)
        if drafter_factory is None:
            drafter_factory = _row_drafters(generator)
        if drafter_factory is None:
            raise ValueError(
                "this generator has a custom drafter, which cannot be copied for every row: pass "
                "drafter_factory=... (a callable returning a fresh drafter) or decode row by row "
                "(SpeculativeGenerator.generate(..., batch=False))"
            )
        self.drafter_factory = drafter_factory
        self._slots: list[Drafter | None] = []  # row drafters, reused across calls (recycling stays warm)
        self._curve = CostCurve.from_profile(self.plan.profile()) if self.plan.curves else None

    # -- public API -----------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        *,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        stop_strings: str | Sequence[str] = (),
        generator: torch.Generator | None = None,
        seed: int | None = None,
        stats: BatchStats | None = None,
    ) -> GenerationResult:
        """Generate for a batch; arguments and output as :meth:`rasd.SpeculativeGenerator.generate`.

        input_ids: [B, L] (left or right padding; ``attention_mask`` [B, L] marks the real tokens, 0 =
        padding, dropped per row). Returns ``sequences`` [B, L + new]: each input row as given, its new
        tokens, then ``pad_token_id`` (after EOS, or where other rows ran longer), as HF ``generate``.
        Every row's tokens equal that row generated alone (greedy) or follow the target's distribution
        (sampling). ``stats`` (a :class:`BatchStats`) is also the result's ``stats``.
        """
        ids = _as_ids(input_ids, self.target)
        if ids.dim() == 1:
            ids = ids[None]
        prompts = [p.tolist() for p in _row_prompts(ids, attention_mask)]
        pad = _pad_id(self.target, pad_token_id, self.base._eos_list(eos_token_id))
        stats = stats if stats is not None else BatchStats()
        new: dict[int, list[int]] = {}
        for request, tokens in self.serve(
            prompts,
            max_batch=len(prompts),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            eos_token_id=eos_token_id,
            stop_strings=stop_strings,
            generator=generator,
            seed=seed,
            stats=stats,
        ):
            new[request] = tokens
        rows = [ids[b].tolist() + new[b] for b in range(ids.shape[0])]
        return GenerationResult(_padded_rows(rows, pad, ids.device), stats)

    def serve(
        self,
        requests: Iterable[Sequence[int] | torch.Tensor],
        *,
        max_batch: int = 8,
        max_new_tokens: int = 128,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: str | Sequence[str] = (),
        generator: torch.Generator | None = None,
        seed: int | None = None,
        stats: BatchStats | None = None,
    ) -> Iterator[tuple[int, list[int]]]:
        """Continuous batching: up to ``max_batch`` requests in flight, a waiting one joins between steps as
        soon as a row finishes. ``requests``: prompts (1-D token ids), read lazily in order. Yields
        ``(request index, new tokens)`` as each request finishes (in finishing order)."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        _check_max_new_tokens(max_new_tokens)
        sampling = SamplingConfig.resolve(
            self.target, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
        )
        if generator is None and sampling.do_sample:
            generator = self.base._seeded_generator(seed)
        stopper = _StopChecker(self.base._eos_list(eos_token_id), stop_strings, self.base.tokenizer)
        stats = stats if stats is not None else BatchStats()
        view = self.planner.view() if self.planner is not None else None
        start = time.perf_counter()
        session = BatchedSession(self.target, plan=self.plan)
        waiting = enumerate(requests)
        rows: list[_Row] = []
        free = list(range(max_batch))
        try:
            while True:
                joining: list[tuple[int, DraftContext]] = []
                while len(rows) + len(joining) < max_batch:  # join: waiting requests, prefilled together
                    nxt = next(waiting, None)
                    if nxt is None:
                        break
                    request, prompt = nxt
                    tokens = _as_ids(prompt, self.target).reshape(-1).tolist()
                    if max_new_tokens == 0:
                        yield request, []
                        continue
                    joining.append(
                        (request, DraftContext(tuple(tokens), sampling, generator, max_new_tokens, view))
                    )
                    _warn_past_positions(self.target, len(tokens), max_new_tokens)
                if joining:
                    before = time.perf_counter()
                    session.add_many([context.prompt for _, context in joining])
                    rows.extend(self._join(request, context, free.pop(0)) for request, context in joining)
                    stats.time_prefill += time.perf_counter() - before
                if not rows:
                    return
                with self.plan.decode_threads():
                    done = self._step(
                        session, rows, sampling, generator, stopper, max_new_tokens, view, stats
                    )
                if done:
                    for row in (rows[b] for b in done):
                        free.append(row.slot)
                        yield row.request, row.generated
                    keep = [b for b in range(len(rows)) if b not in set(done)]
                    session.select(keep)
                    rows = [rows[b] for b in keep]
        finally:
            stats.time_total += time.perf_counter() - start

    # -- internals -----------------------------------------------------------------------------------
    def _join(self, request: int, context: DraftContext, slot: int) -> _Row:
        """Begin the drafter (slot ``slot``) of a request just prefilled into the batch."""
        while len(self._slots) <= slot:
            self._slots.append(self.drafter_factory())
        drafter = self._slots[slot]
        if drafter is not None:
            drafter.begin(context)
        shared = self.planner.acceptance if self.planner is not None else AcceptanceModel()
        acceptance = shared.for_request()  # shares what is learned over requests, own request factors
        return _Row(request, list(context.prompt), drafter, acceptance, slot)

    def _cost(self, fed: int) -> float:
        return self.cost_scale * self._curve(fed) if self._curve is not None else float(fed)

    def _fit(self, rows: list[_Row], proposals: list[Proposal], sunk: float) -> tuple[list[TokenTree], int]:
        trees = [p.tree for p in proposals]
        if self.planner is None:
            # No planner: every row's first max_tree_nodes nodes in best-first order of the prior estimate.
            prior = AcceptanceModel()
            trees = [
                keep_first(t, best_first_order(t.parents, prior.path_probs(t)), self.max_tree_nodes)
                for t in trees
            ]
            return trees, 1 + max(len(t) for t in trees)
        return plan_batch(
            trees,
            [row.acceptance for row in rows],
            self._cost,
            sunk_seconds=sunk,
            max_nodes=self.max_tree_nodes,
        )

    def _step(self, session, rows, sampling, generator, stopper, max_new_tokens, view, stats) -> list[int]:
        """One batched propose / plan / verify / accept / commit; returns the rows that finished."""
        t0 = time.perf_counter()
        proposals = [
            row.drafter.propose(StepBudget(self.max_tree_nodes, view))
            if row.drafter is not None and self.max_tree_nodes > 0
            else Proposal.empty()
            for row in rows
        ]
        setup = sum(_deferred_prefill_seconds(p) for p in proposals)  # set-up, not this step's drafting
        trees, width = self._fit(rows, proposals, time.perf_counter() - t0 - setup)
        t1 = time.perf_counter()
        logits = session.verify(trees)
        accs = [
            accept(tree, row_logits, sampling, generator)
            for tree, row_logits in zip(trees, logits, strict=True)
        ]
        session.commit(accs)
        t_verify = time.perf_counter() - t1
        if self._curve is not None:
            predicted = self._curve(len(rows) * width)
            self.cost_scale += _COST_SMOOTHING * (t_verify / predicted - self.cost_scale)
        for proposal in proposals:
            _book_draft_reports(proposal, stats)
        stats.steps += 1
        stats.drafted_steps += int(any(p.drafted for p in proposals))
        stats.time_verify += t_verify
        stats.time_draft += sum(p.draft_seconds for p in proposals)
        stats.time_retrieval += sum(p.retrieval_seconds for p in proposals)
        stats.tree_sizes.append(sum(len(t) for t in trees))
        stats.batch_rows.append(tuple(row.request for row in rows))
        stats.fed_tokens.append(tuple(len(t) + 1 for t in trees))
        stats.widths.append(width)
        done, committed = [], 0
        for b, (row, tree, acc) in enumerate(zip(rows, trees, accs, strict=True)):
            row.acceptance.observe(tree, acc)
            _credit(tree, acc, stats)
            context = row.prompt[-64:] + row.generated[-64:]  # a stop string may start in the prompt
            new, stop = stopper.cut(context, acc.tokens[: max_new_tokens - len(row.generated)])
            row.generated.extend(new)
            committed += len(new)
            if stop or len(row.generated) >= max_new_tokens:
                done.append(b)
            elif row.drafter is not None:
                row.drafter.advance(StepResult(tuple(acc.tokens), tree, tuple(acc.path), logits[b]))
        stats.tokens_per_step.append(committed)
        stats.new_tokens += committed
        return done


def _credit(tree: TokenTree, acc: Acceptance, stats: GenerationStats) -> None:
    for mask in tree.sources.tolist():
        for name in _source_names(mask):
            stats.proposed_by_source[name] = stats.proposed_by_source.get(name, 0) + 1
    for node in acc.path:
        for name in _source_names(int(tree.sources[node])):
            stats.accepted_by_source[name] = stats.accepted_by_source.get(name, 0) + 1


def _row_drafters(generator: SpeculativeGenerator) -> Callable[[], Drafter | None] | None:
    """A factory of row drafters assembled from the generator's built-in drafter parts (None: the generator
    has a custom drafter). The datastore is opened once and the recycling table is one for every row."""
    parts = generator.drafter_parts
    if parts is None:
        return None
    store = parts["datastore"]
    if store is not None and not isinstance(store, Datastore) and not hasattr(store, "matcher"):
        store = Datastore.load(store, tokenizer=generator.tokenizer)
    elif store is not None and generator.tokenizer is not None and hasattr(store, "check_tokenizer"):
        store.check_tokenizer(generator.tokenizer)
    recycling = parts["recycling"]
    config = recycling if isinstance(recycling, RecyclingConfig) else RecyclingConfig()
    vocab = generator.target.get_output_embeddings().weight.shape[0]
    table = TokenRecycling(vocab, config).table if recycling else None

    def make() -> Drafter | None:
        retrievers: list[Drafter] = []
        if parts["prompt_lookup"]:
            retrievers.append(PromptLookup())
        if store is not None:
            retrievers.append(CorpusLookup(store))
        if table is not None:
            recycler = TokenRecycling(vocab, config)
            recycler.table = table  # one table: every row's verifications teach every row
            retrievers.append(recycler)
        draft = None
        if parts["draft"] is not None:
            fast = "auto" if parts["fast_path"] else False
            draft = DraftModel(parts["draft"], config=parts["draft_config"], fast_path=fast)
        if not retrievers and draft is None:
            return None
        if len(retrievers) == 1 and draft is None:
            return retrievers[0]
        return Fused(retrievers, draft, overlap=parts["overlap"])

    return make
