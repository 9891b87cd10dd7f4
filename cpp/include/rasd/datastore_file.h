// On-disk datastore: a suffix automaton in CSR form, written once and mmap'd read-only by any number of
// processes (the page cache shares it), so a multi-GB store opens in milliseconds.
//
// Layout (little-endian, version 1):
//   [0, 512)   header: magic "RASDSAM1", version, header size, file size, vocab size, token/document/
//              state/edge counts, tokenizer hash (64 hex chars) and name, a table of 8 sections
//              {offset, bytes, crc32}, the whole tokenizer's sha256 (32 bytes, zero = unknown; added in the
//              reserved bytes, so older files read as "unknown"), and the header's CRC32 in its last 4 bytes.
//   sections   64-byte aligned: tokens i32[T], doc_starts i64[D], len i32[S], link i32[S], count i64[S],
//              edge_offsets i64[S+1], edge_tokens i32[E], edge_targets i32[E].
// Opening checks the header (magic, version, CRC, the file size it records, section bounds and sizes)
// and, when asked, every section's CRC32. Whatever is not checked up front is bounds-checked on access
// by FrozenAutomaton, so a damaged file raises instead of reading out of bounds.
#pragma once

#include <cstdint>
#include <string>

#include "rasd/suffix_automaton.h"

namespace rasd {

struct DatastoreMeta {
  std::string tokenizer_name;
  std::string tokenizer_hash;  // 64 hex characters (sha256 of the vocabulary)
  int64_t vocab_size = 0;      // 0 = unknown (saved without a tokenizer)
  std::string tokenizer_full_hash;  // 64 hex characters (sha256 of the whole tokenizer) or empty
};

// Writes `path` atomically: the bytes go to a file no other save can touch (an anonymous O_TMPFILE in the
// target's directory, or where the file system lacks it a new `<path>.tmp.XXXXXX` created exclusively,
// never through a symlink), fsync'd, then named and renamed into place. Concurrent saves to one path leave
// one complete file; a killed save leaves the old file intact (and, with O_TMPFILE, no temporary file).
// Counts must be fresh.
void save_datastore(const MutableGraph& sam, const DatastoreMeta& meta, const std::string& path);

uint32_t crc32(const void* data, size_t bytes, uint32_t crc = 0);

class MappedDatastore {
 public:
  // Throws std::invalid_argument with the reason if the file is not a valid datastore. Every count in the
  // header is bounded by what the file can hold before any size is computed; what is cheap to check (the
  // root state, edge offsets at the ends) is checked here, the rest on access (FrozenAutomaton).
  MappedDatastore(const std::string& path, bool verify_checksums);
  ~MappedDatastore();
  MappedDatastore(const MappedDatastore&) = delete;
  MappedDatastore& operator=(const MappedDatastore&) = delete;

  const DatastoreMeta& meta() const { return meta_; }
  const FrozenAutomaton& graph() const { return graph_; }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_documents() const { return num_docs_; }
  int64_t num_states() const { return num_states_; }
  int64_t num_edges() const { return num_edges_; }
  int64_t file_bytes() const { return static_cast<int64_t>(size_); }
  uint32_t version() const { return version_; }
  const int32_t* tokens() const { return tokens_; }

  // The full check, O(file): states [begin, end) (link shortens the state, edge offsets monotone and in
  // range, edges strictly sorted, targets in range and longer than their source, counts non-negative), and
  // with `sections` also doc starts and every section's CRC32. Throws std::invalid_argument naming the
  // first problem. Chunked so a caller can report progress on large files.
  void check_states(int64_t begin, int64_t end) const;
  void check_sections() const;
 private:
  std::string path_;
  void* base_ = nullptr;
  size_t size_ = 0;
  const int32_t* len_ = nullptr;
  const int32_t* link_ = nullptr;
  const int64_t* count_ = nullptr;
  const int64_t* edge_offsets_ = nullptr;
  const int32_t* edge_tokens_ = nullptr;
  const int32_t* edge_targets_ = nullptr;
  const int64_t* doc_starts_ = nullptr;
  struct Section {
    uint64_t offset = 0, bytes = 0;
    uint32_t crc = 0;
  };
  Section sections_[8];
  DatastoreMeta meta_;
  FrozenAutomaton graph_;
  int64_t num_tokens_ = 0, num_docs_ = 0, num_states_ = 0, num_edges_ = 0;
  uint32_t version_ = 0;
  const int32_t* tokens_ = nullptr;
};

}  // namespace rasd
