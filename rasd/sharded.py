"""Corpus datastores sharded by document and served by Ray actors, with retrieval merged exactly.

>>> manifest = build_sharded_datastore(documents, tokenizer, "code.json", shards=4)  # or `--shards 4`
>>> store = ShardedDatastore.open(manifest)        # one Ray actor per shard; each mmaps its own file
>>> tree = store.retrieve(context, max_nodes=32)   # == Datastore.retrieve on the unsharded corpus
>>> rasd.generate(model, ids, datastore=store, tokenizer=tok)   # CorpusLookup takes it like a Datastore

**Sharding.** Every document goes whole to one shard (the one with the fewest tokens so far), so no match
crosses a shard boundary and the occurrence count of any string in the whole corpus is the sum of its counts
in the shards: count(s) = sum_i count_i(s).

**What the single store computes** (``Datastore.retrieve``): the longest suffix s of the context that occurs
(length L; with ``backoff_min_count`` it may move to a shorter suffix, see below), then a best-first walk of
the trie of continuations of s: a max-heap on (count desc, token asc, parent index asc), seeded with the
children of s; each pop emits a node and pushes its children; ``max_nodes`` pops, depth <= ``max_depth``,
children below ``min_count`` never pushed. A ratio score is count / (1 + total), total = the summed counts of
*all* children of the parent. Counts never grow down a path, so pops come in non-increasing count order.

**Why merging per-shard trees is not exact.** The global L is max_i L_i, and only shards with L_i == L
contribute (a shorter match elsewhere is a different suffix). Among those, a node whose count is split over
shards can be in the global top N without being in any shard's top N, and a parent's total includes children
no shard returned; summing truncated trees therefore mis-ranks and mis-scores.

**The protocol here is exact.** The coordinator replays the single store's heap walk on the summed counts,
and pops a node only when that pop is certain:

1. *Probe* (one round, every shard): each shard matches the context (L_i) and returns its own best-first tree
   of N+1 nodes at L_i with exact counts, the totals of the nodes' children (recovered from a count pass and a
   ratio pass over the same tree: total + 1 = round(count / ratio), checked by recomputing the ratio), and a
   bound m_i: every node it did not return has count_i <= m_i (the (N+1)-th pop's count; 0 when the tree
   holds every node). Shards with L_i < L are dropped.
2. *Replay*: per shard, a node's count is known (returned), known to be 0 (its parent's children are all
   known: returned children sum to the parent's total, or the parent was expanded), or bounded by
   u_i = min(m_i, parent's total - its known children). A candidate is exact when every shard knows it;
   an uncertain candidate (or the unknown children of a popped node, as one "phantom") has an upper bound.
   The top exact candidate is popped only if every uncertain bound is strictly smaller than its count: then no
   uncertain candidate can come first, and the pop equals the single store's. Ratio scores need every
   shard's total of the parent.
3. *Expand* (extra rounds, only where a pop was uncertain): the shards named are asked for the complete child
   list of those nodes (exact counts and totals), and the replay restarts. Each round makes some node
   complete in some shard, so the rounds end; in practice most queries need none.

**Back-off** (``backoff_min_count=k``): the single store moves up suffix links while the continuations
(sum of children counts) of the current suffix are fewer than k, stopping below ``min_match``. A suffix link
jumps to the longest shorter suffix with strictly more occurrences; since the summed count grows exactly
where some shard's count grows, the global link lengths are the union of the shards' (each shard reports its
own from L_i downwards, found by binary search on occurrence counts, and stops once its own continuations
reach k, below which the global walk never goes). Exact for ``min_match >= 2``; with ``min_match == 1``
the occurrence count of a single token is not reachable through the datastore's public API (see the module's
NOTE), so that combination is refused.

NOTE: shards read their files only through the public ``Datastore`` API, whose raw counts are float32
(exact below 2**24; larger counts raise rather than merge inexactly). An int64 children-with-counts query in
the core would remove that limit, the ratio pass and the min_match restriction.
"""

from __future__ import annotations

import bisect
import heapq
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rasd._assets import write_json_atomic
from rasd.datastore import Datastore, TokenizerIdentity, tokenize_documents, tokenizer_fingerprint
from rasd.tree import Source, TokenTree

MANIFEST_FORMAT = "rasd-sharded-datastore"
MANIFEST_VERSION = 1
_EXACT_COUNT = 1 << 24  # float32 holds every integer below this (the public API returns float32 counts)
_EXACT_TOTAL = 1 << 23  # total + 1 = round(count / ratio) is exact below this (float32 ratio)
# Per-shard trees of 4x the query's nodes: on 4 shards of 1,500 stdlib modules (64-node queries while
# decoding held-out code) expansion rounds per query fell 0.61 -> 0.41 -> 0.29 for 1x, 2x, 4x, with the same
# median latency in process; each round saved is a network round trip.
_TREE_FACTOR = 4
_EMPTY_I32 = np.zeros(0, np.int32)
_EMPTY_I64 = np.zeros(0, np.int64)


# -- the manifest and the build ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    """One shard file: ``path`` relative to the manifest's directory, its size in documents and tokens."""

    path: str
    documents: int
    tokens: int


@dataclass(frozen=True)
class Manifest:
    """What ``rasd datastore build --shards N`` writes next to the shard files (JSON)."""

    tokenizer: TokenizerIdentity
    shards: tuple[ShardInfo, ...]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read sharded-datastore manifest {path}: {exc}") from None
        if raw.get("format") != MANIFEST_FORMAT or raw.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"{path} is not a version-{MANIFEST_VERSION} sharded-datastore manifest; build one with "
                "`rasd datastore build --shards N`"
            )
        return cls(
            TokenizerIdentity(**raw["tokenizer"]), tuple(ShardInfo(**shard) for shard in raw["shards"])
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (a temporary file renamed into place), like the shard files."""
        path = Path(path)
        body = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "tokenizer": asdict(self.tokenizer),
            "shards": [asdict(s) for s in self.shards],
        }
        write_json_atomic(path, body, indent=1)


def build_sharded_datastore(
    documents: Iterable[str | tuple[str, str]],
    tokenizer: Any,
    out: str | os.PathLike,
    shards: int,
    *,
    progress: bool = True,
) -> Path:
    """Tokenize ``documents`` into ``shards`` datastores, each document whole in the shard with the fewest
    tokens so far, and write them next to the manifest ``out`` (JSON) as ``<stem>.shard-I-of-N.rasd``.
    Returns the manifest's path. The shards are built in memory together (as much memory as one store)."""
    from tqdm.auto import tqdm

    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    out = Path(out)
    stores = [Datastore(vocab_size=len(tokenizer)) for _ in range(shards)]
    sizes = [0] * shards
    bar = tqdm(desc=f"tokenize + build {shards} shards", unit="doc", disable=not progress)
    for batch in tokenize_documents(documents, tokenizer):
        for ids in batch:
            if ids:
                i = sizes.index(min(sizes))
                stores[i].add(ids)
                sizes[i] += len(ids)
        bar.update(len(batch))
    bar.close()
    if min(sizes) == 0:
        raise ValueError(
            f"only {sum(s.num_documents for s in stores)} non-empty documents for {shards} shards: "
            "use fewer shards"
        )
    infos = []
    for i, store in enumerate(stores):
        name = f"{out.stem}.shard-{i:03d}-of-{shards:03d}.rasd"
        store.save(out.with_name(name), tokenizer=tokenizer)
        infos.append(ShardInfo(name, store.num_documents, len(store)))
    Manifest(tokenizer_fingerprint(tokenizer), tuple(infos)).save(out)
    return out


# -- one shard's side of the protocol (a Ray actor, or in-process) ----------------------------------------
@dataclass(frozen=True)
class ShardTree:
    """One shard's best-first retrieval tree at a suffix, with what the exact merge needs.

    tokens:  int32 [n]   node tokens, best-first (as ``Datastore.retrieve``).
    parents: int32 [n]   parent index, -1 = child of the root (the suffix).
    counts:  int64 [n]   occurrences of the suffix + the node's path in this shard.
    totals:  int64 [n]   sum of the counts of *all* the node's children in this shard, -1 where unknown.
    root_total: the same for the root, -1 where unknown.
    bound:   every node of this shard not in the tree (within ``depth``) has count <= bound; 0 = complete.
    depth:   the depth limit the tree was built with.
    """

    tokens: np.ndarray
    parents: np.ndarray
    counts: np.ndarray
    totals: np.ndarray
    root_total: int
    bound: int
    depth: int


@dataclass(frozen=True)
class ShardProbe:
    """A shard's answer to a fed context: its match ``length`` L_i, its tree at L_i (when asked and
    L_i >= the asked min_match) and its suffix-link chain (when asked: ``(length, continuations)`` pairs
    from L_i down; it ends at the first with continuations >= k, or where the next is below min_match)."""

    length: int
    tree: ShardTree | None
    chain: tuple[tuple[int, int], ...] | None


def _exact_counts(scores: np.ndarray, where: str) -> np.ndarray:
    """int64 counts from the float32 raw counts the public API returns (refused where float32 rounds)."""
    if len(scores) and float(scores.max()) >= _EXACT_COUNT:
        raise ValueError(
            f"{where}: a count of {float(scores.max()):.0f} is past float32's exact range, so shards cannot "
            "be merged exactly; use more, smaller shards"
        )
    return scores.astype(np.int64)


class ShardIndex:
    """One shard file, mapped read-only, answering the merge protocol's three questions (see module docs).

    Stateless between calls: every call carries the tokens it needs, so actors can be restarted or shared.
    """

    def __init__(self, path: str, identity: TokenizerIdentity | None = None, verify: bool | None = None):
        self.store = Datastore.load(path, verify=verify)
        self.path = path
        # max_nodes for a complete child list: no state has more children than the vocabulary has tokens.
        self._all = self.store.vocab_size or np.iinfo(np.int32).max
        if identity is not None:
            mine = self.store.info()
            if mine["tokenizer_hash"] != identity.vocab_hash:
                raise ValueError(
                    f"shard {path} was built with tokenizer {mine['tokenizer']!r}, not the manifest's "
                    f"{identity.name!r}: rebuild the shards together with `rasd datastore build --shards N`"
                )

    def info(self) -> dict[str, Any]:
        """The shard's ``Datastore.info()`` plus where it is served: host, process and Ray node (if any)."""
        import socket
        import sys

        ray = sys.modules.get("ray")  # imported in an actor; never imported here just to ask
        node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
        return self.store.info() | {"host": socket.gethostname(), "pid": os.getpid(), "node": node}

    def probe(
        self,
        window: np.ndarray,
        tree: tuple[int, int, int] | None,
        chain: tuple[int, int] | None,
    ) -> ShardProbe:
        """Match ``window`` (int32 [W], a context suffix at least as long as this shard's match); with
        ``tree=(max_nodes, max_depth, min_match)`` also return the tree at the match, with
        ``chain=(min_match, k)`` the back-off chain."""
        length = self.store.match(window)
        found = None
        if tree is not None and length >= max(1, tree[2]):
            found = self.tree(window[len(window) - length :], tree[0], tree[1])
        links = self.chain(window[len(window) - length :], *chain) if chain is not None else None
        return ShardProbe(length, found, links)

    def tree(self, suffix: np.ndarray, max_nodes: int, max_depth: int) -> ShardTree:
        """This shard's best-first tree of max_nodes + 1 nodes continuing ``suffix`` (int32 [L])."""
        n = max_nodes + 1
        counted = self.store.retrieve(suffix, n, max_depth, min_match=len(suffix), score="count")
        if not len(counted):
            return ShardTree(_EMPTY_I32, _EMPTY_I32, _EMPTY_I64, _EMPTY_I64, 0, 0, max_depth)
        ratio = self.store.retrieve(suffix, n, max_depth, min_match=len(suffix), score="ratio")
        # The two passes walk the same tree (the walk depends on counts only, never on the scoring).
        assert np.array_equal(counted.tokens, ratio.tokens) and np.array_equal(counted.parents, ratio.parents)
        counts = _exact_counts(counted.scores, self.path)
        plus_one = np.rint(counts / ratio.scores.astype(np.float64))
        ok = plus_one < _EXACT_TOTAL
        plus_one = np.where(ok, plus_one, 1.0)
        # Recompute the core's float32 ratio from the candidate total: equal only for the true total.
        ok &= np.float32(counts) / np.float32(plus_one) == ratio.scores
        parents = counted.parents
        totals = np.full(len(counts), -1, np.int64)
        child = ok & (parents >= 0)
        totals[parents[child]] = plus_one[child].astype(np.int64) - 1
        root = ok & (parents < 0)
        root_total = int(plus_one[root][0]) - 1 if root.any() else -1
        bound = int(counts[-1]) if len(counts) == n else 0
        return ShardTree(counted.tokens, parents, counts, totals, root_total, bound, max_depth)

    def children(self, text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every token that follows ``text`` (int32 [>= 1]) here, with its count: int32 [k], int64 [k]."""
        kids = self.store.retrieve(text, self._all, 1, min_match=len(text), score="count")
        return kids.tokens, _exact_counts(kids.scores, self.path)

    def expand(
        self, suffix: np.ndarray, paths: Sequence[np.ndarray], max_nodes: int, max_depth: int
    ) -> list[tuple[ShardTree, tuple[np.ndarray, np.ndarray] | None]]:
        """For each path: this shard's tree below suffix + path (``max_nodes`` + 1 nodes, depth
        ``max_depth - len(path)``; it carries the knowledge the next pops are likely to need, so a chain
        of expansions costs one round) and, unless that tree already holds all of them, the complete list
        of the path's children (tokens, counts)."""
        out = []
        for path in paths:
            text = np.concatenate([suffix, path]).astype(np.int32)
            below = self.tree(text, max_nodes, max_depth - len(path))
            first = below.parents < 0
            whole = below.bound == 0 or int(below.counts[first].sum()) == below.root_total
            out.append((below, None if whole else self.children(text)))
        return out

    def _count(self, text: np.ndarray) -> int:
        """Occurrences of ``text`` (int32 [>= 2]) in this shard: its last token's count among the children
        of the rest."""
        tokens, counts = self.children(text[:-1])
        hit = np.flatnonzero(tokens == text[-1])
        return int(counts[hit[0]]) if len(hit) else 0

    def chain(self, suffix: np.ndarray, min_match: int, k: int) -> tuple[tuple[int, int], ...]:
        """The lengths of this shard's suffix-link chain from ``len(suffix)`` down (each the longest suffix
        with more occurrences than the one before) with their continuation counts, down to the first with
        >= k continuations or to ``min_match``."""
        if min_match < 2:
            raise ValueError("exact sharded back-off needs min_match >= 2 (see rasd.sharded)")
        links = []
        top = len(suffix)
        while top >= min_match:
            continuations = int(self.children(suffix[len(suffix) - top :])[1].sum())
            links.append((top, continuations))
            if continuations >= k:
                break
            # The next link: the longest shorter suffix with more occurrences (counts only grow as the
            # suffix shortens, so binary search); none at or above min_match ends the chain.
            here = self._count(suffix[len(suffix) - top :])
            lo, hi = min_match, top - 1
            top = 0
            while lo <= hi:
                mid = (lo + hi) // 2
                if self._count(suffix[len(suffix) - mid :]) > here:
                    top, lo = mid, mid + 1
                else:
                    hi = mid - 1
        return tuple(links)


# -- the coordinator: exact replay of the single store's walk ---------------------------------------------
class _ShardView:
    """What the coordinator knows of one contributing shard (keys are gids of the merge trie; 0 = root):
    exact counts, totals of children counts, the nodes whose children are all known, and region bounds
    (``bounds[g]``: every node below g that the shard has not reported has a count <= it)."""

    def __init__(self) -> None:
        self.count: dict[int, int] = {}
        self.total: dict[int, int] = {}
        self.complete: set[int] = set()
        self.bounds: dict[int, int] = {}


class _Merge:
    """The merge trie, the shards' knowledge and the replay (see the module docs, steps 2-3)."""

    def __init__(self, suffix: np.ndarray, max_nodes: int, max_depth: int, min_count: int, ratio: bool):
        self.suffix = suffix
        self.max_nodes, self.max_depth, self.min_count, self.ratio = max_nodes, max_depth, min_count, ratio
        self.tokens = [-1]
        self.parent = [-1]
        self.depth = [0]
        self.kids: list[dict[int, int]] = [{}]
        self.views: list[_ShardView] = []

    def _child(self, gid: int, token: int) -> int:
        kids = self.kids[gid]
        if token not in kids:
            kids[token] = len(self.tokens)
            self.tokens.append(token)
            self.parent.append(gid)
            self.depth.append(self.depth[gid] + 1)
            self.kids.append({})
        return kids[token]

    def path(self, gid: int) -> np.ndarray:
        out = []
        while gid:
            out.append(self.tokens[gid])
            gid = self.parent[gid]
        return np.asarray(out[::-1], np.int32)

    def add_shard(self, tree: ShardTree) -> None:
        """A contributing shard, with its tree at the suffix (the root)."""
        self.views.append(_ShardView())
        self.add_tree(len(self.views) - 1, 0, tree)

    def add_tree(self, shard: int, at: int, tree: ShardTree) -> None:
        """A shard's tree below node ``at``: exact counts and totals, its bound over the region."""
        view = self.views[shard]
        gids = np.empty(len(tree.tokens), np.int64)
        for j, (token, parent) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist(), strict=True)):
            gids[j] = self._child(at if parent < 0 else int(gids[parent]), token)
        view.count.update(zip(gids.tolist(), tree.counts.tolist(), strict=True))
        known = tree.totals >= 0
        view.total.update(zip(gids[known].tolist(), tree.totals[known].tolist(), strict=True))
        if tree.root_total >= 0:
            view.total[at] = tree.root_total
        view.bounds[at] = min(tree.bound, view.bounds.get(at, tree.bound))
        region = [at, *gids.tolist()]
        if tree.bound == 0:  # the shard returned every node of the region within the tree's depth
            top = self.depth[at]
            view.complete.update(g for g in region if self.depth[g] - top < tree.depth)
        else:
            for g in region:
                total = view.total.get(g)
                if total is not None and sum(view.count.get(c, 0) for c in self.kids[g].values()) == total:
                    view.complete.add(g)

    def add_children(self, shard: int, gid: int, tokens: np.ndarray, counts: np.ndarray) -> None:
        """The complete list of a node's children in one shard."""
        view = self.views[shard]
        for token, count in zip(tokens.tolist(), counts.tolist(), strict=True):
            view.count[self._child(gid, token)] = count
        view.total[gid] = int(counts.sum())
        view.complete.add(gid)

    def _known(self, view: _ShardView, gid: int) -> int | None:
        """The shard's exact count of a node whose parent is exact there, or None if only bounded."""
        count = view.count.get(gid)
        if count is not None:
            return count
        parent = self.parent[gid]
        if parent in view.complete or view.count.get(parent, 1) == 0:
            view.count[gid] = 0  # a fact: its children (if any) are then known to be 0 as well
            return 0
        return None

    def _total(self, view: _ShardView, gid: int) -> int | None:
        """The shard's total of a node's children counts, or None if it has not told it."""
        total = view.total.get(gid)
        if total is None and (gid in view.complete or view.count.get(gid) == 0):
            total = view.total[gid] = sum(view.count.get(c, 0) for c in self.kids[gid].values())
        return total

    def _unknown_bound(self, view: _ShardView, gid: int) -> int:
        """Upper bound on the count of any child of ``gid`` the shard has not reported (0 if none can be)."""
        if gid in view.complete or view.count.get(gid, 1) == 0:
            return 0
        bound = view.bounds[0]
        g = gid
        while g:  # the tightest region bound over the node and its ancestors
            bound = min(bound, view.bounds.get(g, bound))
            g = self.parent[g]
        known = sum(view.count.get(c, 0) for c in self.kids[gid].values())
        ceiling = view.total.get(gid, view.count.get(gid, bound))
        return max(0, min(bound, ceiling - known))

    def replay(self) -> tuple[list[tuple[int, int, int, int]], dict[int, set[int]]]:
        """One replay of the walk. Returns the popped (gid, parent output index, count, parent total) and
        the expansions {shard: {gid}} that would make it certain (empty: the result is exact)."""
        requests: dict[int, set[int]] = {}
        heap: list[tuple[int, int, int, int]] = []  # exact candidates: (-count, token, parent index, gid)
        uncertain: list[tuple[int, list[tuple[int, int]]]] = []  # (bound, [(shard, gid to expand)])
        out: list[tuple[int, int, int, int]] = []
        certain = True

        def ask(needs: list[tuple[int, int]]) -> None:
            for shard, gid in needs:
                requests.setdefault(shard, set()).add(gid)

        def push_children(gid: int, index: int) -> None:
            unseen = [self._unknown_bound(view, gid) for view in self.views]
            for token, kid in self.kids[gid].items():
                low = high = 0
                needs = []
                for s, view in enumerate(self.views):
                    count = self._known(view, kid)
                    if count is None:
                        high += unseen[s]
                        needs.append((s, gid))
                    else:
                        low += count
                        high += count
                if not needs:
                    if low >= self.min_count:
                        heapq.heappush(heap, (-low, token, index, kid))
                elif high >= self.min_count:
                    uncertain.append((high, needs))
            phantom = sum(unseen)  # children no shard has reported yet
            if phantom >= self.min_count:
                uncertain.append((phantom, [(s, gid) for s, u in enumerate(unseen) if u]))

        def resolve(above: int) -> None:
            """Ask for every uncertain candidate that might reach ``above``; drop them from the replay."""
            nonlocal certain, uncertain
            certain = False
            for high, needs in uncertain:
                if high >= above:
                    ask(needs)
            uncertain = [item for item in uncertain if item[0] < above]

        push_children(0, -1)
        while len(out) < self.max_nodes:
            if not heap:
                if uncertain:  # are some of them >= min_count after all?
                    resolve(self.min_count)
                break
            negcount, _token, index, gid = heapq.heappop(heap)
            count = -negcount
            if uncertain and max(u[0] for u in uncertain) >= count:
                resolve(count)  # the replay goes on optimistically, only to collect more requests
            parent = self.parent[gid]
            total = 0
            if self.ratio:
                totals = [self._total(view, parent) for view in self.views]
                missing = [(s, parent) for s, t in enumerate(totals) if t is None]
                if missing:
                    certain = False
                    ask(missing)
                else:
                    total = sum(totals)
            out.append((gid, index, count, total))
            if self.depth[gid] < self.max_depth:
                push_children(gid, len(out) - 1)
        return out, ({} if certain else requests)

    def tree(self, popped: list[tuple[int, int, int, int]], length: int, source: Source) -> TokenTree:
        n = len(popped)
        counts = np.fromiter((c for _, _, c, _ in popped), np.int64, n)
        if self.ratio:
            totals = np.fromiter((t for _, _, _, t in popped), np.int64, n)
            # The core's float32 arithmetic: count / (float(total) + 1).
            scores = counts.astype(np.float32) / (totals.astype(np.float32) + np.float32(1.0))
        else:
            scores = counts.astype(np.float32)
        return TokenTree(
            np.fromiter((self.tokens[g] for g, _, _, _ in popped), np.int32, n),
            np.fromiter((p for _, p, _, _ in popped), np.int32, n),
            scores=scores,
            sources=np.full(n, int(source), np.uint8),
            match_lengths=np.full(n, length, np.int32),
        )


def _backoff_length(
    lengths: Sequence[int], chains: dict[int, tuple[tuple[int, int], ...]], min_match: int, k: int
) -> int:
    """The single store's back-off over the summed store, from the shards' chains (see module docs)."""
    tops = sorted({top for chain in chains.values() for top, _ in chain})

    def continuations(length: int) -> int:
        total = 0
        for chain in chains.values():
            # This shard's class holding ``length``: its shortest chain length >= length.
            fits = [c for top, c in chain if top >= length]
            total += fits[-1] if fits else 0
        return total

    length = max(lengths)
    while continuations(length) < k:
        below = bisect.bisect_left(tops, length)
        up = tops[below - 1] if below else 0
        if up < min_match:
            break
        length = up
    return length


# -- the public objects ------------------------------------------------------------------------------------
class ShardedDatastore:
    """A corpus datastore split by document over Ray actors; ``retrieve`` equals the unsharded store's.

    Open with :meth:`open`. Duck-types the read side of :class:`rasd.Datastore` that retrieval uses
    (``matcher()``, ``match``, ``retrieve``, ``check_tokenizer``, ``vocab_size``), so
    ``CorpusLookup``/``rasd.generate(datastore=...)`` take it as they take a local store.
    """

    def __init__(
        self, manifest: Manifest, shards: list[Any], *, remote: bool, tree_nodes: int | None = None
    ) -> None:
        self.manifest = manifest
        self._shards = shards
        self._remote = remote
        self.tree_nodes = tree_nodes
        # The protocol's cost, for reports: retrieves served, and the expansion rounds they needed.
        self.retrieves = 0
        self.expand_rounds = 0

    @classmethod
    def open(
        cls,
        manifest: str | os.PathLike,
        *,
        local: bool = False,
        tree_nodes: int | None = None,
        scheduling_strategy: str | Sequence[Any] = "SPREAD",
        verify: bool | None = None,
    ) -> ShardedDatastore:
        """Open every shard of ``manifest`` (from :func:`build_sharded_datastore`).

        local: serve the shards in this process instead of Ray actors (tests, one-machine use).
        tree_nodes: nodes each shard sends per query (default: 4x the query's max_nodes). Fewer means
            smaller messages but more expansion rounds; the result is exact either way.
        scheduling_strategy: Ray placement of the actors: ``"SPREAD"`` (default: over the cluster's nodes),
            ``"DEFAULT"``, or one strategy per shard (e.g. ``NodeAffinitySchedulingStrategy`` for the node
            whose disk holds that shard). Every node that serves a shard must see its file at the manifest's
            directory. Ray is started locally unless ``ray.init`` was called (or ``RAY_ADDRESS`` is set).
        verify: check the shard files' checksums on open (default: files under 1 GiB, as Datastore.load).
        """
        path = Path(manifest)
        spec = Manifest.load(path)
        files = [str(path.parent.resolve() / shard.path) for shard in spec.shards]
        if local:
            shards = [ShardIndex(f, spec.tokenizer, verify) for f in files]
        else:
            try:
                import ray
            except ImportError:
                raise ImportError("ShardedDatastore needs Ray: pip install 'rasd[ray]'") from None
            if not ray.is_initialized():
                ray.init()
            strategies = (
                [scheduling_strategy] * len(files)
                if isinstance(scheduling_strategy, str)
                else list(scheduling_strategy)
            )
            if len(strategies) != len(files):
                raise ValueError(f"{len(strategies)} scheduling strategies for {len(files)} shards")
            # num_cpus=0: a shard answers in microseconds and mostly waits; it must not hold a CPU slot.
            actor = ray.remote(num_cpus=0)(ShardIndex)
            shards = [
                actor.options(scheduling_strategy=s).remote(f, spec.tokenizer, verify)
                for f, s in zip(files, strategies, strict=True)
            ]
        if tree_nodes is not None and tree_nodes < 1:
            raise ValueError(f"tree_nodes must be >= 1, got {tree_nodes}")
        store = cls(spec, shards, remote=not local, tree_nodes=tree_nodes)
        infos = store._call("info", {i: () for i in range(len(files))})
        for i, shard in enumerate(spec.shards):
            got = infos[i]
            if (got["documents"], got["tokens"]) != (shard.documents, shard.tokens):
                raise ValueError(
                    f"shard {files[i]} holds {got['documents']} documents / {got['tokens']} tokens, the "
                    f"manifest says {shard.documents} / {shard.tokens}: the files are from another build"
                )
        return store

    def _call(self, method: str, args: dict[int, tuple]) -> dict[int, Any]:
        """``method(*args[i])`` on every shard i named, in parallel when the shards are actors."""
        if not self._remote:
            return {i: getattr(self._shards[i], method)(*a) for i, a in args.items()}
        import ray

        refs = {i: getattr(self._shards[i], method).remote(*a) for i, a in args.items()}
        return dict(zip(refs, ray.get(list(refs.values())), strict=True))

    def shard_info(self) -> list[dict[str, Any]]:
        """Every shard's ``Datastore.info()`` and the host serving it."""
        infos = self._call("info", {i: () for i in range(len(self._shards))})
        return [infos[i] for i in range(len(self._shards))]

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def vocab_size(self) -> int | None:
        return self.manifest.tokenizer.vocab_size or None

    @property
    def num_documents(self) -> int:
        return sum(s.documents for s in self.manifest.shards)

    def __len__(self) -> int:
        return sum(s.tokens for s in self.manifest.shards)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """ValueError unless ``tokenizer`` is the one the shards were built with."""
        given, mine = tokenizer_fingerprint(tokenizer), self.manifest.tokenizer
        vocab_differs = bool(mine.vocab_hash) and given.vocab_hash != mine.vocab_hash
        merges_differ = bool(mine.full_hash and given.full_hash) and mine.full_hash != given.full_hash
        if vocab_differs or merges_differ:
            raise ValueError(
                f"the sharded datastore was built with tokenizer {mine.name!r}, not {given.name!r}: rebuild "
                f"it with `rasd datastore build --tokenizer {given.name} --shards N ...` or pass that one"
            )

    def matcher(self) -> ShardedMatcher:
        return ShardedMatcher(self)

    def match(self, context: Any) -> int:
        """Length of the longest suffix of ``context`` that occurs in the corpus."""
        return self.matcher().feed(context)

    def retrieve(self, context: Any, max_nodes: int = 64, max_depth: int = 16, **kwargs: Any) -> TokenTree:
        """As :meth:`rasd.Datastore.retrieve` (same options, same tree)."""
        m = self.matcher()
        m.feed(context)
        return m.retrieve(max_nodes, max_depth, **kwargs)

    def close(self) -> None:
        """Stop the shard actors (the store is unusable afterwards)."""
        if self._remote:
            import ray

            for actor in self._shards:
                ray.kill(actor)
        self._shards = []


class ShardedMatcher:
    """Incremental matching against a :class:`ShardedDatastore`, with the :class:`rasd.Matcher` interface.

    Each ``feed`` is one parallel round to the shards (each gets only the context suffix its match can
    use: its last match length plus the new tokens); it also brings back every shard's tree for the next
    ``retrieve``, sized by the previous ``retrieve``'s options, so a decoding step usually costs one round.
    """

    def __init__(self, store: ShardedDatastore) -> None:
        self.store = store
        self._context: list[int] = []
        self._lengths = [0] * store.num_shards
        self._probes: list[ShardProbe | None] = [None] * store.num_shards
        # What the next probe asks for: tree (max_nodes, max_depth, min_match), chain (min_match, k); and
        # the chain options the current probes were made with.
        self._tree_hint: tuple[int, int, int] = (store.tree_nodes or _TREE_FACTOR * 64, 16, 1)
        self._chain_hint: tuple[int, int] | None = None
        self._probed_chain: tuple[int, int] | None = None

    @property
    def length(self) -> int:
        return max(self._lengths, default=0)

    def reset(self) -> None:
        self._context = []
        self._lengths = [0] * self.store.num_shards
        self._probes = [None] * self.store.num_shards

    def feed(self, tokens: Any) -> int:
        """Append ``tokens`` (1-D ids) to the context; returns the longest matched suffix's length."""
        new = _token_list(tokens, self.store.vocab_size)
        self._context.extend(new)
        args = {}
        for i, length in enumerate(self._lengths):
            # A match can grow by at most the new tokens: the longest suffix is within this window.
            window = self._context[len(self._context) - min(len(self._context), length + len(new)) :]
            args[i] = (np.asarray(window, np.int32), self._tree_hint, self._chain_hint)
        probes = self.store._call("probe", args)
        self._probes = [probes[i] for i in range(self.store.num_shards)]
        self._probed_chain = self._chain_hint
        self._lengths = [p.length for p in self._probes]
        return self.length

    def retrieve(
        self,
        max_nodes: int = 64,
        max_depth: int = 16,
        *,
        min_match: int = 1,
        min_count: int = 1,
        backoff_min_count: int = 0,
        score: str = "ratio",
        source: Source = Source.CORPUS,
    ) -> TokenTree:
        """The retrieval tree at the current match, identical to the unsharded store's
        (:meth:`rasd.Datastore.retrieve` documents the options)."""
        if score not in ("ratio", "count"):
            raise ValueError(f"score must be 'ratio' or 'count', got {score!r}")
        if max_nodes < 0 or max_depth < 0 or min_match < 1:
            raise ValueError("max_nodes and max_depth must be >= 0 and min_match >= 1")
        if backoff_min_count > 0 and min_match < 2:
            raise ValueError(
                "a sharded store backs off exactly only with min_match >= 2 (a single token's occurrence "
                "count is not reachable through the shards' API); pass min_match=2 or use a local Datastore"
            )
        nodes = self.store.tree_nodes or _TREE_FACTOR * max(1, max_nodes)
        self._tree_hint = (nodes, max(1, max_depth), min_match)
        self._chain_hint = (min_match, backoff_min_count) if backoff_min_count > 0 else None
        full = self.length
        if full < min_match or max_nodes == 0 or max_depth == 0:
            return TokenTree.empty()
        store = self.store
        probes = self._probes
        length = full
        chains: dict[int, tuple[tuple[int, int], ...]] = {}
        if backoff_min_count > 0:
            matched = [i for i, n in enumerate(self._lengths) if n >= min_match]
            if self._probed_chain == (min_match, backoff_min_count):
                chains = {i: probes[i].chain for i in matched}
            else:
                chains = store._call(
                    "chain",
                    {i: (self._suffix(self._lengths[i]), min_match, backoff_min_count) for i in matched},
                )
            length = _backoff_length(self._lengths, chains, min_match, backoff_min_count)
        members = [i for i, n in enumerate(self._lengths) if n >= length]
        trees: dict[int, ShardTree] = {}
        redo = {}
        for i in members:
            tree = probes[i].tree
            # A tree built at L_i serves any length in L_i's class of this shard (no link in between).
            links = [top for top, _ in chains.get(i, ())[1:]]
            same_class = self._lengths[i] == length or (bool(links) and links[0] < length)
            # A smaller tree would still be correct (its bound holds), only costlier to complete.
            big_enough = tree is not None and (tree.bound == 0 or len(tree.tokens) > nodes)
            if big_enough and same_class and tree.depth >= max_depth:
                trees[i] = tree
            else:
                redo[i] = (self._suffix(length), nodes, max_depth)
        trees.update(store._call("tree", redo))
        suffix = self._suffix(length)
        merge = _Merge(suffix, max_nodes, max_depth, min_count, ratio=score == "ratio")
        order = sorted(trees)
        for i in order:
            merge.add_shard(trees[i])
        rounds = 0
        while True:
            popped, requests = merge.replay()
            if not requests:
                break
            rounds += 1
            gids = {s: sorted(g) for s, g in requests.items()}
            answers = store._call(
                "expand",
                {order[s]: (suffix, [merge.path(g) for g in gs], nodes, max_depth) for s, gs in gids.items()},
            )
            for s, gs in gids.items():
                for g, (below, kids) in zip(gs, answers[order[s]], strict=True):
                    merge.add_tree(s, g, below)
                    if kids is not None:
                        merge.add_children(s, g, *kids)
        store.retrieves += 1
        store.expand_rounds += rounds
        return merge.tree(popped, length, source)

    def _suffix(self, length: int) -> np.ndarray:
        return np.asarray(self._context[len(self._context) - length :], np.int32)


def _token_list(tokens: Any, vocab_size: int | None) -> list[int]:
    """Validated 1-D token ids as a list (the checks of ``Matcher.feed``)."""
    arr = np.asarray(tokens)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"context must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"context must be integer token ids, got {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or (vocab_size is not None and int(arr.max()) >= vocab_size)):
        raise ValueError(f"context holds ids outside [0, {vocab_size}): wrong tokenizer for this datastore?")
    return arr.tolist()
