// msgpack-c underneath: msgpack_unpack_next parses one document (0xc1, truncation and trailing bytes are
// bad_encoding), then a walk checks UTF-8 and map keys before the schema of the message's kind runs.
#include "wire.h"

#include <msgpack.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <set>

#include "f16.h"

namespace fedcache::wire {

namespace {

const std::set<std::string> kRequestReplyKinds = {"hello", "register", "fetch", "update", "update_fetch",
                                                  "hello_ack", "register_ack", "knowledge", "update_ack", "error"};
const std::set<std::string> kBaselineKinds = {"fd_update", "fd_global", "model_put", "model_ack", "model_get",
                                              "model_state"};
const std::vector<std::string> kErrorCodes = {
    "too_large",       "bad_encoding",   "bad_version",   "bad_schema",     "bad_dtype",
    "bad_shape",       "non_finite",     "device_mismatch", "unknown_device", "unknown_sample",
    "class_mismatch",  "hash_mismatch",  "internal",      "model_mismatch"};
const std::vector<std::string> kEncodings = {"f32", "f16", "i8", "i8b"};
const std::vector<std::string> kTeacherForms = {"mean", "raw"};
const std::vector<std::string> kHashKinds = {"bin", "f16"};

[[noreturn]] void fail(const std::string& code, const std::string& detail) { throw ProtocolError(code, detail); }

// ---------------------------------------------------------------- UTF-8 and the document walk

bool valid_utf8(const char* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t extra;
    uint32_t cp;
    if (c < 0x80) { ++i; continue; }
    if ((c & 0xe0) == 0xc0) { extra = 1; cp = c & 0x1f; }
    else if ((c & 0xf0) == 0xe0) { extra = 2; cp = c & 0x0f; }
    else if ((c & 0xf8) == 0xf0) { extra = 3; cp = c & 0x07; }
    else return false;
    for (size_t k = 1; k <= extra; ++k) {
      if (i + k >= n) return false;
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    static const uint32_t kMin[4] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[extra] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += extra + 1;
  }
  return true;
}

size_t code_points(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xc0) != 0x80;
  return n;
}

void check_document(const msgpack_object& o, int depth) {
  if (depth > 64) fail("bad_encoding", "nested too deeply");
  switch (o.type) {
    case MSGPACK_OBJECT_STR:
      if (!valid_utf8(o.via.str.ptr, o.via.str.size)) fail("bad_encoding", "a str is not valid UTF-8");
      break;
    case MSGPACK_OBJECT_ARRAY:
      for (uint32_t i = 0; i < o.via.array.size; ++i) check_document(o.via.array.ptr[i], depth + 1);
      break;
    case MSGPACK_OBJECT_MAP:
      for (uint32_t i = 0; i < o.via.map.size; ++i) {
        const msgpack_object& key = o.via.map.ptr[i].key;
        if (key.type != MSGPACK_OBJECT_STR && key.type != MSGPACK_OBJECT_BIN)
          fail("bad_encoding", "a map key is neither str nor bin");
        check_document(key, depth + 1);
        check_document(o.via.map.ptr[i].val, depth + 1);
      }
      break;
    default:
      break;
  }
}

// A walk over the raw bytes before msgpack-c sees them: every declared str/bin/ext length and every
// container count must fit in the bytes that are left (an element takes at least one byte). msgpack-c
// allocates for the declared counts up front, so without this a 5-byte header claiming 2^32 entries
// asks for 128 GiB; with it, what a payload can make the decoder allocate is bounded by its own size.
bool counts_fit(const uint8_t* p, size_t n) {
  size_t at = 0, pending = 1;  // elements still to read
  auto big = [&](size_t bytes, uint64_t* out) {
    if (n - at < bytes) return false;
    uint64_t v = 0;
    for (size_t i = 0; i < bytes; ++i) v = (v << 8) | p[at + i];
    at += bytes;
    *out = v;
    return true;
  };
  while (pending > 0) {
    if (at >= n) return false;
    const uint8_t b = p[at++];
    --pending;
    uint64_t len = 0, items = 0;
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) continue;
    if (b >= 0xa0 && b <= 0xbf) { len = b & 0x1f; }
    else if (b >= 0x90 && b <= 0x9f) { items = b & 0x0f; }
    else if (b >= 0x80 && b <= 0x8f) { items = uint64_t(b & 0x0f) * 2; }
    else switch (b) {
      case 0xc4: case 0xd9: if (!big(1, &len)) return false; break;
      case 0xc5: case 0xda: if (!big(2, &len)) return false; break;
      case 0xc6: case 0xdb: if (!big(4, &len)) return false; break;
      case 0xc7: if (!big(1, &len)) return false; len += 1; break;
      case 0xc8: if (!big(2, &len)) return false; len += 1; break;
      case 0xc9: if (!big(4, &len)) return false; len += 1; break;
      case 0xca: case 0xd2: case 0xce: len = 4; break;
      case 0xcb: case 0xd3: case 0xcf: len = 8; break;
      case 0xcc: case 0xd0: len = 1; break;
      case 0xcd: case 0xd1: len = 2; break;
      case 0xd4: len = 2; break;
      case 0xd5: len = 3; break;
      case 0xd6: len = 5; break;
      case 0xd7: len = 9; break;
      case 0xd8: len = 17; break;
      case 0xdc: if (!big(2, &items)) return false; break;
      case 0xdd: if (!big(4, &items)) return false; break;
      case 0xde: if (!big(2, &items)) return false; items *= 2; break;
      case 0xdf: if (!big(4, &items)) return false; items *= 2; break;
      default: return false;  // 0xc1, never used
    }
    if (len > n - at) return false;
    at += size_t(len);
    if (items > n - at) return false;
    pending += size_t(items);
  }
  return at == n;
}

// ---------------------------------------------------------------- one map's fields

struct Map {
  const msgpack_object* object;
  std::string where;

  const msgpack_object* get(const std::string& key) const {
    const msgpack_object* found = nullptr;  // the last of duplicate keys wins, as in the reference decoder
    for (uint32_t i = 0; i < object->via.map.size; ++i) {
      const msgpack_object& k = object->via.map.ptr[i].key;
      if (k.type == MSGPACK_OBJECT_STR && k.via.str.size == key.size() &&
          std::memcmp(k.via.str.ptr, key.data(), key.size()) == 0)
        found = &object->via.map.ptr[i].val;
    }
    return found;
  }
  const msgpack_object& take(const std::string& key, msgpack_object_type type, const char* type_name) const {
    const msgpack_object* v = get(key);
    if (v == nullptr) fail("bad_schema", where + " lacks field '" + key + "'");
    const bool is_int = type == MSGPACK_OBJECT_POSITIVE_INTEGER;
    const bool ok = is_int ? (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER || v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
                           : v->type == type;
    if (!ok) fail("bad_schema", where + "." + key + " must be " + type_name);
    return *v;
  }
  uint64_t integer(const std::string& key, uint64_t high, uint64_t low = 0, const char* code = "bad_shape") const {
    const msgpack_object& v = take(key, MSGPACK_OBJECT_POSITIVE_INTEGER, "int");
    if (v.type == MSGPACK_OBJECT_NEGATIVE_INTEGER || v.via.u64 < low || v.via.u64 > high)
      fail(code, where + "." + key + " outside [" + std::to_string(low) + ", " + std::to_string(high) + "]");
    return v.via.u64;
  }
  std::string text(const std::string& key, size_t max_len = 0) const {
    const msgpack_object& v = take(key, MSGPACK_OBJECT_STR, "str");
    std::string s(v.via.str.ptr, v.via.str.size);
    if (max_len && code_points(s) > max_len) fail("too_large", where + "." + key + " is longer than " +
                                                  std::to_string(max_len));
    return s;
  }
  std::string choice(const std::string& key, const std::vector<std::string>& options) const {
    std::string s = text(key);
    if (std::find(options.begin(), options.end(), s) == options.end())
      fail("bad_schema", where + "." + key + "='" + s + "' is not allowed");
    return s;
  }
  std::vector<std::string> tags(const std::string& key) const {
    const msgpack_object& v = take(key, MSGPACK_OBJECT_ARRAY, "array");
    std::vector<std::string> out;
    if (v.via.array.size > 64) fail("bad_schema", where + "." + key + " has more than 64 tags");
    for (uint32_t i = 0; i < v.via.array.size; ++i) {
      const msgpack_object& t = v.via.array.ptr[i];
      if (t.type != MSGPACK_OBJECT_STR) fail("bad_schema", where + "." + key + " must hold str");
      out.emplace_back(t.via.str.ptr, t.via.str.size);
      if (code_points(out.back()) > 64) fail("bad_schema", where + "." + key + " tag longer than 64");
    }
    return out;
  }
  const msgpack_object_bin& bin(const std::string& key) const { return take(key, MSGPACK_OBJECT_BIN, "bin").via.bin; }
  std::vector<uint32_t> ids(const std::string& key) const {
    const msgpack_object_bin& b = bin(key);
    if (b.size % 4) fail("bad_dtype", where + "." + key + " is not a whole number of uint32");
    if (b.size / 4 > kMaxIds) fail("too_large", where + "." + key + " has more than 8192 ids");
    std::vector<uint32_t> out(b.size / 4);
    if (b.size) std::memcpy(out.data(), b.ptr, b.size);
    std::vector<uint32_t> sorted = out;
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) fail("bad_shape", where + "." + key +
                                                                                                " repeats a value");
    return out;
  }
  template <typename T>
  std::vector<T> exact(const std::string& key, size_t count) const {
    const msgpack_object_bin& b = bin(key);
    if (b.size != count * sizeof(T))
      fail("bad_shape", where + "." + key + " has " + std::to_string(b.size) + " bytes, expected " +
                            std::to_string(count * sizeof(T)));
    std::vector<T> out(count);
    if (count) std::memcpy(out.data(), b.ptr, b.size);
    return out;
  }
};

void read_logits(const Map& parent, Message& m) {
  const msgpack_object* block = parent.get("logits");
  if (block == nullptr) fail("bad_schema", parent.where + " lacks field 'logits'");
  if (block->type != MSGPACK_OBJECT_MAP) fail("bad_schema", parent.where + ".logits must be a map");
  Map b{block, parent.where + ".logits"};
  m.encoding = b.choice("e", kEncodings);
  m.rows = b.integer("n", kMaxIds);
  m.cols = b.integer("m", kMaxClasses);
  const size_t count = size_t(m.rows * m.cols);
  m.logits.resize(count);
  if (m.encoding == "f32") {
    auto v = b.exact<float>("b", count);
    m.logits = v;
  } else if (m.encoding == "f16") {
    auto v = b.exact<uint16_t>("b", count);
    for (size_t i = 0; i < count; ++i) m.logits[i] = half_to_float(v[i]);
  } else {
    // i8: one scale per row; i8b: one for the whole block (docs/protocol.md §6).
    const bool per_row = m.encoding == "i8";
    auto v = b.exact<int8_t>("b", count);
    auto s = b.exact<float>("s", per_row ? size_t(m.rows) : 1);
    for (float scale : s)
      if (!std::isfinite(scale)) fail("non_finite", b.where + ".s holds NaN or infinite values");
    for (size_t i = 0; i < count; ++i) m.logits[i] = float(v[i]) * s[per_row ? i / m.cols : 0];
  }
  for (float x : m.logits)
    if (!std::isfinite(x)) fail("non_finite", b.where + " holds NaN or infinite values");
}

void read_teacher(const Map& map, Message& m) {
  m.teacher = map.get("teach") == nullptr ? "mean" : map.choice("teach", kTeacherForms);
}

void read_fields(const Map& map, Message& m) {
  const std::string& k = m.kind;
  if (k == "hello") {
    m.model = map.text("model", 64);
    m.classes = map.integer("classes", kMaxClasses, 2);
    m.samples = map.integer("samples", kU32Max);
    m.hash_kind = map.choice("hash_kind", kHashKinds);
    m.hash_dim = map.integer("hash_dim", kMaxHashBytes * 8, 1);
    m.capabilities = map.tags("caps");
    if (m.hash_kind == "bin" && m.hash_dim % 8) fail("bad_shape", "hash_dim is not a whole number of bytes");
    if (m.hash_kind == "f16" && m.hash_dim > kMaxHashBytes / 2) fail("bad_shape", "f16 hash_dim too large");
  } else if (k == "register") {
    m.ids = map.ids("ids");
    m.labels = map.exact<uint16_t>("labels", m.ids.size());
    m.hash_bytes = map.integer("hash_bytes", kMaxHashBytes);
    m.hashes = map.exact<uint8_t>("hashes", m.ids.size() * m.hash_bytes);
  } else if (k == "fetch") {
    m.ids = map.ids("ids");
    m.encoding = map.choice("enc", kEncodings);
    read_teacher(map, m);
  } else if (k == "update" || k == "update_fetch") {
    m.ids = map.ids("ids");
    m.version = map.integer("ver", kI64Max);
    read_logits(map, m);
    if (k == "update_fetch") {
      m.fetch_ids = map.ids("fetch_ids");
      read_teacher(map, m);
    }
    if (m.rows != m.ids.size()) fail("bad_shape", map.where + ": logit rows differ from ids");
  } else if (k == "hello_ack") {
    m.registered = map.integer("registered", kU32Max);
    m.neighbours = map.integer("r", 1024);
  } else if (k == "register_ack") {
    m.accepted = map.integer("accepted", kMaxIds);
    m.registered = map.integer("registered", kU32Max);
  } else if (k == "knowledge") {
    m.ids = map.ids("ids");
    m.counts = map.exact<uint16_t>("counts", m.ids.size());
    read_logits(map, m);
    m.applied = map.integer("applied", kMaxIds);
    m.stale = map.integer("stale", kMaxIds);
    read_teacher(map, m);
    uint64_t wanted = 0;
    for (uint16_t c : m.counts) wanted += m.teacher == "mean" ? (c > 0) : c;
    if (m.rows != wanted) fail("bad_shape", map.where + ": logit rows differ from the teachers its counts need");
  } else if (k == "update_ack") {
    m.applied = map.integer("applied", kMaxIds);
    m.stale = map.integer("stale", kMaxIds);
  } else if (k == "error") {
    m.code = map.choice("code", kErrorCodes);
    m.message = map.text("msg", 4096);
    m.request = map.text("re", 64);
  }
}

// ---------------------------------------------------------------- encoding

struct Packer {
  msgpack_sbuffer buffer;
  msgpack_packer packer;
  Packer() {
    msgpack_sbuffer_init(&buffer);
    msgpack_packer_init(&packer, &buffer, msgpack_sbuffer_write);
  }
  ~Packer() { msgpack_sbuffer_destroy(&buffer); }
  void map(size_t n) { msgpack_pack_map(&packer, n); }
  void str(const std::string& s) {
    msgpack_pack_str(&packer, s.size());
    msgpack_pack_str_body(&packer, s.data(), s.size());
  }
  void uint(uint64_t v) { msgpack_pack_uint64(&packer, v); }
  void bin(const void* data, size_t n) {
    msgpack_pack_bin(&packer, n);
    msgpack_pack_bin_body(&packer, data, n);
  }
  template <typename T>
  void array(const std::vector<T>& v) { bin(v.data(), v.size() * sizeof(T)); }
  void key_uint(const char* k, uint64_t v) { str(k); uint(v); }
  void key_str(const char* k, const std::string& v) { str(k); str(v); }
};

void pack_logits(Packer& p, const Message& m) {
  if (m.logits.size() != m.rows * m.cols) throw std::invalid_argument("logits size differs from rows x cols");
  for (float x : m.logits)
    if (!std::isfinite(x)) throw std::invalid_argument("logits hold NaN or infinite values");
  const bool per_row = m.encoding == "i8", scaled = per_row || m.encoding == "i8b";
  p.str("logits");
  p.map(scaled ? 5 : 4);
  p.key_str("e", m.encoding);
  p.key_uint("n", m.rows);
  p.key_uint("m", m.cols);
  p.str("b");
  if (m.encoding == "f32") {
    p.array(m.logits);
  } else if (m.encoding == "f16") {
    std::vector<uint16_t> h(m.logits.size());
    for (size_t i = 0; i < h.size(); ++i) h[i] = float_to_half(std::clamp(m.logits[i], -65504.0f, 65504.0f));
    p.array(h);
  } else if (scaled) {
    // The largest magnitude over 127 (1 for zeros), over each row for i8 and over the whole block for i8b.
    auto scale_of = [&](uint64_t first, uint64_t last) {
      float a = 0.0f;
      for (uint64_t i = first; i < last; ++i) a = std::max(a, std::fabs(m.logits[i]));
      const float s = a / 127.0f;
      return s > 0.0f ? s : 1.0f;
    };
    std::vector<int8_t> q(m.logits.size());
    std::vector<float> scales;
    if (!per_row) scales.push_back(scale_of(0, m.logits.size()));
    for (uint64_t r = 0; r < m.rows; ++r) {
      if (per_row) scales.push_back(scale_of(r * m.cols, (r + 1) * m.cols));
      const float s = scales.back();
      for (uint64_t j = 0; j < m.cols; ++j) {
        const float v = std::nearbyint(m.logits[r * m.cols + j] / s);
        q[r * m.cols + j] = int8_t(std::clamp(v, -127.0f, 127.0f));
      }
    }
    p.array(q);
    p.str("s");
    p.array(scales);
  } else {
    throw std::invalid_argument("unknown logit encoding " + m.encoding);
  }
}

size_t field_count(const Message& m) {
  const std::string& k = m.kind;
  const size_t teach = m.teacher != "mean";
  if (k == "hello") return 6;
  if (k == "register") return 4;
  if (k == "fetch") return 2 + teach;
  if (k == "update") return 3;
  if (k == "update_fetch") return 4 + teach;
  if (k == "knowledge") return 5 + teach;
  if (k == "error") return 3;
  return 2;  // hello_ack, register_ack, update_ack
}

}  // namespace

bool is_logit_encoding(const std::string& name) {
  return std::find(kEncodings.begin(), kEncodings.end(), name) != kEncodings.end();
}

bool is_baseline_kind(const std::string& kind) { return kBaselineKinds.count(kind) > 0; }

bool valid_device_id(const std::string& id) {
  if (id.empty() || id.size() > 64 || !std::isalnum(static_cast<unsigned char>(id[0]))) return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
  });
}

std::vector<uint8_t> encode(const Message& m) {
  if (kRequestReplyKinds.count(m.kind) == 0) throw std::invalid_argument("cannot encode kind '" + m.kind + "'");
  if (!valid_device_id(m.device)) throw std::invalid_argument("bad device id '" + m.device + "'");
  if (m.cid > kI64Max) throw std::invalid_argument("cid out of range");
  Packer p;
  p.map(4 + field_count(m));
  p.key_uint("v", kVersion);
  p.key_str("k", m.kind);
  p.key_str("d", m.device);
  p.key_uint("c", m.cid);
  const std::string& k = m.kind;
  if (k == "hello") {
    p.key_str("model", m.model);
    p.key_uint("classes", m.classes);
    p.key_uint("samples", m.samples);
    p.key_str("hash_kind", m.hash_kind);
    p.key_uint("hash_dim", m.hash_dim);
    p.str("caps");
    msgpack_pack_array(&p.packer, m.capabilities.size());
    for (const std::string& c : m.capabilities) p.str(c);
  } else if (k == "register") {
    if (m.labels.size() != m.ids.size() || m.hashes.size() != m.ids.size() * m.hash_bytes)
      throw std::invalid_argument("register: labels and hashes must match the ids");
    p.str("ids"); p.array(m.ids);
    p.str("labels"); p.array(m.labels);
    p.key_uint("hash_bytes", m.hash_bytes);
    p.str("hashes"); p.array(m.hashes);
  } else if (k == "fetch") {
    p.str("ids"); p.array(m.ids);
    p.key_str("enc", m.encoding);
  } else if (k == "update" || k == "update_fetch") {
    p.str("ids"); p.array(m.ids);
    p.key_uint("ver", m.version);
    pack_logits(p, m);
    if (k == "update_fetch") { p.str("fetch_ids"); p.array(m.fetch_ids); }
  } else if (k == "hello_ack") {
    p.key_uint("registered", m.registered);
    p.key_uint("r", m.neighbours);
  } else if (k == "register_ack") {
    p.key_uint("accepted", m.accepted);
    p.key_uint("registered", m.registered);
  } else if (k == "knowledge") {
    p.str("ids"); p.array(m.ids);
    p.str("counts"); p.array(m.counts);
    pack_logits(p, m);
    p.key_uint("applied", m.applied);
    p.key_uint("stale", m.stale);
  } else if (k == "update_ack") {
    p.key_uint("applied", m.applied);
    p.key_uint("stale", m.stale);
  } else if (k == "error") {
    p.key_str("code", m.code);
    p.key_str("msg", m.message);
    p.key_str("re", m.request);
  }
  if ((k == "fetch" || k == "update_fetch" || k == "knowledge") && m.teacher != "mean") p.key_str("teach", m.teacher);
  return std::vector<uint8_t>(p.buffer.data, p.buffer.data + p.buffer.size);
}

Message decode(const uint8_t* data, size_t size) {
  msgpack_unpacked result;
  msgpack_unpacked_init(&result);
  std::unique_ptr<msgpack_unpacked, void (*)(msgpack_unpacked*)> guard(&result, msgpack_unpacked_destroy);
  size_t offset = 0;
  const bool too_large = size > kMaxPayloadBytes;
  const bool fits = size > 0 && counts_fit(data, size);
  const msgpack_unpack_return ret =
      fits ? msgpack_unpack_next(&result, reinterpret_cast<const char*>(data), size, &offset) : MSGPACK_UNPACK_PARSE_ERROR;
  const bool parsed = ret == MSGPACK_UNPACK_SUCCESS && offset == size;
  if (!parsed && !too_large) fail("bad_encoding", "not exactly one msgpack document");
  const msgpack_object& root = result.data;
  Message m;
  bool has_cid = false;
  if (parsed && root.type == MSGPACK_OBJECT_MAP) {
    Map top{&root, "message"};
    const msgpack_object* c = top.get("c");
    if (c != nullptr && c->type == MSGPACK_OBJECT_POSITIVE_INTEGER && c->via.u64 <= kI64Max) {
      has_cid = true;
      m.cid = c->via.u64;
    }
  }
  try {
    if (too_large) fail("too_large", "payload of " + std::to_string(size) + " bytes exceeds 4194304");
    check_document(root, 0);
    if (root.type != MSGPACK_OBJECT_MAP) fail("bad_schema", "message must be a msgpack map");
    Map top{&root, "message"};
    const msgpack_object* v = top.get("v");
    if (v == nullptr || v->type != MSGPACK_OBJECT_POSITIVE_INTEGER || v->via.u64 != kVersion)
      fail("bad_version", "this side speaks version 1");
    m.kind = top.text("k");
    if (kRequestReplyKinds.count(m.kind) == 0 && kBaselineKinds.count(m.kind) == 0)
      fail("bad_schema", "unknown kind '" + m.kind + "'");
    m.device = top.text("d");
    if (!valid_device_id(m.device)) fail("bad_schema", "device id '" + m.device + "' breaks the id rule");
    m.cid = top.integer("c", kI64Max, 0, "bad_schema");
    if (kBaselineKinds.count(m.kind)) throw std::logic_error("the native device does not implement " + m.kind);
    top.where = m.kind;
    read_fields(top, m);
  } catch (ProtocolError& error) {
    error.has_cid = has_cid;
    error.cid = has_cid ? m.cid : 0;
    throw;
  }
  return m;
}

std::vector<float> as_received(const std::vector<float>& logits, uint64_t rows, uint64_t cols,
                               const std::string& encoding) {
  Message m;
  m.kind = "update";
  m.device = "x";
  m.encoding = encoding;
  m.rows = rows;
  m.cols = cols;
  m.logits = logits;
  m.ids.resize(size_t(rows));
  for (uint64_t i = 0; i < rows; ++i) m.ids[size_t(i)] = uint32_t(i);
  const std::vector<uint8_t> bytes = encode(m);
  return decode(bytes.data(), bytes.size()).logits;
}

}  // namespace fedcache::wire
