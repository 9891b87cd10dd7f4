// On-disk datastore: a suffix automaton in CSR form, written once and mmap'd read-only by any number of
// processes (the page cache shares it), so a multi-GB store opens in milliseconds.
//
// Layout (little-endian, version 1):
//   [0, 512)   header: magic "RASDSAM1", version, header size, file size, vocab size, token/document/
//              state/edge counts, tokenizer hash (64 hex chars) and name, a table of 8 sections
//              {offset, bytes, crc32}, and the CRC32 of the header itself in its last 4 bytes.
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
  int64_t vocab_size = 0;
};

// Writes `path` atomically (a temporary file renamed into place). Counts must be fresh.
void save_datastore(const SuffixAutomaton& sam, const DatastoreMeta& meta, const std::string& path);

uint32_t crc32(const void* data, size_t bytes, uint32_t crc = 0);

class MappedDatastore {
 public:
  // Throws std::invalid_argument with the reason if the file is not a valid datastore.
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

 private:
  void* base_ = nullptr;
  size_t size_ = 0;
  DatastoreMeta meta_;
  FrozenAutomaton graph_;
  int64_t num_tokens_ = 0, num_docs_ = 0, num_states_ = 0, num_edges_ = 0;
  uint32_t version_ = 0;
  const int32_t* tokens_ = nullptr;
};

}  // namespace rasd
