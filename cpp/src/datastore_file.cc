#include "rasd/datastore_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace rasd {
namespace {

constexpr char kMagic[8] = {'R', 'A', 'S', 'D', 'S', 'A', 'M', '1'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 512;
constexpr int kSections = 8;
constexpr size_t kAlign = 64;
enum Section { kTokens, kDocStarts, kLen, kLink, kCount, kEdgeOffsets, kEdgeTokens, kEdgeTargets };
const char* kSectionNames[kSections] = {"tokens",       "doc_starts",  "len",         "link",
                                        "count",        "edge_offsets", "edge_tokens", "edge_targets"};

#pragma pack(push, 1)
struct SectionEntry {
  uint64_t offset;
  uint64_t bytes;
  uint32_t crc;
  uint32_t reserved;
};
struct Header {
  char magic[8];
  uint32_t version;
  uint32_t header_bytes;
  uint64_t file_bytes;
  int64_t vocab_size;
  int64_t num_tokens;
  int64_t num_docs;
  int64_t num_states;
  int64_t num_edges;
  char tokenizer_hash[64];
  char tokenizer_name[128];
  SectionEntry sections[kSections];
  uint8_t reserved[kHeaderBytes - 256 - kSections * sizeof(SectionEntry) - 4];
  uint32_t header_crc;
};
#pragma pack(pop)
static_assert(sizeof(Header) == kHeaderBytes, "header layout");

bool little_endian() {
  const uint16_t probe = 1;
  uint8_t first;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  return table;
}

[[noreturn]] void invalid(const std::string& path, const std::string& why) {
  throw std::invalid_argument("not a valid rasd datastore: " + path + ": " + why);
}

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

}  // namespace

uint32_t crc32(const void* data, size_t bytes, uint32_t crc) {
  static const auto table = make_crc_table();
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < bytes; ++i) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

void save_datastore(const SuffixAutomaton& sam, const DatastoreMeta& meta, const std::string& path) {
  if (!little_endian()) throw std::runtime_error("datastore files are little-endian; big-endian hosts unsupported");
  if (!sam.counts_fresh()) throw std::logic_error("save_datastore: counts are stale");
  if (meta.tokenizer_hash.size() > 64 || meta.tokenizer_name.size() > 127) {
    throw std::invalid_argument("tokenizer hash must be <= 64 and name <= 127 characters");
  }
  const int64_t S = sam.num_states(), E = sam.num_edges();
  // CSR edges.
  std::vector<int64_t> offsets(static_cast<size_t>(S) + 1, 0);
  std::vector<int32_t> edge_tokens, edge_targets;
  edge_tokens.reserve(static_cast<size_t>(E));
  edge_targets.reserve(static_cast<size_t>(E));
  for (int64_t s = 0; s < S; ++s) {
    for (const auto& [tok, target] : sam.edges()[s]) {
      edge_tokens.push_back(tok);
      edge_targets.push_back(target);
    }
    offsets[s + 1] = static_cast<int64_t>(edge_tokens.size());
  }
  const void* data[kSections] = {sam.tokens().data(), sam.doc_starts().data(), sam.lens().data(),
                                 sam.links().data(),  sam.counts().data(),     offsets.data(),
                                 edge_tokens.data(),  edge_targets.data()};
  const uint64_t bytes[kSections] = {
      sam.tokens().size() * 4, sam.doc_starts().size() * 8, static_cast<uint64_t>(S) * 4,
      static_cast<uint64_t>(S) * 4, static_cast<uint64_t>(S) * 8, offsets.size() * 8,
      edge_tokens.size() * 4, edge_targets.size() * 4};

  Header h{};
  std::memcpy(h.magic, kMagic, 8);
  h.version = kVersion;
  h.header_bytes = kHeaderBytes;
  h.vocab_size = meta.vocab_size;
  h.num_tokens = sam.num_tokens();
  h.num_docs = sam.num_documents();
  h.num_states = S;
  h.num_edges = static_cast<int64_t>(edge_tokens.size());
  std::memcpy(h.tokenizer_hash, meta.tokenizer_hash.data(), meta.tokenizer_hash.size());
  std::memcpy(h.tokenizer_name, meta.tokenizer_name.data(), meta.tokenizer_name.size());
  uint64_t offset = kHeaderBytes;
  for (int i = 0; i < kSections; ++i) {
    offset = align_up(offset);
    h.sections[i] = SectionEntry{offset, bytes[i], crc32(data[i], bytes[i]), 0};
    offset += bytes[i];
  }
  h.file_bytes = offset;
  h.header_crc = crc32(&h, kHeaderBytes - 4);

  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw std::runtime_error("cannot write " + tmp + ": " + std::strerror(errno));
  bool ok = std::fwrite(&h, kHeaderBytes, 1, f) == 1;
  static const char zeros[kAlign] = {};
  uint64_t pos = kHeaderBytes;
  for (int i = 0; i < kSections && ok; ++i) {
    const uint64_t pad = h.sections[i].offset - pos;
    ok = (pad == 0 || std::fwrite(zeros, 1, pad, f) == pad) &&
         (bytes[i] == 0 || std::fwrite(data[i], 1, bytes[i], f) == bytes[i]);
    pos = h.sections[i].offset + bytes[i];
  }
  ok = ok && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error("writing " + path + " failed: " + std::strerror(errno));
  }
}

MappedDatastore::MappedDatastore(const std::string& path, bool verify_checksums) {
  if (!little_endian()) throw std::runtime_error("datastore files are little-endian; big-endian hosts unsupported");
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::invalid_argument("cannot open datastore " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    invalid(path, "not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < kHeaderBytes) {
    ::close(fd);
    invalid(path, "file is " + std::to_string(size_) + " bytes, shorter than the header (truncated?)");
  }
  base_ = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (base_ == MAP_FAILED) {
    base_ = nullptr;
    throw std::invalid_argument("cannot mmap datastore " + path + ": " + std::strerror(errno));
  }
  try {
    Header h;
    std::memcpy(&h, base_, kHeaderBytes);
    if (std::memcmp(h.magic, kMagic, 8) != 0) invalid(path, "wrong magic bytes (not a datastore file)");
    if (h.version != kVersion) {
      invalid(path, "format version " + std::to_string(h.version) + ", this rasd reads version " +
                        std::to_string(kVersion));
    }
    if (crc32(&h, kHeaderBytes - 4) != h.header_crc) invalid(path, "header checksum mismatch (corrupted)");
    if (h.file_bytes != size_) {
      invalid(path, "header records " + std::to_string(h.file_bytes) + " bytes, file has " +
                        std::to_string(size_) + " (truncated or appended to)");
    }
    if (h.num_tokens < 0 || h.num_docs < 0 || h.num_states < 1 || h.num_edges < 0 || h.vocab_size < 0 ||
        h.num_states > INT32_MAX || h.num_tokens > INT64_MAX / 8) {
      invalid(path, "impossible counts in the header");
    }
    const uint64_t expected[kSections] = {
        static_cast<uint64_t>(h.num_tokens) * 4, static_cast<uint64_t>(h.num_docs) * 8,
        static_cast<uint64_t>(h.num_states) * 4, static_cast<uint64_t>(h.num_states) * 4,
        static_cast<uint64_t>(h.num_states) * 8, static_cast<uint64_t>(h.num_states + 1) * 8,
        static_cast<uint64_t>(h.num_edges) * 4,  static_cast<uint64_t>(h.num_edges) * 4};
    const uint8_t* bytes = static_cast<const uint8_t*>(base_);
    const void* sec[kSections];
    for (int i = 0; i < kSections; ++i) {
      const SectionEntry& e = h.sections[i];
      if (e.bytes != expected[i]) invalid(path, std::string("section ") + kSectionNames[i] + " has the wrong size");
      if (e.offset < kHeaderBytes || e.offset % 8 != 0 || e.offset > size_ || e.bytes > size_ - e.offset) {
        invalid(path, std::string("section ") + kSectionNames[i] + " lies outside the file");
      }
      sec[i] = bytes + e.offset;
      if (verify_checksums && crc32(sec[i], e.bytes) != e.crc) {
        invalid(path, std::string("checksum mismatch in section ") + kSectionNames[i] + " (corrupted)");
      }
    }
    const auto* offsets = static_cast<const int64_t*>(sec[kEdgeOffsets]);
    if (offsets[0] != 0 || offsets[h.num_states] != h.num_edges) invalid(path, "edge offsets are inconsistent");
    h.tokenizer_name[127] = '\0';
    meta_.tokenizer_name = std::string(h.tokenizer_name, strnlen(h.tokenizer_name, 127));
    meta_.tokenizer_hash = std::string(h.tokenizer_hash, strnlen(h.tokenizer_hash, 64));
    meta_.vocab_size = h.vocab_size;
    num_tokens_ = h.num_tokens;
    num_docs_ = h.num_docs;
    num_states_ = h.num_states;
    num_edges_ = h.num_edges;
    version_ = h.version;
    tokens_ = static_cast<const int32_t*>(sec[kTokens]);
    graph_ = FrozenAutomaton(h.num_states, h.num_edges, static_cast<const int32_t*>(sec[kLen]),
                             static_cast<const int32_t*>(sec[kLink]), static_cast<const int64_t*>(sec[kCount]),
                             offsets, static_cast<const int32_t*>(sec[kEdgeTokens]),
                             static_cast<const int32_t*>(sec[kEdgeTargets]));
  } catch (...) {
    ::munmap(base_, size_);
    base_ = nullptr;
    throw;
  }
}

MappedDatastore::~MappedDatastore() {
  if (base_) ::munmap(base_, size_);
}

}  // namespace rasd
