#include "rasd/suffix_automaton.h"

#include "rasd/datastore_file.h"

#include <algorithm>
#include <limits>
#include <queue>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>

namespace rasd {

// ---------------------------------------------------------------------------------------------------
// Mutable automaton
// ---------------------------------------------------------------------------------------------------

MutableGraph::MutableGraph() { new_state(0, kNoState); }

int32_t MutableGraph::new_state(int32_t length, int32_t link) {
  if (len_.size() >= static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    throw std::length_error("datastore too large: more than 2^31 automaton states");
  }
  len_.push_back(length);
  link_.push_back(link);
  own_.push_back(0);
  count_.push_back(0);
  next_.emplace_back();
  return static_cast<int32_t>(len_.size() - 1);
}

int32_t MutableGraph::clone_state(int32_t q, int32_t length) {
  const int32_t c = new_state(length, link_[q]);
  next_[c] = next_[q];
  num_edges_ += static_cast<int64_t>(next_[c].size());
  return c;
}

int32_t MutableGraph::next(int32_t s, int32_t token) const {
  const auto& edges = next_[s];
  auto it = std::lower_bound(edges.begin(), edges.end(), token,
                             [](const std::pair<int32_t, int32_t>& e, int32_t t) { return e.first < t; });
  return (it != edges.end() && it->first == token) ? it->second : kNoState;
}

void MutableGraph::set_next(int32_t s, int32_t token, int32_t target) {
  auto& edges = next_[s];
  auto it = std::lower_bound(edges.begin(), edges.end(), token,
                             [](const std::pair<int32_t, int32_t>& e, int32_t t) { return e.first < t; });
  if (it != edges.end() && it->first == token) {
    it->second = target;
  } else {
    edges.insert(it, {token, target});
    ++num_edges_;
  }
}

// Generalized online construction (one token): also handles the case where the current prefix already
// exists because another document contains it.
void MutableGraph::extend_one(int32_t c) {
  last_clone_ = last_cloned_ = kNoState;
  const int32_t last = last_;
  int32_t result;
  const int32_t existing = next(last, c);
  if (existing != kNoState) {
    if (len_[existing] == len_[last] + 1) {
      result = existing;
    } else {
      const int32_t clone = clone_state(existing, len_[last] + 1);
      link_[existing] = clone;
      for (int32_t p = last; p != kNoState && next(p, c) == existing; p = link_[p]) set_next(p, c, clone);
      last_clone_ = clone;
      last_cloned_ = existing;
      result = clone;
    }
  } else {
    const int32_t cur = new_state(len_[last] + 1, kNoState);
    int32_t p = last;
    while (p != kNoState && next(p, c) == kNoState) {
      set_next(p, c, cur);
      p = link_[p];
    }
    if (p == kNoState) {
      link_[cur] = 0;
    } else {
      const int32_t q = next(p, c);
      if (len_[p] + 1 == len_[q]) {
        link_[cur] = q;
      } else {
        const int32_t clone = clone_state(q, len_[p] + 1);
        link_[q] = link_[cur] = clone;
        for (; p != kNoState && next(p, c) == q; p = link_[p]) set_next(p, c, clone);
        last_clone_ = clone;
        last_cloned_ = q;
      }
    }
    result = cur;
  }
  own_[result] += 1;
  last_ = result;
  counts_dirty_ = true;
  tokens_.push_back(c);
  max_token_ = std::max(max_token_, c);
}

int64_t MutableGraph::add_document(const int32_t* tokens, int64_t n) {
  doc_starts_.push_back(num_tokens());
  last_ = 0;
  in_document_ = true;
  tail_ = MatchState{};
  extend(tokens, n);
  return num_documents() - 1;
}

void MutableGraph::extend(const int32_t* tokens, int64_t n) {
  if (!in_document_) {
    doc_starts_.push_back(num_tokens());
    last_ = 0;
    in_document_ = true;
    tail_ = MatchState{};
  }
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0) throw std::invalid_argument("token ids must be non-negative");
    // Match first, against the text *before* this token, so the tail match always ends earlier than the
    // end of the text and has a continuation; then grow the automaton.
    tail_ = match_feed(*this, tail_, tokens + i, 1);
    extend_one(tokens[i]);
    if (tail_.state == last_cloned_ && tail_.length <= len_[last_clone_]) tail_.state = last_clone_;
  }
}

void MutableGraph::refresh_counts() {
  if (!counts_dirty_) return;
  // count(s) = own(s) + sum of count over the suffix-link children: accumulate from the longest states
  // down (counting sort by len), O(states + max len).
  const size_t n = len_.size();
  int32_t max_len = 0;
  for (int32_t l : len_) max_len = std::max(max_len, l);
  std::vector<int64_t> bucket(static_cast<size_t>(max_len) + 2, 0);
  for (int32_t l : len_) ++bucket[l + 1];
  for (size_t i = 1; i < bucket.size(); ++i) bucket[i] += bucket[i - 1];
  std::vector<int32_t> order(n);
  for (size_t s = 0; s < n; ++s) order[bucket[len_[s]]++] = static_cast<int32_t>(s);
  count_ = own_;
  for (size_t i = n; i-- > 1;) {
    const int32_t s = order[i];
    if (link_[s] != kNoState) count_[link_[s]] += count_[s];
  }
  counts_dirty_ = false;
}

// ---------------------------------------------------------------------------------------------------
// Frozen automaton (CSR, bounds-checked)
// ---------------------------------------------------------------------------------------------------

namespace {
[[noreturn]] void corrupt(const std::string& what) {
  throw std::invalid_argument("corrupt datastore: " + what + " (rebuild it with `rasd datastore build`)");
}
}  // namespace

FrozenAutomaton::FrozenAutomaton(int64_t num_states, int64_t num_edges, const int32_t* len, const int32_t* link,
                                 const int64_t* count, const int64_t* edge_offsets, const int32_t* edge_tokens,
                                 const int32_t* edge_targets, int64_t max_degree)
    : num_states_(num_states),
      num_edges_(num_edges),
      max_degree_(max_degree),
      len_(len),
      link_(link),
      count_(count),
      edge_offsets_(edge_offsets),
      edge_tokens_(edge_tokens),
      edge_targets_(edge_targets) {}

int32_t FrozenAutomaton::checked_state(int32_t s) const {
  if (s < 0 || s >= num_states_) corrupt("state index " + std::to_string(s) + " out of range");
  return s;
}
int32_t FrozenAutomaton::checked_token(int32_t t) const {
  if (t < 0) corrupt("negative token id " + std::to_string(t));
  return t;
}
int32_t FrozenAutomaton::len(int32_t s) const { return len_[checked_state(s)]; }
int32_t FrozenAutomaton::link(int32_t s) const {
  const int32_t l = link_[checked_state(s)];
  if (l != kNoState) checked_state(l);
  if (s != 0 && l == kNoState) corrupt("non-root state without suffix link");
  // A suffix link leads to a strictly shorter state: every walk along links terminates (a cycle or a
  // non-shortening link in a damaged file would otherwise loop forever).
  if (l != kNoState && len_[l] >= len_[s]) corrupt("suffix link of state " + std::to_string(s) + " does not shorten it");
  return l;
}
int64_t FrozenAutomaton::count(int32_t s) const {
  const int64_t c = count_[checked_state(s)];
  if (c < 0) corrupt("negative occurrence count at state " + std::to_string(s));
  return c;
}

std::pair<int64_t, int64_t> FrozenAutomaton::edge_range(int32_t s) const {
  checked_state(s);
  const int64_t begin = edge_offsets_[s], end = edge_offsets_[s + 1];
  if (begin < 0 || begin > end || end > num_edges_) corrupt("edge offsets of state " + std::to_string(s));
  // A state has at most one edge per token: a damaged file claiming more would make every query that
  // reaches it scan far too many edges (slow, not wrong: caught here instead).
  if (max_degree_ > 0 && end - begin > max_degree_) corrupt("state " + std::to_string(s) + " has too many edges");
  return {begin, end};
}

int32_t FrozenAutomaton::next(int32_t s, int32_t token) const {
  const auto [begin, end] = edge_range(s);
  int64_t lo = begin, hi = end;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (edge_tokens_[mid] < token) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  if (lo < end && edge_tokens_[lo] == token) return checked_state(edge_targets_[lo]);
  return kNoState;
}

// ---------------------------------------------------------------------------------------------------
// Algorithms
// ---------------------------------------------------------------------------------------------------

namespace {

// Sums of counts read from a file: a damaged file may hold huge or negative counts, and signed overflow is
// undefined behaviour, so sums saturate (only the ranking of a damaged store can suffer, never memory).
int64_t saturating_add(int64_t a, int64_t b) {
  int64_t out;
  if (__builtin_add_overflow(a, b, &out)) return b > 0 ? std::numeric_limits<int64_t>::max() : std::numeric_limits<int64_t>::min();
  return out;
}

// After online growth a matcher's state may have been split by a clone; the state holding a string of
// the matched length is then found up the suffix links.
template <typename G>
MatchState normalize(const G& g, MatchState m) {
  while (m.state != 0 && g.link(m.state) != kNoState && g.len(g.link(m.state)) >= m.length) {
    m.state = g.link(m.state);
  }
  return m;
}

}  // namespace

template <typename G>
MatchState match_feed(const G& g, MatchState m, const int32_t* tokens, int64_t n) {
  m = normalize(g, m);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t c = tokens[i];
    for (;;) {
      const int32_t t = g.next(m.state, c);
      if (t != kNoState) {
        m.state = t;
        m.length += 1;
        break;
      }
      if (m.state == 0) {
        m.length = 0;
        break;
      }
      m.state = g.link(m.state);
      m.length = g.len(m.state);
    }
  }
  return m;
}

template <typename G>
RetrievedTree retrieve(const G& g, MatchState m, const RetrieveOptions& opt) {
  RetrievedTree out;
  m = normalize(g, m);
  if (m.length < opt.min_match || opt.max_nodes <= 0 || opt.max_depth <= 0) return out;

  // Continuation occurrences of a state = sum of its children's counts.
  auto continuations = [&](int32_t s) {
    int64_t total = 0;
    g.for_each_edge(s, [&](int32_t, int32_t t) { total = saturating_add(total, g.count(t)); });
    return total;
  };
  int32_t state = m.state;
  int32_t length = m.length;
  if (opt.backoff_min_count > 0) {
    // Shorter suffixes have (weakly) more occurrences; stop at the first with enough continuations.
    while (continuations(state) < opt.backoff_min_count && state != 0) {
      const int32_t up = g.link(state);
      if (up == kNoState || g.len(up) < opt.min_match || up == 0) break;
      state = up;
      length = g.len(up);
    }
  }
  out.match_length = length;

  struct Item {
    int64_t count;
    int32_t token;
    int32_t parent;  // output node index, -1 = root
    int32_t state;
    int32_t depth;
    float score;
    bool operator<(const Item& o) const {  // max-heap on count, then smaller token, then older parent
      return std::tie(count, o.token, o.parent) < std::tie(o.count, token, parent);
    }
  };
  std::priority_queue<Item> heap;
  std::vector<std::pair<int32_t, int32_t>> kids;
  auto push_children = [&](int32_t s, int32_t parent, int32_t depth) {
    kids.clear();
    int64_t total = 0;
    g.for_each_edge(s, [&](int32_t token, int32_t t) {
      kids.emplace_back(token, t);
      total = saturating_add(total, g.count(t));
    });
    // Only the max_nodes most frequent children can ever be taken.
    if (kids.size() > static_cast<size_t>(opt.max_nodes)) {
      std::nth_element(kids.begin(), kids.begin() + opt.max_nodes, kids.end(), [&](const auto& a, const auto& b) {
        const int64_t ca = g.count(a.second), cb = g.count(b.second);
        return ca != cb ? ca > cb : a.first < b.first;
      });
      kids.resize(opt.max_nodes);
    }
    for (const auto& [token, t] : kids) {
      const int64_t c = g.count(t);
      if (c < opt.min_count) continue;
      // One pseudo-occurrence of "something else": a continuation seen once scores 0.5, not certainty.
      const float score = opt.raw_counts ? static_cast<float>(c)
                                         : static_cast<float>(c) / (static_cast<float>(total) + 1.0f);
      heap.push(Item{c, token, parent, t, depth, score});
    }
  };
  push_children(state, -1, 1);
  while (!heap.empty() && static_cast<int32_t>(out.tokens.size()) < opt.max_nodes) {
    const Item it = heap.top();
    heap.pop();
    const int32_t node = static_cast<int32_t>(out.tokens.size());
    out.tokens.push_back(it.token);
    out.parents.push_back(it.parent);
    out.scores.push_back(it.score);
    out.counts.push_back(it.count);
    if (it.depth < opt.max_depth) push_children(it.state, node, it.depth + 1);
  }
  return out;
}

template MatchState match_feed<MutableGraph>(const MutableGraph&, MatchState, const int32_t*, int64_t);
template MatchState match_feed<FrozenAutomaton>(const FrozenAutomaton&, MatchState, const int32_t*, int64_t);
template RetrievedTree retrieve<MutableGraph>(const MutableGraph&, MatchState, const RetrieveOptions&);
template RetrievedTree retrieve<FrozenAutomaton>(const FrozenAutomaton&, MatchState, const RetrieveOptions&);

// ---------------------------------------------------------------------------------------------------
// Thread-safe mutable datastore
// ---------------------------------------------------------------------------------------------------

int64_t SuffixAutomaton::add_document(const int32_t* tokens, int64_t n) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  return graph_.add_document(tokens, n);
}

void SuffixAutomaton::extend(const int32_t* tokens, int64_t n) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  graph_.extend(tokens, n);
}

int64_t SuffixAutomaton::num_tokens() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return graph_.num_tokens();
}
int64_t SuffixAutomaton::num_documents() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return graph_.num_documents();
}
int64_t SuffixAutomaton::num_states() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return graph_.num_states();
}
int64_t SuffixAutomaton::num_edges() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return graph_.num_edges();
}
int32_t SuffixAutomaton::max_token() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return graph_.max_token();
}
MatchState SuffixAutomaton::tail_match() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return graph_.tail_match();
}

void SuffixAutomaton::check(MatchState m) const {
  // A matcher position is (state, length): the state must exist and hold a string of that length.
  if (m.state < 0 || m.state >= graph_.num_states() || m.length < 0 || m.length > graph_.len(m.state)) {
    throw std::out_of_range("invalid matcher state");
  }
}

MatchState SuffixAutomaton::match(MatchState m, const int32_t* tokens, int64_t n) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  check(m);
  return match_feed(graph_, m, tokens, n);
}

RetrievedTree SuffixAutomaton::retrieve(MatchState m, const RetrieveOptions& opt) const {
  {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    check(m);
    if (graph_.counts_fresh()) return rasd::retrieve(graph_, m, opt);
  }
  std::unique_lock<std::shared_mutex> lock(mutex_);  // counts are refreshed lazily, exclusively
  check(m);
  graph_.refresh_counts();
  return rasd::retrieve(graph_, m, opt);
}

void SuffixAutomaton::save(const DatastoreMeta& meta, const std::string& path) const {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  graph_.refresh_counts();
  save_datastore(graph_, meta, path);
}

}  // namespace rasd
