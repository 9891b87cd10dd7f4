// Suffix automaton over int32 token ids: the datastore behind prompt lookup (dynamic, grown one token at a
// time from the prompt and the output) and corpus lookup (static, built once, saved and mmap'd).
//
// A generalized suffix automaton over many documents: every substring of every document is the label of a
// path from the root, and no path crosses a document boundary. State s stands for the set of substrings
// with the same end positions (its "endpos" class); len(s) is the longest of them, link(s) the state of the
// longest suffix outside the class, count(s) the number of (document, end position) occurrences.
//
// Retrieval: after matching the longest suffix of a context, the continuations that followed its
// occurrences are exactly the transitions out of the matched state, and the number of occurrences of the
// match extended by a1..ak is count() of the state reached. A best-first walk over transitions therefore
// yields the trie of continuations with exact counts, without touching the token array.
//
// Two graphs implement the same read interface (used by the algorithms in suffix_automaton.cc):
//   MutableGraph     mutable, in memory (sorted edge vectors), extendable online in amortized O(log σ);
//                    SuffixAutomaton wraps one behind a reader/writer lock (the thread-safe public type)
//   FrozenAutomaton  read-only CSR arrays, usually pointing into an mmap'd file (datastore_file.h); every
//                    index read from the arrays is bounds-checked and every suffix-link step must shorten
//                    the state (len(link(s)) < len(s)), so a corrupt file raises, never crashes or loops.
#pragma once

#include <cstdint>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <utility>
#include <vector>

namespace rasd {

constexpr int32_t kNoState = -1;

struct RetrieveOptions {
  int32_t max_nodes = 64;        // nodes in the returned tree at most
  int32_t max_depth = 16;        // tokens per path at most
  int32_t min_match = 1;         // shorter matches retrieve nothing
  int64_t min_count = 1;         // continuations seen fewer times are dropped
  int64_t backoff_min_count = 0; // back off to shorter suffixes while the match has fewer continuations
  bool raw_counts = false;       // scores = occurrence counts instead of conditional frequencies
};

// A retrieval tree as parent-pointer arrays (the layout of rasd.TokenTree): nodes in topological order,
// siblings by decreasing count. score = count / (1 + sum of the counts of the node and its siblings): the
// empirical probability of the token after its parent path with one pseudo-occurrence of an unseen
// continuation (a continuation seen once scores 0.5, ten out of ten 0.91), unless raw_counts.
struct RetrievedTree {
  std::vector<int32_t> tokens;
  std::vector<int32_t> parents;
  std::vector<float> scores;
  std::vector<int64_t> counts;
  int32_t match_length = 0;  // length of the context suffix the tree continues (after any back-off)
};

// Position of an incremental matcher: the state holding the longest suffix of the tokens fed that occurs in
// the automaton, and its length.
struct MatchState {
  int32_t state = 0;
  int32_t length = 0;
};

// The in-memory automaton: construction and the read interface the algorithms use. Not thread-safe by
// itself; SuffixAutomaton below owns one behind a reader/writer lock.
class MutableGraph {
 public:
  MutableGraph();

  int64_t add_document(const int32_t* tokens, int64_t n);
  void extend(const int32_t* tokens, int64_t n);

  int64_t num_tokens() const { return static_cast<int64_t>(tokens_.size()); }
  int64_t num_documents() const { return static_cast<int64_t>(doc_starts_.size()); }
  int64_t num_states() const { return static_cast<int64_t>(len_.size()); }
  int64_t num_edges() const { return num_edges_; }
  int32_t max_token() const { return max_token_; }
  MatchState tail_match() const { return tail_; }

  // Read interface shared with FrozenAutomaton (counts must be fresh for count()).
  int32_t len(int32_t s) const { return len_[s]; }
  int32_t link(int32_t s) const { return link_[s]; }
  int64_t count(int32_t s) const { return count_[s]; }
  int32_t next(int32_t s, int32_t token) const;
  template <typename F>
  void for_each_edge(int32_t s, F&& f) const {
    for (const auto& e : next_[s]) f(e.first, e.second);
  }
  int64_t state_count() const { return num_states(); }

  // Occurrence counts are recomputed lazily (O(states)) after the automaton changed.
  bool counts_fresh() const { return !counts_dirty_; }
  void refresh_counts();

  const std::vector<int32_t>& tokens() const { return tokens_; }
  const std::vector<int64_t>& doc_starts() const { return doc_starts_; }
  const std::vector<int32_t>& lens() const { return len_; }
  const std::vector<int32_t>& links() const { return link_; }
  const std::vector<int64_t>& counts() const { return count_; }
  const std::vector<std::vector<std::pair<int32_t, int32_t>>>& edges() const { return next_; }

 private:
  int32_t new_state(int32_t length, int32_t link);
  int32_t clone_state(int32_t q, int32_t length);
  void set_next(int32_t s, int32_t token, int32_t target);
  void extend_one(int32_t token);

  std::vector<int32_t> len_, link_;
  std::vector<int64_t> own_;    // occurrences ending exactly at this state's longest string (+1 per position)
  std::vector<int64_t> count_;  // |endpos|, valid when !counts_dirty_
  std::vector<std::vector<std::pair<int32_t, int32_t>>> next_;  // sorted by token
  std::vector<int32_t> tokens_;
  std::vector<int64_t> doc_starts_;
  int64_t num_edges_ = 0;
  int32_t last_ = 0;
  bool in_document_ = false;
  bool counts_dirty_ = false;
  int32_t max_token_ = -1;
  MatchState tail_;
  // The clone made by the last extend_one (and the state it was split from), so matchers can follow it.
  int32_t last_clone_ = kNoState, last_cloned_ = kNoState;
};

struct DatastoreMeta;

// The thread-safe mutable datastore: every public operation takes the lock itself (queries shared,
// growth exclusive), so any number of threads may query while one extends, from C++ or Python.
class SuffixAutomaton {
 public:
  // Append a new document; returns its id. Matches never cross documents.
  int64_t add_document(const int32_t* tokens, int64_t n);
  // Append tokens to the current document (the first call starts document 0). Also advances the tail
  // matcher (see tail_match()).
  void extend(const int32_t* tokens, int64_t n);

  int64_t num_tokens() const;
  int64_t num_documents() const;
  int64_t num_states() const;
  int64_t num_edges() const;
  int32_t max_token() const;

  // The longest suffix of the current document's text that also occurs *earlier* (ending before the last
  // token), so that it has at least one continuation: what prompt lookup continues from.
  MatchState tail_match() const;
  // Feed tokens to a matcher position (throws std::out_of_range for a position this store never gave).
  MatchState match(MatchState m, const int32_t* tokens, int64_t n) const;
  RetrievedTree retrieve(MatchState m, const RetrieveOptions& opt) const;
  // Writes the file (see datastore_file.h) from a consistent snapshot.
  void save(const DatastoreMeta& meta, const std::string& path) const;

 private:
  void check(MatchState m) const;
  mutable std::shared_mutex mutex_;
  mutable MutableGraph graph_;  // mutable: counts are refreshed lazily by queries (under the exclusive lock)
};

// A read-only automaton in CSR form; the arrays are borrowed (from an mmap or from buffers it owns).
class FrozenAutomaton {
 public:
  FrozenAutomaton() = default;
  // max_degree: edges one state may have at most (the vocabulary size; 0 = unknown, unchecked).
  FrozenAutomaton(int64_t num_states, int64_t num_edges, const int32_t* len, const int32_t* link,
                  const int64_t* count, const int64_t* edge_offsets, const int32_t* edge_tokens,
                  const int32_t* edge_targets, int64_t max_degree = 0);

  int32_t len(int32_t s) const;
  int32_t link(int32_t s) const;
  int64_t count(int32_t s) const;
  int32_t next(int32_t s, int32_t token) const;
  template <typename F>
  void for_each_edge(int32_t s, F&& f) const {
    const auto [begin, end] = edge_range(s);
    for (int64_t e = begin; e < end; ++e) f(checked_token(edge_tokens_[e]), checked_state(edge_targets_[e]));
  }
  int64_t state_count() const { return num_states_; }

 private:
  std::pair<int64_t, int64_t> edge_range(int32_t s) const;
  int32_t checked_state(int32_t s) const;
  int32_t checked_token(int32_t t) const;

  int64_t num_states_ = 0, num_edges_ = 0, max_degree_ = 0;
  const int32_t* len_ = nullptr;
  const int32_t* link_ = nullptr;
  const int64_t* count_ = nullptr;
  const int64_t* edge_offsets_ = nullptr;
  const int32_t* edge_tokens_ = nullptr;
  const int32_t* edge_targets_ = nullptr;
};

// Algorithms over either graph (explicitly instantiated for both in suffix_automaton.cc).
template <typename G>
MatchState match_feed(const G& g, MatchState m, const int32_t* tokens, int64_t n);
template <typename G>
RetrievedTree retrieve(const G& g, MatchState m, const RetrieveOptions& opt);

}  // namespace rasd
