#include "rasd/datastore_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
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
  // sha256 of the whole tokenizer (normalizer, pre-tokenizer, model with merges, added tokens); all zero
  // when unknown (files written before it was recorded, or without a tokenizer).
  uint8_t tokenizer_full_hash[32];
  uint8_t reserved[kHeaderBytes - 256 - kSections * sizeof(SectionEntry) - 32 - 4];
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

// CRC-32 (ISO-HDLC, zlib's) tables for slicing-by-8: table[k][b] is the CRC of byte b followed by k zero
// bytes, so eight input bytes are folded per step (~5x the byte-at-a-time loop; checking every section of
// a 900 MB store on open is what this buys down).
using CrcTables = std::array<std::array<uint32_t, 256>, 8>;

CrcTables make_crc_tables() {
  CrcTables t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    t[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; ++i) {
    for (int k = 1; k < 8; ++k) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFF];
  }
  return t;
}

[[noreturn]] void invalid(const std::string& path, const std::string& why) {
  throw std::invalid_argument("not a valid rasd datastore: " + path + ": " + why);
}

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

}  // namespace

uint32_t crc32(const void* data, size_t bytes, uint32_t crc) {
  static const CrcTables t = make_crc_tables();
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (; bytes >= 8; bytes -= 8, p += 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);  // little-endian host (checked before any file is read or written)
    std::memcpy(&hi, p + 4, 4);
    lo ^= crc;
    crc = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
          t[3][hi & 0xFF] ^ t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
  }
  for (; bytes > 0; --bytes, ++p) crc = t[0][(crc ^ *p) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

void save_datastore(const MutableGraph& sam, const DatastoreMeta& meta, const std::string& path) {
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
  for (size_t i = 0; i < 32 && meta.tokenizer_full_hash.size() == 64; ++i) {
    h.tokenizer_full_hash[i] = static_cast<uint8_t>(std::stoul(meta.tokenizer_full_hash.substr(2 * i, 2), nullptr, 16));
  }
  uint64_t offset = kHeaderBytes;
  for (int i = 0; i < kSections; ++i) {
    offset = align_up(offset);
    h.sections[i] = SectionEntry{offset, bytes[i], crc32(data[i], bytes[i]), 0};
    offset += bytes[i];
  }
  h.file_bytes = offset;
  h.header_crc = crc32(&h, kHeaderBytes - 4);

  if (path.find('\0') != std::string::npos) throw std::invalid_argument("the datastore path contains a NUL byte");
  // The bytes go to a file of their own that no other save can touch: an anonymous O_TMPFILE in the
  // target directory where the file system has it (a save killed half-way leaves nothing behind), else a
  // new `<path>.tmp.XXXXXX` (O_CREAT | O_EXCL: never an existing file, never through a symlink). It is
  // named and renamed into place only once complete, so concurrent saves to one path leave one whole file.
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  std::string tmp;
  int fd = ::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644);
  const bool anonymous = fd >= 0;
  if (!anonymous) {
    tmp = path + ".tmp.XXXXXX";
    fd = ::mkstemp(tmp.data());
    if (fd < 0) throw std::runtime_error("cannot write " + path + ": " + std::strerror(errno));
    ::fchmod(fd, 0644);  // mkstemp creates 0600; datastores are shared read-only between processes
  }
  FILE* f = ::fdopen(fd, "wb");
  if (!f) {
    const int why = errno;
    ::close(fd);
    if (!anonymous) ::unlink(tmp.c_str());
    throw std::runtime_error("cannot write " + path + ": " + std::strerror(why));
  }
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
  int why = errno;
  if (ok && anonymous) {
    // Give the finished anonymous file a unique name next to the target (linkat through /proc: no
    // privilege needed), then rename it over the target like the named case.
    const std::string proc = "/proc/self/fd/" + std::to_string(fileno(f));
    for (unsigned attempt = 0; attempt < 100; ++attempt) {
      tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(attempt) + "." +
            std::to_string(reinterpret_cast<uintptr_t>(&h) & 0xFFFFF);
      if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, tmp.c_str(), AT_SYMLINK_FOLLOW) == 0) break;
      why = errno;
      tmp.clear();
      if (why != EEXIST) break;
    }
    ok = !tmp.empty();
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    if (ok) why = errno;
    if (!tmp.empty()) ::unlink(tmp.c_str());
    throw std::runtime_error("writing " + path + " failed: " + std::strerror(why));
  }
  // Make the rename itself durable (best effort: some file systems refuse fsync on a directory).
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

MappedDatastore::MappedDatastore(const std::string& path, bool verify_checksums) : path_(path) {
  if (!little_endian()) throw std::runtime_error("datastore files are little-endian; big-endian hosts unsupported");
  if (path.find('\0') != std::string::npos) throw std::invalid_argument("the datastore path contains a NUL byte");
  // O_NONBLOCK: opening a FIFO (or a device) must not block; anything but a regular file is refused below.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
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
    // Every count is bounded by what the file can hold before any size is computed from it, so no
    // product below can wrap around (a crafted header could otherwise claim 2^62 edges in 0 bytes).
    const auto fits = [&](int64_t count, uint64_t item) {
      return count >= 0 && static_cast<uint64_t>(count) <= size_ / item;
    };
    if (!fits(h.num_tokens, 4) || !fits(h.num_docs, 8) || !fits(h.num_states, 8) || h.num_states < 1 ||
        h.num_states > INT32_MAX - 1 || !fits(h.num_states + 1, 8) || !fits(h.num_edges, 4) ||
        h.vocab_size < 0 || h.vocab_size > INT32_MAX) {
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
      sections_[i] = {e.offset, e.bytes, e.crc};
      if (verify_checksums && crc32(sec[i], e.bytes) != e.crc) {
        invalid(path, std::string("checksum mismatch in section ") + kSectionNames[i] + " (corrupted)");
      }
    }
    len_ = static_cast<const int32_t*>(sec[kLen]);
    link_ = static_cast<const int32_t*>(sec[kLink]);
    count_ = static_cast<const int64_t*>(sec[kCount]);
    edge_offsets_ = static_cast<const int64_t*>(sec[kEdgeOffsets]);
    edge_tokens_ = static_cast<const int32_t*>(sec[kEdgeTokens]);
    edge_targets_ = static_cast<const int32_t*>(sec[kEdgeTargets]);
    doc_starts_ = static_cast<const int64_t*>(sec[kDocStarts]);
    if (edge_offsets_[0] != 0 || edge_offsets_[h.num_states] != h.num_edges) {
      invalid(path, "edge offsets are inconsistent");
    }
    if (len_[0] != 0 || link_[0] != kNoState) invalid(path, "the root state is malformed");
    h.tokenizer_name[127] = '\0';
    meta_.tokenizer_name = std::string(h.tokenizer_name, strnlen(h.tokenizer_name, 127));
    meta_.tokenizer_hash = std::string(h.tokenizer_hash, strnlen(h.tokenizer_hash, 64));
    static const char* const hex = "0123456789abcdef";
    bool any = false;
    std::string full(64, '0');
    for (int i = 0; i < 32; ++i) {
      any = any || h.tokenizer_full_hash[i] != 0;
      full[2 * i] = hex[h.tokenizer_full_hash[i] >> 4];
      full[2 * i + 1] = hex[h.tokenizer_full_hash[i] & 0xF];
    }
    meta_.tokenizer_full_hash = any ? full : std::string();
    meta_.vocab_size = h.vocab_size;
    num_tokens_ = h.num_tokens;
    num_docs_ = h.num_docs;
    num_states_ = h.num_states;
    num_edges_ = h.num_edges;
    version_ = h.version;
    tokens_ = static_cast<const int32_t*>(sec[kTokens]);
    graph_ = FrozenAutomaton(h.num_states, h.num_edges, len_, link_, count_, edge_offsets_, edge_tokens_,
                             edge_targets_, h.vocab_size);
  } catch (...) {
    ::munmap(base_, size_);
    base_ = nullptr;
    throw;
  }
}

void MappedDatastore::check_states(int64_t begin, int64_t end) const {
  begin = std::max<int64_t>(begin, 0);
  end = std::min(end, num_states_);
  const auto bad = [&](int64_t s, const std::string& what) {
    invalid(path_, "state " + std::to_string(s) + ": " + what);
  };
  for (int64_t s = begin; s < end; ++s) {
    const int32_t l = link_[s];
    if (s == 0) {
      if (len_[0] != 0 || l != kNoState) bad(s, "the root must have length 0 and no suffix link");
    } else {
      if (l < 0 || l >= num_states_) bad(s, "suffix link out of range");
      if (len_[l] >= len_[s]) bad(s, "suffix link does not shorten the state");
      // A suffix occurs wherever the longer string does: endpos(s) is a subset of endpos(link(s)).
      if (l != 0 && count_[l] < count_[s]) bad(s, "occurs more often than its suffix");
    }
    if (count_[s] < 0) bad(s, "negative occurrence count");
    const int64_t b = edge_offsets_[s], e = edge_offsets_[s + 1];
    if (b < 0 || b > e || e > num_edges_) bad(s, "edge offsets out of order or range");
    if (meta_.vocab_size > 0 && e - b > meta_.vocab_size) bad(s, "more edges than tokens in the vocabulary");
    for (int64_t i = b; i < e; ++i) {
      if (edge_tokens_[i] < 0) bad(s, "negative token on an edge");
      if (i > b && edge_tokens_[i] <= edge_tokens_[i - 1]) bad(s, "edges not strictly sorted by token");
      const int32_t t = edge_targets_[i];
      if (t <= 0 || t >= num_states_) bad(s, "edge target out of range");
      if (static_cast<int64_t>(len_[t]) <= len_[s]) bad(s, "edge target not longer than its source");
      // Every occurrence of s.a extends an occurrence of s.
      if (s != 0 && count_[t] > count_[s]) bad(s, "a continuation occurs more often than the state itself");
    }
  }
}

void MappedDatastore::check_sections() const {
  const uint8_t* bytes = static_cast<const uint8_t*>(base_);
  for (int i = 0; i < kSections; ++i) {
    if (crc32(bytes + sections_[i].offset, sections_[i].bytes) != sections_[i].crc) {
      invalid(path_, std::string("checksum mismatch in section ") + kSectionNames[i] + " (corrupted)");
    }
  }
  for (int64_t d = 0; d < num_docs_; ++d) {
    if (doc_starts_[d] < 0 || doc_starts_[d] > num_tokens_ || (d > 0 && doc_starts_[d] < doc_starts_[d - 1])) {
      invalid(path_, "document starts out of order or range at document " + std::to_string(d));
    }
  }
}

MappedDatastore::~MappedDatastore() {
  if (base_) ::munmap(base_, size_);
}

}  // namespace rasd
