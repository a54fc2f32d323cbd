// The FedCache wire (docs/protocol.md, version 1) in C++: msgpack maps with raw little-endian arrays, the
// FedCache message kinds a device sends and receives, canonical encoding (byte-identical to the Python
// reference on tests/vectors) and a decoder that validates in the order §9 lists, throwing ProtocolError.
// The baselines' kinds (§16: fd_*, model_*) are recognised but not implemented: decode says so.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fedcache::wire {

constexpr uint64_t kVersion = 1;
constexpr size_t kMaxPayloadBytes = 4194304;
constexpr size_t kMaxIds = 8192;
constexpr uint64_t kMaxClasses = 1000;
constexpr uint64_t kMaxHashBytes = 4096;
constexpr uint64_t kU32Max = 4294967295ull;
constexpr uint64_t kI64Max = 9223372036854775807ull;

class ProtocolError : public std::runtime_error {
 public:
  ProtocolError(std::string code, const std::string& detail)
      : std::runtime_error(code + ": " + detail), code(std::move(code)) {}
  std::string code;       // an error code of §9
  bool has_cid = false;   // whether the map held a valid `c`
  uint64_t cid = 0;
};

// Everything any FedCache message carries; `kind` says which fields are meaningful (see wire.cc's tables).
struct Message {
  std::string kind, device;
  uint64_t cid = 0;
  // hello
  std::string model, hash_kind;
  uint64_t classes = 0, samples = 0, hash_dim = 0;
  std::vector<std::string> capabilities;
  // acks
  uint64_t registered = 0, neighbours = 0, accepted = 0, applied = 0, stale = 0;
  // sample arrays
  std::vector<uint32_t> ids, fetch_ids;
  std::vector<uint16_t> labels, counts;
  uint64_t hash_bytes = 0;           // register: bytes per hash row
  std::vector<uint8_t> hashes;       // register: ids.size() x hash_bytes
  // logits (update, update_fetch, knowledge): rows x cols float32 as decoded, sent in `encoding`
  uint64_t version = 0;
  std::string encoding = "f16";      // also fetch's `enc`
  std::string teacher = "mean";      // mean | raw (the default is not sent)
  uint64_t rows = 0, cols = 0;
  std::vector<float> logits;
  // error
  std::string code, message, request;
};

bool is_baseline_kind(const std::string& kind);
// Whether `name` is a logit encoding of docs/protocol.md §6 (what a device may send and ask for).
bool is_logit_encoding(const std::string& name);
// Canonical msgpack bytes; throws std::invalid_argument for values the wire cannot carry (NaN logits, ...).
std::vector<uint8_t> encode(const Message& message);
// Validates everything (size, msgpack, map, v, k, d, c, the kind's fields, the rules between them).
Message decode(const uint8_t* data, size_t size);
// The float32 values the receiver decodes from logits sent with `encoding` (what the server stores).
std::vector<float> as_received(const std::vector<float>& logits, uint64_t rows, uint64_t cols,
                               const std::string& encoding);
// Device id rule of §2.3 (as the reference checks it: a letter or digit first).
bool valid_device_id(const std::string& id);

}  // namespace fedcache::wire
