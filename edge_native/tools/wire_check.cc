// fedcache-wire-check FILE.bin...: decodes each payload with the native codec and prints one JSON line per file:
// the decoded fields (names of fedwire/messages.py) and whether encoding them again gives the file's bytes, or
// the error code a decoder must reject it with. tests/test_native_wire.py runs it over tests/vectors/.
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../src/wire.h"

using fedcache::wire::Message;

namespace {

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') { out += '\\'; out += char(c); }
    else if (c < 0x20) { char b[8]; std::snprintf(b, sizeof b, "\\u%04x", c); out += b; }
    else out += char(c);
  }
  return out + "\"";
}

template <typename T>
std::string list(const std::vector<T>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}

std::string matrix(const std::vector<float>& v, uint64_t rows, uint64_t cols) {
  std::string out = "[";
  for (uint64_t r = 0; r < rows; ++r) {
    out += r ? ", [" : "[";
    for (uint64_t c = 0; c < cols; ++c) {
      char b[32];
      std::snprintf(b, sizeof b, "%s%.9g", c ? ", " : "", double(v[r * cols + c]));
      out += b;
    }
    out += "]";
  }
  return out + "]";
}

std::string fields(const Message& m) {
  std::string o = "\"device\": " + quote(m.device) + ", \"cid\": " + std::to_string(m.cid);
  auto add = [&](const char* k, const std::string& v) { o += std::string(", \"") + k + "\": " + v; };
  auto logits = [&]() {
    add("logits", matrix(m.logits, m.rows, m.cols));
    add("logits_shape", "[" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + "]");
    add("encoding", quote(m.encoding));
  };
  const std::string& k = m.kind;
  if (k == "hello") {
    add("model", quote(m.model)); add("classes", std::to_string(m.classes)); add("samples", std::to_string(m.samples));
    add("hash_kind", quote(m.hash_kind)); add("hash_dim", std::to_string(m.hash_dim));
    std::string caps = "[";
    for (size_t i = 0; i < m.capabilities.size(); ++i) caps += (i ? ", " : "") + quote(m.capabilities[i]);
    add("capabilities", caps + "]");
  } else if (k == "hello_ack") {
    add("registered", std::to_string(m.registered)); add("neighbours", std::to_string(m.neighbours));
  } else if (k == "register") {
    add("ids", list(m.ids)); add("labels", list(m.labels));
    std::string rows = "[";
    for (size_t i = 0; i < m.ids.size(); ++i) {
      std::vector<unsigned> row(m.hashes.begin() + long(i * m.hash_bytes), m.hashes.begin() + long((i + 1) * m.hash_bytes));
      rows += (i ? ", " : "") + list(row);
    }
    add("hashes", rows + "]");
    add("hashes_shape", "[" + std::to_string(m.ids.size()) + ", " + std::to_string(m.hash_bytes) + "]");
  } else if (k == "register_ack") {
    add("accepted", std::to_string(m.accepted)); add("registered", std::to_string(m.registered));
  } else if (k == "fetch") {
    add("ids", list(m.ids)); add("encoding", quote(m.encoding)); add("teacher", quote(m.teacher));
  } else if (k == "update" || k == "update_fetch") {
    add("ids", list(m.ids)); logits(); add("version", std::to_string(m.version));
    if (k == "update_fetch") { add("fetch_ids", list(m.fetch_ids)); add("teacher", quote(m.teacher)); }
  } else if (k == "knowledge") {
    add("ids", list(m.ids)); add("counts", list(m.counts)); logits();
    add("applied", std::to_string(m.applied)); add("stale", std::to_string(m.stale)); add("teacher", quote(m.teacher));
  } else if (k == "update_ack") {
    add("applied", std::to_string(m.applied)); add("stale", std::to_string(m.stale));
  } else if (k == "error") {
    add("code", quote(m.code)); add("message", quote(m.message)); add("request", quote(m.request));
  }
  return "{" + o + "}";
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::ifstream in(argv[i], std::ios::binary);
    if (!in) { std::printf("{\"file\": %s, \"unreadable\": true}\n", quote(argv[i]).c_str()); continue; }
    std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::string line = "{\"file\": " + quote(argv[i]);
    try {
      const Message m = fedcache::wire::decode(bytes.data(), bytes.size());
      const bool same = fedcache::wire::encode(m) == bytes;
      line += ", \"kind\": " + quote(m.kind) + ", \"fields\": " + fields(m) + ", \"reencoded_equal\": " +
              (same ? "true" : "false");
    } catch (const fedcache::wire::ProtocolError& e) {
      line += ", \"error\": " + quote(e.code) + ", \"has_cid\": " + (e.has_cid ? "true" : "false");
    } catch (const std::logic_error& e) {
      line += ", \"unsupported\": " + quote(e.what());
    }
    std::printf("%s}\n", line.c_str());
  }
  return 0;
}
