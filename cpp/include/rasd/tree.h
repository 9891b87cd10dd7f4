// Token trees as parent-pointer arrays: the one tree representation shared by every drafter and the
// verifier. Node i has token tokens[i] and parent parents[i]; parents[i] == -1 means "child of the root"
// (the root is the last committed token, which is not part of the tree). Invariant checked here:
// nodes are in topological order, i.e. -1 <= parents[i] < i.
#pragma once

#include <cstdint>
#include <vector>

namespace rasd {

// Throws std::invalid_argument naming the first offending node if the order invariant is broken.
void validate_parents(const int32_t* parents, int64_t n);

// depth[i] = 1 for children of the root, depth[parent] + 1 otherwise. Requires valid parents.
std::vector<int32_t> tree_depths(const int32_t* parents, int64_t n);

}  // namespace rasd
