// A deliberately small TOML reader: enough for device files, strict about everything it does not know.
#include "config.h"

#include <algorithm>
#include <cctype>
#include <set>
#include <sstream>
#include <stdexcept>

#include "wire.h"

namespace fedcache {

namespace {

struct Value {
  enum Type { kString, kNumber, kBool, kList } type = kString;
  std::string text;
  double number = 0;
  bool boolean = false;
  std::vector<std::string> list;
};

std::string trim(const std::string& s) {
  const auto a = s.find_first_not_of(" \t\r");
  if (a == std::string::npos) return "";
  const auto b = s.find_last_not_of(" \t\r");
  return s.substr(a, b - a + 1);
}

[[noreturn]] void bad(int line, const std::string& what) {
  throw std::invalid_argument("config line " + std::to_string(line) + ": " + what);
}

// A basic string starting at s[at] == '"'; returns the index after the closing quote.
size_t read_string(const std::string& s, size_t at, std::string& out, int line) {
  out.clear();
  for (size_t i = at + 1; i < s.size(); ++i) {
    if (s[i] == '"') return i + 1;
    if (s[i] == '\\') {
      if (++i >= s.size()) break;
      switch (s[i]) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        default: bad(line, std::string("unsupported escape \\") + s[i]);
      }
    } else {
      out += s[i];
    }
  }
  bad(line, "unterminated string");
}

std::string strip_comment(const std::string& s) {
  bool in_string = false;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && in_string) { ++i; continue; }
    if (s[i] == '"') in_string = !in_string;
    if (s[i] == '#' && !in_string) return s.substr(0, i);
  }
  return s;
}

Value parse_value(const std::string& raw, int line) {
  Value v;
  const std::string s = trim(raw);
  if (s.empty()) bad(line, "missing value");
  if (s[0] == '"') {
    const size_t end = read_string(s, 0, v.text, line);
    if (!trim(s.substr(end)).empty()) bad(line, "text after a string");
    return v;
  }
  if (s[0] == '[') {
    v.type = Value::kList;
    size_t i = 1;
    while (true) {
      while (i < s.size() && (s[i] == ' ' || s[i] == ',')) ++i;
      if (i >= s.size()) bad(line, "unterminated list");
      if (s[i] == ']') break;
      if (s[i] != '"') bad(line, "lists may hold strings only");
      std::string item;
      i = read_string(s, i, item, line);
      v.list.push_back(item);
    }
    return v;
  }
  if (s == "true" || s == "false") {
    v.type = Value::kBool;
    v.boolean = s == "true";
    return v;
  }
  v.type = Value::kNumber;
  try {
    size_t used = 0;
    v.number = std::stod(s, &used);
    if (used != s.size()) throw std::invalid_argument(s);
  } catch (const std::exception&) {
    bad(line, "not a string, number, boolean or list: " + s);
  }
  return v;
}

using Table = std::map<std::string, std::map<std::string, std::pair<Value, int>>>;

// Keys of the Python device's file the native device accepts but does not use.
const std::map<std::string, std::set<std::string>> kIgnored = {
    {"device", {}},
    {"data", {"alpha", "seed", "partition"}},
    {"train", {"backend", "eval_backend", "artifacts_dir", "max_samples", "fd_every_batches"}},
    {"hash", {"encoder", "seed"}},
    {"security", {}},
    {"attack", {"seed", "shift", "scale", "pull", "fraction", "target", "margin", "hub_copies"}},
    {"native", {}},
};

class Reader {
 public:
  explicit Reader(Table t) : table_(std::move(t)) {}
  std::string str(const std::string& section, const std::string& key, const std::string& fallback) {
    auto* v = find(section, key);
    if (v == nullptr) return fallback;
    if (v->first.type != Value::kString) bad(v->second, "[" + section + "] " + key + " must be a string");
    return v->first.text;
  }
  double num(const std::string& section, const std::string& key, double fallback) {
    auto* v = find(section, key);
    if (v == nullptr) return fallback;
    if (v->first.type != Value::kNumber) bad(v->second, "[" + section + "] " + key + " must be a number");
    return v->first.number;
  }
  int64_t integer(const std::string& section, const std::string& key, int64_t fallback) {
    const double d = num(section, key, double(fallback));
    if (d != double(int64_t(d))) bad(find(section, key)->second, "[" + section + "] " + key + " must be an integer");
    return int64_t(d);
  }
  std::vector<std::string> list(const std::string& section, const std::string& key) {
    auto* v = find(section, key);
    if (v == nullptr) return {};
    if (v->first.type != Value::kList) bad(v->second, "[" + section + "] " + key + " must be a list of strings");
    return v->first.list;
  }
  void finish() {
    for (const auto& [section, keys] : table_) {
      auto ignored = kIgnored.find(section);
      if (ignored == kIgnored.end()) throw std::invalid_argument("unknown config section [" + section + "]");
      for (const auto& [key, value] : keys)
        if (used_.count(section + "." + key) == 0 && ignored->second.count(key) == 0)
          bad(value.second, "unknown key '" + key + "' in [" + section + "]");
    }
  }

 private:
  std::pair<Value, int>* find(const std::string& section, const std::string& key) {
    used_.insert(section + "." + key);
    auto s = table_.find(section);
    if (s == table_.end()) return nullptr;
    auto k = s->second.find(key);
    return k == s->second.end() ? nullptr : &k->second;
  }
  Table table_;
  std::set<std::string> used_;
};

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

}  // namespace

BrokerUrl parse_broker_url(const std::string& url) {
  BrokerUrl out;
  std::string rest = url;
  const auto scheme_end = url.find("://");
  std::string scheme = "mqtt";
  if (scheme_end != std::string::npos) {
    scheme = url.substr(0, scheme_end);
    rest = url.substr(scheme_end + 3);
  }
  if (scheme == "mqtts" || scheme == "ssl") out.tls = true;
  else if (scheme != "mqtt" && scheme != "tcp")
    throw std::invalid_argument("unsupported broker URL scheme '" + scheme + "' in " + url);
  if (rest.find('@') != std::string::npos)
    throw std::invalid_argument("broker URL " + url + " carries credentials: give them in a file");
  while (!rest.empty() && rest.back() == '/') rest.pop_back();
  const auto colon = rest.rfind(':');
  out.port = out.tls ? 8883 : 1883;
  if (colon != std::string::npos) {
    try {
      out.port = std::stoi(rest.substr(colon + 1));
    } catch (const std::exception&) {
      throw std::invalid_argument("broker URL " + url + " has a bad port");
    }
    rest = rest.substr(0, colon);
  }
  if (rest.empty()) throw std::invalid_argument("broker URL " + url + " has no host");
  if (out.port < 1 || out.port > 65535) throw std::invalid_argument("broker URL " + url + " has a bad port");
  out.host = rest;
  return out;
}

BrokerUrl DeviceSettings::broker_url() const { return parse_broker_url(broker); }

DeviceSettings parse_settings(const std::string& text) {
  Table table;
  std::istringstream in(text);
  std::string raw, section;
  int line = 0;
  while (std::getline(in, raw)) {
    ++line;
    const std::string s = trim(strip_comment(raw));
    if (s.empty()) continue;
    if (s[0] == '[') {
      if (s.back() != ']' || s.size() < 3) bad(line, "malformed table header");
      section = trim(s.substr(1, s.size() - 2));
      if (table.count(section)) bad(line, "table [" + section + "] defined twice");
      table[section];
      continue;
    }
    const auto eq = s.find('=');
    if (eq == std::string::npos || section.empty()) bad(line, "expected key = value inside a [table]");
    const std::string key = trim(s.substr(0, eq));
    if (key.empty() || !std::all_of(key.begin(), key.end(), [](char c) { return std::isalnum(c) || c == '_'; }))
      bad(line, "bad key '" + key + "'");
    if (table[section].count(key)) bad(line, "key '" + key + "' given twice");
    table[section][key] = {parse_value(s.substr(eq + 1), line), line};
  }
  Reader r(std::move(table));
  DeviceSettings d;
  d.id = r.str("device", "id", "");
  d.broker = r.str("device", "broker", d.broker);
  d.state_dir = r.str("device", "state_dir", d.state_dir);
  d.reply_timeout_s = r.num("device", "reply_timeout_s", d.reply_timeout_s);
  d.delivery_timeout_s = r.num("device", "delivery_timeout_s", d.delivery_timeout_s);
  d.dataset = r.str("data", "dataset", d.dataset);
  d.num_devices = r.integer("data", "num_devices", d.num_devices);
  d.index = r.integer("data", "index", d.index);
  const std::string shard_from_data = r.str("data", "shard", "");
  const std::string algorithm = r.str("train", "algorithm", "fedcache");
  d.arch = r.str("train", "arch", d.arch);
  d.epochs = r.integer("train", "epochs", d.epochs);
  d.batch_size = r.integer("train", "batch_size", d.batch_size);
  d.lr = r.num("train", "lr", d.lr);
  d.momentum = r.num("train", "momentum", d.momentum);
  d.weight_decay = r.num("train", "weight_decay", d.weight_decay);
  d.kd_alpha = r.num("train", "kd_alpha", d.kd_alpha);
  d.temperature = r.num("train", "temperature", d.temperature);
  d.seed = r.integer("train", "seed", d.seed);
  d.prefetch_batches = r.integer("train", "prefetch_batches", d.prefetch_batches);
  d.max_outstanding = r.integer("train", "max_outstanding", d.max_outstanding);
  d.logit_encoding = r.str("train", "logit_encoding", d.logit_encoding);
  const std::string teacher_form = r.str("train", "teacher_form", "mean");
  d.eval_every_epochs = r.integer("train", "eval_every_epochs", d.eval_every_epochs);
  d.knowledge_every_epochs = r.integer("train", "knowledge_every_epochs", d.knowledge_every_epochs);
  d.knowledge_every_batches = r.integer("train", "knowledge_every_batches", d.knowledge_every_batches);
  d.knowledge_warmup_epochs = r.integer("train", "knowledge_warmup_epochs", d.knowledge_warmup_epochs);
  d.hash_kind = r.str("hash", "kind", d.hash_kind);
  d.hash_dim = r.integer("hash", "dim", d.hash_dim);
  d.username = r.str("security", "username", "");
  d.password_file = r.str("security", "password_file", "");
  d.ca_file = r.str("security", "ca_file", "");
  d.cert_file = r.str("security", "cert_file", "");
  d.key_file = r.str("security", "key_file", "");
  const std::string attack = r.str("attack", "mode", "");
  d.program = r.str("native", "program", "");
  d.encoder = r.str("native", "encoder", "");
  d.shard = r.str("native", "shard", "");
  d.initial_weights = r.str("native", "initial_weights", "");
  d.parameter_names = r.list("native", "parameter_names");
  d.buffer_names = r.list("native", "buffer_names");
  d.running_stat_names = r.list("native", "running_stat_names");
  d.threads = r.integer("native", "threads", d.threads);
  r.finish();

  require(!d.id.empty(), "[device] needs an id");
  require(d.id.size() <= 64 && std::isalnum(static_cast<unsigned char>(d.id[0])) &&
              std::all_of(d.id.begin(), d.id.end(), [](char c) { return std::isalnum(c) || c == '_' || c == '-'; }),
          "device id '" + d.id + "' must match [A-Za-z0-9][A-Za-z0-9_-]{0,63}");
  const BrokerUrl url = d.broker_url();
  require(d.cert_file.empty() || url.tls, "[security] cert_file needs an mqtts:// broker, not " + d.broker);
  require(d.cert_file.empty() == d.key_file.empty(), "a client certificate needs both cert_file and key_file");
  require(d.password_file.empty() || !d.username.empty(), "password_file given without a username");
  require(algorithm == "fedcache", "the native device runs train.algorithm = \"fedcache\" only, not '" + algorithm + "'");
  require(attack.empty(), "the native device has no [attack] modes");
  require(teacher_form == "mean", "the native device asks for mean teachers only (train.teacher_form = \"mean\")");
  require(wire::is_logit_encoding(d.logit_encoding), "train.logit_encoding must be f32, f16, i8 or i8b");
  require(d.hash_kind == "bin" || d.hash_kind == "f16", "hash.kind must be bin or f16");
  require(d.hash_kind != "bin" || d.hash_dim % 8 == 0, "hash.dim must be a multiple of 8 for binary hashes");
  require(d.epochs >= 1 && d.batch_size >= 1 && d.prefetch_batches >= 0 && d.max_outstanding >= 1,
          "train: epochs, batch_size, max_outstanding >= 1 and prefetch_batches >= 0 are required");
  require(d.eval_every_epochs >= 1, "train.eval_every_epochs must be >= 1");
  require(d.knowledge_every_epochs >= 1, "train.knowledge_every_epochs must be >= 1");
  require(d.knowledge_every_batches >= 1, "train.knowledge_every_batches must be >= 1");
  require(d.knowledge_warmup_epochs >= 0, "train.knowledge_warmup_epochs must be >= 0");
  require(d.index >= 0 && d.index < d.num_devices, "data.index outside [0, num_devices)");
  require(d.threads >= 1, "native.threads must be >= 1");
  if (d.shard.empty()) d.shard = shard_from_data;
  require(!d.program.empty(), "[native] program = the .train.pte to run is required");
  require(!d.encoder.empty(), "[native] encoder = the hash encoder .pte is required");
  require(!d.shard.empty(), "[native] shard = the directory of the device's .npy shard is required");
  require(!d.parameter_names.empty(), "[native] parameter_names (from the export manifest) is required");
  return d;
}

}  // namespace fedcache
