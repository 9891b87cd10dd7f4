#include "rasd/tree.h"

#include <stdexcept>
#include <string>

namespace rasd {

void validate_parents(const int32_t* parents, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t p = parents[i];
    if (p < -1 || p >= i) {
      throw std::invalid_argument("parents[" + std::to_string(i) + "] = " + std::to_string(p) +
                                  ": nodes must be in topological order (-1 <= parent < index)");
    }
  }
}

std::vector<int32_t> tree_depths(const int32_t* parents, int64_t n) {
  validate_parents(parents, n);
  std::vector<int32_t> depth(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    depth[i] = parents[i] < 0 ? 1 : depth[parents[i]] + 1;
  }
  return depth;
}

}  // namespace rasd
