"""A small draft model (same tokenizer as the target) that grows a dynamic tree, EAGLE-2 style.

One ``propose`` call:

1. **catch up**: one forward of the draft over the tokens committed since its last forward (the last one is
   the root); its logits at the root give the first level of children.
2. **candidates**: every node whose parent has been fed through the draft gets its draft probability
   p(node | path); every fed node contributes its ``top_k`` most likely children (or, when sampling, ``top_k``
   draws without replacement from the draft distribution). Seed nodes (retrieval trees, fused by
   longest-prefix matching) are candidates like any other and are scored the same way.
3. **expand**: feed the ``beam`` unfed candidates with the highest estimated path probability through the
   draft in one tree-attention forward (they see the committed text and their fed ancestors), which yields
   their children; repeat while the planner says one more forward raises the step's expected tokens per
   second (or up to ``max_depth`` forwards without a planner).
4. **select**: the planner keeps the best-first prefix of all candidates that maximises the expected rate.

The draft's KV cache keeps the committed text; tree entries are cropped away in ``advance``. Draft weights
may run in bf16 (``weights="bf16"``): the draft only proposes, so its precision changes speed and
acceptance, never the output.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rasd.costmodel import PathChoice
from rasd.fastpath import FastPath, FastPathConfig
from rasd.tree import Source, TokenTree
from rasd.verify import SamplingConfig, check_model, fill_cache, with_cache


@dataclass(frozen=True)
class DraftTreeConfig:
    """top_k: children taken from each fed node's distribution.
    beam: candidates fed per expansion forward.
    max_depth: expansion forwards per step at most (the planner usually stops earlier).
    max_nodes: candidates kept at most before selection.
    seed_feed: retrieval (seed) nodes fed through the draft together with the catch-up forward, so their
        subtrees are scored (and extendable) without extra forwards; the best ones by retrieval estimate.
    weights: "bf16" or "fp32" weights for the CPU fast paths of the draft (ignored off CPU). With "bf16" the
        native kernel and torch's bf16 matmul are both offered, and each forward size runs on whichever
        of them or plain fp32 torch measured fastest (:class:`rasd.costmodel.PathChoice`).
    context: the draft sees only the last ``context`` prompt tokens (None: all). Prefilling a long prompt
        through the draft costs about draft/target of the target's prefill, which short answers never earn
        back; retrieval (prompt lookup) still copies from the whole prompt. Changes speed, never the output.
    """

    top_k: int = 6
    beam: int = 4
    max_depth: int = 8
    max_nodes: int = 96
    seed_feed: int = 8
    weights: str = "bf16"
    context: int | None = None

    def __post_init__(self) -> None:
        if self.context is not None and self.context < 1:
            raise ValueError(f"context must be >= 1 or None, got {self.context}")
        if self.seed_feed < 0:
            raise ValueError(f"seed_feed must be >= 0, got {self.seed_feed}")
        for name in ("top_k", "beam", "max_depth", "max_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.weights not in ("bf16", "fp32"):
            raise ValueError(f"weights must be 'bf16' or 'fp32', got {self.weights!r}")


class _Nodes:
    """Growing candidate set (parent-pointer arrays plus what the draft learned about each node)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.sources: list[int] = []
        self.scores: list[float] = []
        self.draft_p: list[float] = []
        self.q_rows: list[int] = []
        self.slot: list[int] = []  # KV cache index once fed, else -1
        self.draw: list[int] = []  # order among sampled siblings (draws without replacement), -1 if not drawn
        self.match_len: list[int] = []  # retrieval match length (0 for draft nodes)
        self.children: dict[int, dict[int, int]] = {-1: {}}  # node -> token -> child (insertion order)
        self.depth: list[int] = []

    def add(self, token: int, parent: int, source: int, score: float, draft_p: float = math.nan) -> int:
        existing = self.children[parent].get(token)
        if existing is not None:
            self.sources[existing] |= source
            self.scores[existing] = max(self.scores[existing], score)
            if math.isnan(self.draft_p[existing]):
                self.draft_p[existing] = draft_p
            return existing
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.sources.append(source)
        self.scores.append(score)
        self.draft_p.append(draft_p)
        self.q_rows.append(-1)
        self.slot.append(-1)
        self.draw.append(-1)
        self.match_len.append(0)
        self.depth.append(1 if parent < 0 else self.depth[parent] + 1)
        self.children[parent][token] = node
        self.children[node] = {}
        return node

    def __len__(self) -> int:
        return len(self.tokens)

    def tree(self, q_dists: torch.Tensor | None) -> TokenTree:
        """Candidates as a TokenTree, siblings ordered for the verifier: sampled draws first (in draw
        order), then the rest by score."""
        order: list[int] = []
        remap = {-1: -1}
        queue = collections.deque([-1])
        while queue:  # breadth first: parents before children, siblings in try order
            node = queue.popleft()
            kids = list(self.children[node].values())
            sampled = sorted((k for k in kids if self.q_rows[k] >= 0), key=lambda k: self.draw[k])
            rest = sorted((k for k in kids if self.q_rows[k] < 0), key=lambda k: -self.scores[k])
            for kid in sampled + rest:
                remap[kid] = len(order)
                order.append(kid)
                queue.append(kid)
        idx = np.asarray(order, dtype=np.int64)
        return TokenTree(
            np.asarray(self.tokens)[idx] if len(idx) else [],
            [remap[self.parents[i]] for i in order],
            scores=np.asarray(self.scores)[idx] if len(idx) else None,
            sources=np.asarray(self.sources)[idx] if len(idx) else None,
            draft_probs=np.asarray(self.draft_p)[idx] if len(idx) else None,
            match_lengths=np.asarray(self.match_len)[idx] if len(idx) else None,
            q_rows=np.asarray(self.q_rows)[idx] if len(idx) else None,
            q_dists=q_dists,
        ), order


class DraftModel:
    """Drafter backed by a small causal LM sharing the target's tokenizer.

    planner: a :class:`rasd.planner.Planner` deciding depth and size; without one, ``max_depth``
        forwards are always run and the top ``budget`` candidates by path probability are kept.
    sampling: when ``do_sample`` the children are drawn without replacement from the draft distribution
        (processed like the target's) and carry it as ``q`` for lossless acceptance.
    """

    source = Source.DRAFT

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        config: DraftTreeConfig | None = None,
        planner=None,
        sampling: SamplingConfig | None = None,
        generator: torch.Generator | None = None,
        fast_path: bool | str = "auto",
    ) -> None:
        check_model(model)
        self.model = model
        self.config = config or DraftTreeConfig()
        self.planner = planner
        self.sampling = sampling or SamplingConfig()
        self.generator = generator
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if fast_path == "auto":
            fast_path = param.device.type == "cpu" and param.dtype == torch.float32
        self.paths: PathChoice | None = None
        if fast_path:
            # Each forward size (and the prefill) runs on whichever path measured fastest on this machine.
            paths = [FastPath.for_model(model, FastPathConfig(weights=self.config.weights, max_rows=64))]
            if self.config.weights == "bf16":
                paths.append(FastPath.for_model(model, FastPathConfig(weights="bf16", backend="torch")))
            self.paths = PathChoice(model, paths)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.cache = None
        self.past = 0
        self.pending: list[int] = []
        self.fed_pending = False
        self.child_prob = 0.7  # running mean of the best child's estimated acceptance after a feed
        self.forwards = 0
        self.seconds = 0.0

    # -- protocol ----------------------------------------------------------------------------------
    def configure_sampling(self, sampling: SamplingConfig, generator: torch.Generator | None) -> None:
        """Sample children from the draft (processed like the target) when the target samples."""
        self.sampling = sampling
        self.generator = generator

    def begin(self, prompt: Sequence[int]) -> None:
        from transformers import DynamicCache

        prompt = list(prompt)
        if not prompt:
            raise ValueError("the prompt is empty")
        self.cache = DynamicCache(config=self.model.config)
        self.past = 0
        if self.config.context is not None:
            prompt = prompt[-self.config.context :]
        if len(prompt) > 1:
            rows = len(prompt) - 1
            with self.paths.context(rows, prefill=True) if self.paths else contextlib.nullcontext():
                fill_cache(self.model, torch.tensor([prompt[:-1]], device=self.device), self.cache)
            self.past = len(prompt) - 1
        self.pending = [prompt[-1]]
        self.fed_pending = False

    def propose(
        self,
        budget: int,
        seed: TokenTree | Callable[[], TokenTree] | None = None,
        *,
        sunk_seconds: float = 0.0,
    ) -> TokenTree:
        """A tree of at most ``budget`` nodes. ``seed`` (deterministic retrieval nodes, or a callable that
        returns them once the catch-up forward is done) joins the candidates."""
        start = time.perf_counter()
        nodes = _Nodes()
        q_dists: list[torch.Tensor] = []
        seed_nodes: list[int] = []
        if seed is not None and not callable(seed):
            seed_nodes = self._add_seed(nodes, seed)
        # The catch-up forward also feeds the most promising seed nodes (ancestor-closed), so the draft
        # scores the retrieval subtrees below them in the same pass.
        fed_seeds = self._seeds_to_feed(nodes, seed_nodes, q_dists)
        root_logits, seed_logits = self._catch_up(nodes, fed_seeds)
        if callable(seed):  # retrieval ran concurrently with the catch-up forward; collect it now
            self._add_seed(nodes, seed())
        self._add_children(nodes, -1, root_logits, q_dists)
        for node, row in zip(fed_seeds, seed_logits, strict=True):
            self._add_children(nodes, node, row, q_dists)
        for _ in range(self.config.max_depth):
            frontier = self._frontier(nodes, q_dists)
            if not frontier:
                break
            if self.planner is not None:
                current, order = nodes.tree(torch.stack(q_dists) if q_dists else None)
                position = {node: i for i, node in enumerate(order)}
                elapsed = sunk_seconds + time.perf_counter() - start
                m = self.planner.plan_expansion(
                    current, [position[f] for f in frontier], elapsed, self.child_prob, max_nodes=budget
                )
                frontier = frontier[:m]
                if not frontier:
                    break
            logits = self._feed(nodes, frontier)
            for node, row in zip(frontier, logits, strict=True):
                self._add_children(nodes, node, row, q_dists)
            if len(nodes) >= self.config.max_nodes:
                break
        tree, _ = nodes.tree(torch.stack(q_dists) if q_dists else None)
        if self.planner is not None:
            tree = self.planner.trim(tree, sunk_seconds + time.perf_counter() - start, max_nodes=budget)
        elif len(tree) > budget:
            from rasd.planner import AcceptanceModel, best_first_order

            order = best_first_order(tree, AcceptanceModel().path_probs(tree))[:budget]
            keep = np.zeros(len(tree), dtype=bool)
            keep[order] = True
            tree = tree.subtree(keep)
        return tree

    def _add_seed(self, nodes: _Nodes, seed: TokenTree) -> list[int]:
        if (seed.q_rows >= 0).any():
            raise ValueError("seed trees must be deterministic (retrieval) trees")
        mapped: list[int] = []
        for i, (tok, par) in enumerate(zip(seed.tokens.tolist(), seed.parents.tolist(), strict=True)):
            parent = -1 if par < 0 else mapped[par]
            mapped.append(nodes.add(tok, parent, int(seed.sources[i]), float(seed.scores[i])))
            nodes.match_len[mapped[-1]] = max(nodes.match_len[mapped[-1]], int(seed.match_lengths[i]))
        return mapped

    def _seeds_to_feed(self, nodes: _Nodes, seed_nodes: list[int], q_dists: list[torch.Tensor]) -> list[int]:
        if not seed_nodes or self.config.seed_feed == 0:
            return []
        path = self._path_probs(nodes, q_dists)
        from rasd.planner import _best_first

        order = _best_first(nodes.parents, path)  # ancestor-closed by construction
        # Feeding a seed only pays if its children could be accepted: its own path must be plausible.
        plausible = [i for i in order[: self.config.seed_feed] if path[i] >= 0.25]
        keep = set(plausible)
        return sorted(i for i in plausible if nodes.parents[i] < 0 or nodes.parents[i] in keep)

    def advance(self, tokens: Sequence[int]) -> None:
        if self.fed_pending:
            # Drop the tree entries; the committed tokens fed so far stay in the cache.
            self.past += len(self.pending)
            extra = self.cache.get_seq_length() - self.past
            if extra > 0:
                self.cache.crop(-extra)
            self.pending = list(tokens)
        else:
            self.pending.extend(tokens)
        self.fed_pending = False

    # -- internals ---------------------------------------------------------------------------------
    def _forward(
        self, ids: list[int], mask: torch.Tensor, positions: torch.Tensor, *, expansion: bool = True
    ) -> torch.Tensor:
        start = time.perf_counter()
        path = self.paths.context(len(ids)) if self.paths is not None else contextlib.nullcontext()
        with torch.inference_mode(), path:
            out = self.model(
                input_ids=torch.tensor([ids], device=self.device),
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **with_cache(self.model, self.cache),
            )
        elapsed = time.perf_counter() - start
        self.forwards += 1
        self.seconds += elapsed
        if self.planner is not None and expansion:
            # Only expansion forwards price the next expansion; the catch-up is sunk by then.
            self.planner.record_draft_forward(elapsed)
        return out.logits[0].float()

    def _catch_up(self, nodes: _Nodes, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the pending committed tokens (causal among themselves) and the given seed nodes (each sees
        the committed text and its seed ancestors). Returns the root's logits [V] and the seeds' [m, V]."""
        n, m = len(self.pending), len(seeds)
        total = self.past + n + m
        allowed = torch.zeros(n + m, total, dtype=torch.bool)
        allowed[:, : self.past] = True
        allowed[:n, self.past : self.past + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
        allowed[n:, self.past : self.past + n] = True
        row_of = {node: j for j, node in enumerate(seeds)}
        for j, node in enumerate(seeds):
            a = node
            while a >= 0:
                allowed[n + j, self.past + n + row_of[a]] = True
                a = nodes.parents[a]
        base = self.past + n
        positions = torch.tensor(
            [[*range(self.past, base), *(base - 1 + nodes.depth[s] for s in seeds)]], device=self.device
        )
        logits = self._forward(
            self.pending + [nodes.tokens[s] for s in seeds],
            _additive(allowed.to(self.device), self.dtype),
            positions,
            expansion=False,
        )
        self.fed_pending = True
        for j, node in enumerate(seeds):
            nodes.slot[node] = base + j
        return logits[n - 1], logits[n:]

    def _feed(self, nodes: _Nodes, frontier: list[int]) -> torch.Tensor:
        """One tree-attention forward of ``frontier`` (nodes whose parents are fed); returns logits [m, V]."""
        base = self.past + len(self.pending)
        cached = self.cache.get_seq_length()
        m = len(frontier)
        allowed = torch.zeros(m, cached + m, dtype=torch.bool)
        allowed[:, :base] = True
        for j, node in enumerate(frontier):
            parent = nodes.parents[node]
            while parent >= 0:
                allowed[j, nodes.slot[parent]] = True
                parent = nodes.parents[parent]
            allowed[j, cached + j] = True
        positions = torch.tensor([[base - 1 + nodes.depth[n] for n in frontier]], device=self.device)
        logits = self._forward(
            [nodes.tokens[n] for n in frontier], _additive(allowed.to(self.device), self.dtype), positions
        )
        for j, node in enumerate(frontier):
            nodes.slot[node] = cached + j
        return logits

    def _add_children(
        self, nodes: _Nodes, node: int, logits: torch.Tensor, q_dists: list[torch.Tensor]
    ) -> None:
        """Score the existing children of a freshly fed node and add its own top-k (or sampled) children."""
        logits = logits[: self.vocab_size]
        probs = torch.softmax(logits, -1)
        for token, child in nodes.children[node].items():
            if math.isnan(nodes.draft_p[child]) and token < probs.shape[0]:
                nodes.draft_p[child] = float(probs[token])
        k = self.config.top_k
        if self.sampling.do_sample:
            q = self.sampling.probs(logits[None])[0]
            row = len(q_dists)
            q_dists.append(q)
            # Gumbel-top-k = k sequential draws without replacement from q, in draw order.
            gumbel = -torch.log(
                -torch.log(torch.rand(q.shape, generator=self.generator, device=q.device).clamp_min(1e-20))
            )
            keys = torch.where(q > 0, torch.log(q.clamp_min(1e-30)) + gumbel, torch.full_like(q, -math.inf))
            draws = torch.topk(keys, min(k, int((q > 0).sum()))).indices.tolist()
            for rank, token in enumerate(draws):
                child = nodes.add(token, node, int(Source.DRAFT), float(probs[token]), float(probs[token]))
                nodes.q_rows[child] = row
                nodes.draw[child] = rank
        else:
            top = torch.topk(probs, k)
            for p, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                nodes.add(token, node, int(Source.DRAFT), p, p)
        if self.planner is not None and node >= 0:
            best = TokenTree([0], [-1], draft_probs=[float(probs.max())], sources=[int(Source.DRAFT)])
            self.child_prob = 0.9 * self.child_prob + 0.1 * float(self.planner.acceptance.node_probs(best)[0])

    def _path_probs(self, nodes: _Nodes, q_dists: list[torch.Tensor]) -> np.ndarray:
        """Estimated path probability of every candidate, in _Nodes order."""
        tree, order = nodes.tree(None if not q_dists else torch.stack(q_dists))
        if self.planner is not None:
            path = self.planner.acceptance.path_probs(tree)
        else:
            from rasd.planner import AcceptanceModel

            path = AcceptanceModel().path_probs(tree)
        out = np.zeros(len(nodes))
        out[np.asarray(order, dtype=np.int64)] = path
        return out

    def _frontier(self, nodes: _Nodes, q_dists: list[torch.Tensor]) -> list[int]:
        """The ``beam`` unfed candidates (whose parents are fed) with the highest path probability."""
        path = self._path_probs(nodes, q_dists)
        ready = [
            i
            for i in range(len(nodes))
            if nodes.slot[i] < 0 and (nodes.parents[i] < 0 or nodes.slot[nodes.parents[i]] >= 0)
        ]
        ready.sort(key=lambda i: -path[i])
        return [i for i in ready[: self.config.beam] if path[i] > 1e-4]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [q, kv] -> additive 4D mask [1, 1, q, kv] in ``dtype`` (0 where allowed)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
