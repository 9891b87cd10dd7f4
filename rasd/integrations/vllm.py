"""rasd as a vLLM (v1) speculative proposer: lookup in a saved corpus datastore and in each request's own
prompt and output, one chain per request per step.

>>> from vllm import LLM
>>> llm = LLM(
...     model="Qwen/Qwen2.5-Coder-0.5B-Instruct",
...     speculative_config={
...         "method": "custom_class",
...         "model": "rasd.integrations.vllm.RasdProposer",
...         "num_speculative_tokens": 8,
...     },
...     additional_config={"rasd": {"datastore": "code.rasd"}},
... )

The hook (vLLM's experimental ``custom_class`` method) builds ``RasdProposer(vllm_config)`` in every worker,
calls ``load_model(model)``, then once per engine step ``propose(sampled_token_ids, num_tokens_no_spec,
token_ids_cpu, slot_mappings=None)`` for the whole batch: row i of ``token_ids_cpu`` holds request i's
prompt + output so far (``num_tokens_no_spec[i]`` tokens), ``sampled_token_ids[i]`` the tokens it just
accepted (empty when the request did not decode this step). It returns one list of at most
``num_speculative_tokens`` draft tokens per row, which vLLM verifies as a chain.

What vLLM does not give a proposer, and what rasd does instead:

- **No request identity.** A request's prompt automaton (grown by the tokens it accepts, so each step
  costs only the new tokens) is found again by its row, checked against the row's tokens; failing that, by
  the first tokens of the row, checked the same way; failing that, rebuilt from the row. A least-recently
  used cache of ``max_requests`` automata bounds the memory; finished requests age out.
- **Chains only.** vLLM verifies one path, so the proposal is the best path of rasd's retrieval tree (the
  most frequent continuation at each step) from whichever source matched the longer suffix (the request's
  own text on ties), at most ``spec_factor`` x the match length long (SuffixDecoding's rule: a short match
  predicts a short continuation). rasd's own loop verifies whole trees and fuses sources.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from rasd.datastore import Datastore
from rasd.tree import TokenTree

_HEAD = 32  # tokens of a row's beginning used to find its request again when its row changed


@dataclass(frozen=True)
class RasdProposerConfig:
    """``additional_config={"rasd": {...}}`` of the vLLM engine (``--additional-config`` on the server)."""

    datastore: str | None = None  # a saved rasd datastore (mmap'd; shared through the page cache); None: none
    prompt_lookup: bool = True  # also continue the request's own prompt and output
    min_match: int = 2  # shortest matched suffix (tokens) worth proposing from
    tree_nodes: int = 32  # size of the retrieval tree the chain is chosen from
    spec_factor: float = 1.0  # a chain is at most spec_factor x the match length (and the engine's k)
    max_requests: int = 1024  # per-request automata kept (least recently used dropped first)
    check_tokenizer: bool = True  # refuse a datastore built with another tokenizer than the model's

    def __post_init__(self) -> None:
        if self.min_match < 1 or self.tree_nodes < 1 or self.max_requests < 1 or self.spec_factor <= 0:
            raise ValueError(
                "rasd proposer options: min_match, tree_nodes and max_requests must be >= 1 and spec_factor "
                f"> 0, got {self}"
            )
        if self.datastore is None and not self.prompt_lookup:
            raise ValueError(
                'the rasd proposer has nothing to propose from: give additional_config={"rasd": '
                '{"datastore": PATH}} or keep prompt_lookup on'
            )

    @classmethod
    def from_vllm(cls, additional_config: Any) -> RasdProposerConfig:
        """The ``"rasd"`` entry of vLLM's ``additional_config`` (a dict), validated."""
        options = (additional_config or {}).get("rasd", {}) if isinstance(additional_config, dict) else {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown rasd proposer options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**options)


class _Request:
    """One request's lookup state: the tokens it has been fed, its prompt+output automaton and its
    corpus matcher. Both grow by the new tokens only."""

    def __init__(self, tokens: np.ndarray, corpus: Datastore | None, prompt_lookup: bool) -> None:
        self.tokens = np.zeros(0, np.int32)
        self.prompt = Datastore() if prompt_lookup else None
        self.corpus = corpus.matcher() if corpus is not None else None
        self.corpus_vocab = corpus.vocab_size if corpus is not None else None
        self.feed(tokens)

    def follows(self, row: np.ndarray) -> bool:
        """Whether ``row`` (the request's tokens now) continues what this state was fed."""
        n = len(self.tokens)
        return n <= len(row) and np.array_equal(row[:n], self.tokens)

    def feed(self, new: np.ndarray) -> None:
        if not len(new):
            return
        self.tokens = np.concatenate([self.tokens, new])
        if self.prompt is not None:
            self.prompt.extend(new)
        if self.corpus is not None:
            # An id outside the datastore's vocabulary (a model's padded vocabulary) matches nothing there:
            # restart matching after it instead of failing the engine step.
            outside = np.flatnonzero(new >= self.corpus_vocab) if self.corpus_vocab else np.zeros(0, int)
            if len(outside):
                self.corpus.reset()
                new = new[outside[-1] + 1 :]
            self.corpus.feed(new)


def best_chain(tree: TokenTree, limit: int) -> list[int]:
    """The path of ``tree`` that follows the best-scored child at every step, cut to ``limit`` tokens.

    Retrieval trees list siblings best first (highest count), so that is the first child each time.
    """
    first_child: dict[int, int] = {}
    for node, parent in enumerate(tree.parents.tolist()):
        first_child.setdefault(parent, node)
    out: list[int] = []
    node = first_child.get(-1)
    while node is not None and len(out) < limit:
        out.append(int(tree.tokens[node]))
        node = first_child.get(node)
    return out


class RasdProposer:
    """vLLM v1 ``custom_class`` speculative proposer backed by rasd's suffix-automaton datastores.

    vllm_config: the engine's ``VllmConfig``; options come from ``additional_config["rasd"]``
    (:class:`RasdProposerConfig`), the chain length limit k from its speculative config's
    ``num_speculative_tokens``.
    """

    def __init__(self, vllm_config: Any) -> None:
        self.config = RasdProposerConfig.from_vllm(vllm_config.additional_config)
        self.k = int(vllm_config.speculative_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.store: Datastore | None = None
        if self.config.datastore is not None:
            tokenizer = None
            if self.config.check_tokenizer:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
            self.store = Datastore.load(self.config.datastore, tokenizer=tokenizer)
        self._requests: OrderedDict[int, _Request] = OrderedDict()  # id(state) -> state, LRU order
        self._by_row: dict[int, _Request] = {}
        self._by_head: dict[bytes, list[_Request]] = {}
        # Proposals by source, for tests and reports: {"prompt": n, "corpus": n} chains proposed.
        self.proposed = {"prompt": 0, "corpus": 0}

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """vLLM hands the target model over; retrieval needs none of it."""

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        """Draft tokens per request row (see the module docs for the arguments' shapes)."""
        drafts: list[list[int]] = []
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            # Rows that did not decode this step (a prefill chunk) or have no room left get no draft.
            if not sampled or n >= self.max_model_len:
                drafts.append([])
                continue
            row = token_ids_cpu[i, :n]
            drafts.append(self._propose_one(self._state(i, row), min(self.k, self.max_model_len - n)))
        return drafts

    def _state(self, index: int, row: np.ndarray) -> _Request:
        """The request in batch row ``index`` (its tokens ``row``), fed up to the end of ``row``."""
        row = np.ascontiguousarray(row, dtype=np.int32)
        state = self._by_row.get(index)
        if state is None or not state.follows(row):
            head = row[:_HEAD].tobytes()
            candidates = [s for s in self._by_head.get(head, ()) if s.follows(row)]
            state = max(candidates, key=lambda s: len(s.tokens), default=None)
            if state is None:
                state = _Request(row, self.store, self.config.prompt_lookup)
                self._by_head.setdefault(head, []).append(state)
                self._requests[id(state)] = state
                self._evict()
            self._by_row[index] = state
        state.feed(row[len(state.tokens) :])
        self._requests.move_to_end(id(state))
        return state

    def _evict(self) -> None:
        while len(self._requests) > self.config.max_requests:
            _, old = self._requests.popitem(last=False)
            head = old.tokens[:_HEAD].tobytes()
            self._by_head[head] = [s for s in self._by_head.get(head, ()) if s is not old]
            if not self._by_head[head]:
                del self._by_head[head]
            for row in [r for r, s in self._by_row.items() if s is old]:
                del self._by_row[row]

    def _propose_one(self, state: _Request, k: int) -> list[int]:
        """The chain from the source with the longer match (the request's own text on ties)."""
        cfg = self.config
        best: tuple[int, str, TokenTree] | None = None
        if state.prompt is not None:
            tree = state.prompt.retrieve_tail(cfg.tree_nodes, k, min_match=cfg.min_match)
            if len(tree):
                best = (int(tree.match_lengths[0]), "prompt", tree)
        if state.corpus is not None and state.corpus.length >= cfg.min_match:
            tree = state.corpus.retrieve(cfg.tree_nodes, k, min_match=cfg.min_match)
            if len(tree) and (best is None or int(tree.match_lengths[0]) > best[0]):
                best = (int(tree.match_lengths[0]), "corpus", tree)
        if best is None:
            return []
        length, source, tree = best
        self.proposed[source] += 1
        return best_chain(tree, min(k, math.ceil(cfg.spec_factor * length)))
