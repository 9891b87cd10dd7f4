"""Tree fusion by longest-prefix matching.

Trees proposed by different sources (prompt lookup, corpus lookup, token recycling, draft model) are
inserted into one trie (:class:`rasd.tree.TreeBuilder`): a node whose root path (sequence of tokens)
already exists is merged into the existing node, so only the unmatched suffixes add nodes. A merged node
keeps every source bit, the highest score and match length, and the first known draft probability. The
result is in topological order, the first tree's nodes first.
"""

from __future__ import annotations

from collections.abc import Sequence

from rasd.tree import TokenTree, TreeBuilder


def merge_trees(trees: Sequence[TokenTree]) -> TokenTree:
    """Fuse ``trees`` (deterministic candidates only; sampled nodes cannot be merged losslessly)."""
    if len(trees) == 1:
        return trees[0]
    builder = TreeBuilder()
    for tree in trees:
        builder.add_tree(tree)
    return builder.build()
