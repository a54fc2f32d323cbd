// The device loop. All state lives on the caller's thread; Paho's thread only queues payloads (mqtt_link.cc).
#include "device.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>

#include "f16.h"
#include "sysinfo.h"

namespace fedcache {

namespace {

constexpr size_t kRegisterChunk = 2048;
constexpr double kRegistrationHeadStartS = 120.0;
constexpr double kFlushTimeoutS = 60.0;
constexpr const char* kCheckpointFile = "/checkpoint.fcw";
constexpr const char* kPositionKey = "__position";

double wall_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

void write_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    if (!out) throw std::runtime_error("cannot write " + path);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot replace " + path);
}

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char b[40];
  std::snprintf(b, sizeof b, "%.15g", v);
  return b;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') { out += '\\'; out += char(c); }
    else if (c < 0x20) { char b[8]; std::snprintf(b, sizeof b, "\\u%04x", c); out += b; }
    else out += char(c);
  }
  return out + "\"";
}

NpyArray need(const std::string& path, const std::string& dtype, size_t rank) {
  NpyArray a = read_npy(path);
  if (a.dtype != dtype || a.shape.size() != rank)
    throw std::invalid_argument(path + ": expected dtype " + dtype + " with " + std::to_string(rank) + " dimensions");
  return a;
}

}  // namespace

const char* state_name(DeviceState state) {
  switch (state) {
    case DeviceState::kStarting: return "starting";
    case DeviceState::kTraining: return "training";
    case DeviceState::kFlushing: return "flushing";
    case DeviceState::kDone: return "done";
    case DeviceState::kFailed: return "failed";
  }
  return "unknown";
}

double NativeDevice::now() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

NativeDevice::NativeDevice(DeviceSettings settings) : settings_(std::move(settings)) {
  started_ = now();
  double mark = started_;
  auto phase = [&](const char* name) {
    const double t = now();
    startup_s_[name] = std::round((t - mark) * 1000) / 1000;
    mark = t;
  };
  set_runtime_threads(unsigned(settings_.threads));
  load_shard();
  phase("shard");
  ProgramNames names{settings_.parameter_names, settings_.buffer_names, settings_.running_stat_names};
  SgdSettings sgd{float(settings_.lr), float(settings_.momentum), float(settings_.weight_decay)};
  program_ = std::make_unique<TrainingProgram>(settings_.program, names, sgd);
  classes_ = program_->classes();
  std::vector<int64_t> shape(x_train_.shape.begin() + 1, x_train_.shape.end());
  if (shape != program_->input_shape()) throw std::invalid_argument("the shard's images do not fit the program's input");
  if (settings_.batch_size > program_->max_batch())
    throw std::invalid_argument("train.batch_size exceeds the program's batch bound " +
                                std::to_string(program_->max_batch()));
  for (int64_t y : labels_)
    if (y < 0 || y >= classes_) throw std::invalid_argument("a training label is outside the program's classes");
  const std::string checkpoint_path = settings_.state_dir + kCheckpointFile;
  store_ = std::make_unique<DeviceStore>(settings_.state_dir, classes_);
  if (file_exists(checkpoint_path)) {
    NamedTensors saved = read_weights(checkpoint_path);
    auto pos = saved.find(kPositionKey);
    if (pos == saved.end() || pos->second.data.size() != 8) throw std::runtime_error(checkpoint_path + " lacks a position");
    std::memcpy(&position_, pos->second.data.data(), 8);
    saved.erase(pos);
    NamedTensors momentum;
    for (auto it = saved.begin(); it != saved.end();) {
      if (it->first.rfind("momentum.", 0) == 0) {
        momentum.insert(*it);
        it = saved.erase(it);
      } else {
        ++it;
      }
    }
    program_->load_weights(saved);
    program_->load_optimizer_state(momentum);
    std::fprintf(stderr, "fedcache-device: resuming at batch %lld from the checkpoint\n", (long long)position_);
  } else if (!settings_.initial_weights.empty()) {
    program_->load_weights(read_weights(settings_.initial_weights));
  }
  phase("model");
  teachers_.assign(size_t(samples_) * size_t(classes_), 0.0f);
  has_teacher_.assign(size_t(samples_), 0);
  const Rows saved = store_->load_teachers();
  for (size_t i = 0; i < saved.ids.size(); ++i) {
    if (saved.ids[i] >= samples_) continue;
    std::copy_n(saved.logits.begin() + long(i * size_t(classes_)), classes_,
                teachers_.begin() + long(size_t(saved.ids[i]) * size_t(classes_)));
    has_teacher_[saved.ids[i]] = 1;
  }
  build_schedule();
  if (position_ > int64_t(batches_.size())) throw std::runtime_error("the checkpoint is past this schedule's end");
  fetched_upto_ = position_;
  std::mt19937_64 rng(std::random_device{}());
  next_cid_ = rng() & ((uint64_t(1) << 48) - 1);  // a fresh start per process: replies of a past life stay unknown
  link_ = std::make_unique<MqttLink>(settings_);
  registration_started_ = now();
  phase("state");
}

NativeDevice::~NativeDevice() = default;

void NativeDevice::load_shard() {
  const std::string& dir = settings_.shard;
  x_train_ = need(dir + "/x_train.npy", "<f4", 4);
  y_train_ = need(dir + "/y_train.npy", "<i8", 1);
  x_test_ = need(dir + "/x_test.npy", "<f4", 4);
  y_test_ = need(dir + "/y_test.npy", "<i8", 1);
  if (x_train_.shape[0] != y_train_.shape[0] || x_test_.shape[0] != y_test_.shape[0])
    throw std::invalid_argument(dir + ": images and labels differ in count");
  samples_ = y_train_.shape[0];
  if (samples_ < 1) throw std::invalid_argument(dir + ": the shard has no training samples");
  labels_.assign(y_train_.as<int64_t>(), y_train_.as<int64_t>() + samples_);
}

void NativeDevice::build_schedule() {
  // One permutation per epoch from the config's seed and the device index: the same batches across restarts.
  std::mt19937_64 rng(uint64_t(settings_.seed) * 1000003u + uint64_t(settings_.index));
  std::vector<uint32_t> order(static_cast<size_t>(samples_));
  for (int64_t e = 0; e < settings_.epochs; ++e) {
    std::iota(order.begin(), order.end(), 0u);
    std::shuffle(order.begin(), order.end(), rng);
    for (int64_t start = 0; start < samples_; start += settings_.batch_size) {
      const int64_t stop = std::min<int64_t>(start + settings_.batch_size, samples_);
      batches_.emplace_back(order.begin() + start, order.begin() + stop);
      epoch_of_.push_back(int(e));
    }
  }
}

std::vector<uint32_t> NativeDevice::ids_between(int64_t start, int64_t stop) const {
  std::vector<uint32_t> ids;
  stop = std::min<int64_t>(stop, int64_t(batches_.size()));
  for (int64_t b = start; b < stop; ++b) {
    if (exchanges(b)) ids.insert(ids.end(), batches_[size_t(b)].begin(), batches_[size_t(b)].end());
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

// Whether batch `position`'s epoch exchanges knowledge: every knowledge_every_epochs-th, from the first after the
// knowledge_warmup_epochs (as edge.knowledge.ExchangeEpochs); the epochs between train on the teachers last received.
bool NativeDevice::exchanges(int64_t position) const {
  const int64_t since_warmup = epoch_of_[size_t(position)] - settings_.knowledge_warmup_epochs;
  return since_warmup >= 0 && since_warmup % settings_.knowledge_every_epochs == 0;
}

void NativeDevice::compute_hashes() {
  const double t = now();
  EncoderProgram encoder(settings_.encoder);  // loaded for registration only, then freed
  int dim = 0;
  const int64_t sample_size = x_train_.count() / samples_;
  const std::vector<float> features = encoder.features(x_train_.as<float>(), samples_, sample_size, &dim);
  if (dim != settings_.hash_dim) throw std::invalid_argument("the encoder's width differs from hash.dim");
  if (settings_.hash_kind == "bin") {
    hash_bytes_ = size_t(dim / 8);
    hashes_.assign(size_t(samples_) * hash_bytes_, 0);
    for (int64_t i = 0; i < samples_; ++i)
      for (int j = 0; j < dim; ++j)  // bit j of byte j / 8 at position j % 8, as edge/hashing.py packs them
        if (features[size_t(i * dim + j)] > 0) hashes_[size_t(i) * hash_bytes_ + size_t(j / 8)] |= uint8_t(1u << (j % 8));
  } else {
    hash_bytes_ = size_t(dim) * 2;
    hashes_.resize(size_t(samples_) * hash_bytes_);
    for (int64_t i = 0; i < samples_ * dim; ++i) {
      const uint16_t h = float_to_half(features[size_t(i)]);
      if ((h & 0x7c00u) == 0x7c00u) throw std::runtime_error("hash features overflow float16");
      hashes_[size_t(i) * 2] = uint8_t(h & 0xff);
      hashes_[size_t(i) * 2 + 1] = uint8_t(h >> 8);
    }
  }
  startup_s_["hashing"] = std::round((now() - t) * 1000) / 1000;
}

uint64_t NativeDevice::send(wire::Message& m) {
  m.device = settings_.id;
  m.cid = ++next_cid_;
  const std::vector<uint8_t> payload = wire::encode(m);
  const std::string topic = "fedcache/v1/" + settings_.id + "/up/" + m.kind;
  if (!link_->publish(topic, payload)) return 0;
  const size_t bytes = publish_packet_bytes(topic, payload.size());
  (m.kind == "hello" || m.kind == "register" ? bytes_register_up_ : bytes_up_) += int64_t(bytes);
  Pending& p = pending_[m.cid];
  p.kind = m.kind;
  p.sent_at = now();
  p.packet_bytes = bytes;
  return m.cid;
}

void NativeDevice::pump(double wait_s) {
  for (const std::vector<uint8_t>& payload : link_->take_messages(wait_s)) {
    wire::Message reply;
    try {
      reply = wire::decode(payload.data(), payload.size());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "fedcache-device: dropping an undecodable reply: %s\n", e.what());
      continue;
    }
    bytes_down_ += int64_t(publish_packet_bytes("fedcache/v1/" + settings_.id + "/down", payload.size()));
    handle(reply);
  }
}

void NativeDevice::handle(const wire::Message& r) {
  auto it = pending_.find(r.cid);
  if (it == pending_.end()) {  // a duplicate, a reply from a past life, or one we gave up on
    ++dropped_replies_;
    return;
  }
  Pending sent = std::move(it->second);
  pending_.erase(it);
  latencies_s_.push_back(now() - sent.sent_at);
  if (r.kind == "error") {
    ++rejections_;
    std::fprintf(stderr, "fedcache-device: server rejected %s: %s %s\n", sent.kind.c_str(), r.code.c_str(),
                 r.message.c_str());
    if (sent.has_update) {
      store_->outbox_release(r.cid);
      wasted_bytes_ += int64_t(sent.packet_bytes);
    }
    if (r.code == "unknown_device" || r.code == "unknown_sample") {
      hello_acked_ = registered_ = false;
      hello_cid_ = register_cid_ = 0;
    } else if (sent.kind == "hello" || sent.kind == "register") {
      state_ = DeviceState::kFailed;
      error_ = "registration refused: " + r.code + " " + r.message;
    }
    return;
  }
  if (r.kind == "hello_ack" && sent.kind == "hello") {
    hello_cid_ = 0;
    hello_acked_ = true;
    if (int64_t(r.registered) >= samples_) {
      registered_ = true;
      std::fprintf(stderr, "fedcache-device: the server already holds all %lld samples\n", (long long)samples_);
    } else {
      register_next_ = int64_t(r.registered);  // chunks go in order, one at a time: the server's count is a prefix
      send_register_chunk();
    }
  } else if (r.kind == "register_ack" && sent.kind == "register") {
    register_cid_ = 0;
    register_next_ = std::min<int64_t>(samples_, register_next_ + int64_t(kRegisterChunk));
    if (register_next_ >= samples_) {
      registered_ = true;
      std::fprintf(stderr, "fedcache-device: registered %lld samples\n", (long long)samples_);
      startup_s_["registration"] = std::round((now() - registration_started_) * 1000) / 1000;
    } else {
      send_register_chunk();
    }
  } else if (r.kind == "knowledge") {
    size_t row = 0;
    for (size_t i = 0; i < r.ids.size(); ++i) {
      if (r.counts[i] == 0) continue;
      if (r.ids[i] < samples_) {
        std::copy_n(r.logits.begin() + long(row * r.cols), classes_,
                    teachers_.begin() + long(size_t(r.ids[i]) * size_t(classes_)));
        has_teacher_[r.ids[i]] = 1;
        ++teachers_received_;
      }
      ++row;
    }
  }
  if (sent.has_update && (r.kind == "knowledge" || r.kind == "update_ack")) {
    store_->outbox_acknowledged(r.cid, sent.version, sent.held);
    if (r.stale && !sent.held.ids.empty()) wasted_bytes_ += int64_t(sent.packet_bytes * r.stale / sent.held.ids.size());
  }
}

void NativeDevice::expire() {
  const double cutoff = now() - settings_.reply_timeout_s;
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (it->second.sent_at >= cutoff) { ++it; continue; }
    if (it->second.has_update) store_->outbox_release(it->first);
    if (it->first == hello_cid_) hello_cid_ = 0;
    if (it->first == register_cid_) register_cid_ = 0;
    wasted_bytes_ += int64_t(it->second.packet_bytes);
    it = pending_.erase(it);
  }
}

void NativeDevice::send_register_chunk() {
  wire::Message m;
  m.kind = "register";
  const int64_t stop = std::min<int64_t>(samples_, register_next_ + int64_t(kRegisterChunk));
  for (int64_t i = register_next_; i < stop; ++i) {
    m.ids.push_back(uint32_t(i));
    m.labels.push_back(uint16_t(labels_[size_t(i)]));
  }
  m.hash_bytes = hash_bytes_;
  m.hashes.assign(hashes_.begin() + long(size_t(register_next_) * hash_bytes_), hashes_.begin() + long(size_t(stop) * hash_bytes_));
  register_cid_ = send(m);
}

void NativeDevice::registration_step() {
  if (registered_ || !link_->connected()) return;
  if (hashes_.empty()) compute_hashes();
  if (!hello_acked_ && hello_cid_ == 0) {
    wire::Message hello;
    hello.kind = "hello";
    hello.model = settings_.arch;
    hello.classes = uint64_t(classes_);
    hello.samples = uint64_t(samples_);
    hello.hash_kind = settings_.hash_kind;
    hello.hash_dim = uint64_t(settings_.hash_dim);
    hello.capabilities = {"update_fetch", settings_.logit_encoding};
    hello_cid_ = send(hello);
  } else if (hello_acked_ && register_cid_ == 0 && register_next_ < samples_) {
    send_register_chunk();  // the previous chunk timed out: the same chunk again (idempotent on the server)
  }
}

void NativeDevice::exchange() {
  pump(0);
  expire();
  if (!registered_) {
    registration_step();
    return;
  }
  if (!link_->connected() || int64_t(pending_.size()) >= settings_.max_outstanding) return;
  // Up to the batch before the next exchange (every knowledge_every_batches), and prefetch_batches beyond it.
  const int64_t stop = std::min<int64_t>(
      position_ + settings_.knowledge_every_batches - 1 + settings_.prefetch_batches, int64_t(batches_.size()));
  wire::Message m;
  m.fetch_ids = ids_between(std::max(fetched_upto_, position_), stop);
  m.encoding = settings_.logit_encoding;
  // Take the outbox under the cid send() will assign, so the acknowledgement drains exactly these rows.
  const uint64_t cid = next_cid_ + 1;
  Rows rows = store_->outbox_take(wire::kMaxIds, cid);
  if (!rows.ids.empty()) {
    const int64_t version = std::max<int64_t>(store_->get("version") + 1, int64_t(wall_time() * 1e6));
    store_->put("version", version);
    m.kind = "update_fetch";
    m.ids = rows.ids;
    m.version = uint64_t(version);
    m.rows = rows.ids.size();
    m.cols = uint64_t(classes_);
    m.logits = rows.logits;
    if (send(m) == 0) {
      store_->outbox_release(cid);
      return;
    }
    Pending& p = pending_[cid];
    p.has_update = true;
    p.version = uint64_t(version);
    p.held.ids = rows.ids;
    p.held.logits = wire::as_received(rows.logits, rows.ids.size(), uint64_t(classes_), settings_.logit_encoding);
  } else if (!m.fetch_ids.empty()) {
    m.kind = "fetch";
    m.ids = m.fetch_ids;
    m.fetch_ids.clear();
    if (send(m) == 0) return;
  }
  fetched_upto_ = std::max(fetched_upto_, stop);
}

bool NativeDevice::epoch_ends_at(int64_t position) const {
  return position == int64_t(batches_.size()) || epoch_of_[size_t(position)] != epoch_of_[size_t(position - 1)];
}

void NativeDevice::checkpoint() {
  NamedTensors state = program_->weights();
  for (auto& [name, t] : program_->optimizer_state()) state[name] = t;
  NamedTensor pos;
  pos.dtype = 1;
  pos.shape = {};
  pos.data.resize(8);
  std::memcpy(pos.data.data(), &position_, 8);
  state[kPositionKey] = pos;
  write_weights(settings_.state_dir + kCheckpointFile, state);
  Rows teachers;
  for (int64_t i = 0; i < samples_; ++i) {
    if (!has_teacher_[size_t(i)]) continue;
    teachers.ids.push_back(uint32_t(i));
    teachers.logits.insert(teachers.logits.end(), teachers_.begin() + long(size_t(i) * size_t(classes_)),
                           teachers_.begin() + long(size_t(i + 1) * size_t(classes_)));
  }
  store_->save_teachers(teachers);
}

void NativeDevice::report(int epoch, bool done) {
  const int64_t test_n = y_test_.shape[0];
  const double accuracy = program_->accuracy(x_test_.as<float>(), y_test_.as<int64_t>(), test_n);
  if (startup_s_.count("first_eval") == 0) startup_s_["first_eval"] = std::round((now() - started_) * 1000) / 1000;
  int64_t covered = 0;
  for (uint8_t h : has_teacher_) covered += h;
  std::vector<double> lat = latencies_s_;
  std::string p50 = "null";
  if (!lat.empty()) {
    std::nth_element(lat.begin(), lat.begin() + long(lat.size() / 2), lat.end());
    p50 = json_number(lat[lat.size() / 2] * 1000);
  }
  std::string startup = "{";
  for (const auto& [k, v] : startup_s_) startup += (startup.size() > 1 ? ", " : "") + json_string(k) + ": " + json_number(v);
  startup += "}";
  std::ostringstream o;
  o << "{\"device\": " << json_string(settings_.id) << ", \"algorithm\": \"fedcache\", \"arch\": "
    << json_string(settings_.arch) << ", \"backend\": \"native\", \"epoch\": " << epoch << ", \"step\": " << position_
    << ", \"accuracy\": " << json_number(accuracy) << ", \"time_s\": " << json_number(now() - started_)
    << ", \"wall_time\": " << json_number(wall_time()) << ", \"bytes\": {\"register_up\": " << bytes_register_up_
    << ", \"up\": " << bytes_up_ << ", \"down\": " << bytes_down_ << "}, \"offline_s\": "
    << json_number(link_->offline_seconds()) << ", \"offline_steps\": " << offline_steps_
    << ", \"teacher_coverage\": " << json_number(double(covered) / double(samples_))
    << ", \"latency_ms_p50\": " << p50 << ", \"train_samples\": " << samples_ << ", \"test_samples\": " << test_n
    << ", \"startup_s\": " << startup << ", \"done\": " << (done ? "true" : "false")
    << ", \"wasted_bytes\": " << wasted_bytes_ << ", \"outbox\": " << store_->outbox_size()
    << ", \"teachers_received\": " << teachers_received_ << ", \"rejections\": " << rejections_
    << ", \"dropped_replies\": " << dropped_replies_ << ", \"reconnects\": " << link_->reconnects()
    << ", \"tcp_nodelay\": " << (link_->nodelay_set() ? "true" : "false")
    << ", \"step_ms\": " << json_number(steps_this_run_ ? train_ms_ / double(steps_this_run_) : 0.0)
    << ", \"peak_rss_kib\": " << peak_rss_kib() << ", \"state\": " << json_string(state_name(state_)) << "}";
  last_report_ = o.str();
  write_atomic(settings_.state_dir + "/last_report.json", last_report_);  // on disk first: a lost message is no loss
  const std::vector<uint8_t> payload(last_report_.begin(), last_report_.end());
  const bool published = link_->publish("fedcache/v1/" + settings_.id + "/metrics", payload);
  final_report_owed_ = done && !published;  // stop() publishes it once the link is back
  std::fprintf(stderr, "fedcache-device: epoch %d accuracy %.4f coverage %.2f up %lld down %lld outbox %lld\n", epoch,
               accuracy, double(covered) / double(samples_), (long long)bytes_up_, (long long)bytes_down_,
               (long long)store_->outbox_size());
}

DeviceState NativeDevice::step(int max_batches) {
  if (state_ == DeviceState::kDone || state_ == DeviceState::kFailed) return state_;
  try {
    link_->maintain();
    pump(0);
    if (state_ == DeviceState::kStarting) {
      registration_step();
      if (state_ == DeviceState::kFailed) return state_;
      if (registered_ || now() - registration_started_ > kRegistrationHeadStartS) {
        if (!registered_) std::fprintf(stderr, "fedcache-device: not registered yet; training with CE until it is\n");
        state_ = DeviceState::kTraining;
        startup_s_["join"] = std::round((now() - started_) * 1000) / 1000;
        const int epoch = position_ ? epoch_of_[size_t(position_ - 1)] + 1 : 0;
        report(epoch, position_ == int64_t(batches_.size()));
        exchange();
      } else {
        pump(0.05);  // wakes on the reply
      }
      return state_;
    }
    const int64_t sample = program_->sample_size();
    std::vector<float> x, teacher, mask, logits(size_t(settings_.batch_size) * size_t(classes_));
    std::vector<int64_t> y;
    for (int b = 0; b < max_batches && state_ == DeviceState::kTraining; ++b) {
      if (position_ >= int64_t(batches_.size())) {
        state_ = DeviceState::kFlushing;
        flush_deadline_ = now() + kFlushTimeoutS;
        break;
      }
      const std::vector<uint32_t>& batch = batches_[size_t(position_)];
      const int n = int(batch.size());
      x.resize(size_t(n) * size_t(sample));
      teacher.assign(size_t(n) * size_t(classes_), 0.0f);
      mask.assign(size_t(n), 0.0f);
      y.resize(size_t(n));
      for (int i = 0; i < n; ++i) {
        const uint32_t id = batch[size_t(i)];
        std::copy_n(x_train_.as<float>() + int64_t(id) * sample, sample, x.begin() + long(i) * sample);
        y[size_t(i)] = labels_[id];
        if (has_teacher_[id]) {
          std::copy_n(teachers_.begin() + long(size_t(id) * size_t(classes_)), classes_,
                      teacher.begin() + long(i) * classes_);
          mask[size_t(i)] = 1.0f;
        }
      }
      const double t = now();
      program_->step(x.data(), y.data(), teacher.data(), mask.data(), n, logits.data());
      train_ms_ += (now() - t) * 1000;
      ++steps_this_run_;
      ++position_;
      offline_steps_ += !link_->connected();
      if (exchanges(position_ - 1)) store_->outbox_put(batch.data(), logits.data(), size_t(n));
      // Every knowledge_every_batches batches the waiting logits go out in one message (as edge.fedcache_client).
      if (position_ % settings_.knowledge_every_batches == 0 || position_ == int64_t(batches_.size())) exchange();
      if (position_ % 200 == 0) checkpoint();
      if (epoch_ends_at(position_)) {
        const int epoch = epoch_of_[size_t(position_ - 1)] + 1;
        const bool last = position_ == int64_t(batches_.size());
        checkpoint();
        if (epoch % settings_.eval_every_epochs == 0 && !last) report(epoch, false);
        if (last) {
          state_ = DeviceState::kFlushing;
          flush_deadline_ = now() + kFlushTimeoutS;
        }
      }
    }
    if (state_ == DeviceState::kFlushing) {
      exchange();
      bool owed = store_->outbox_size() > 0;
      for (const auto& [cid, p] : pending_) owed = owed || p.has_update;
      if (!owed || now() > flush_deadline_) {
        if (owed)
          std::fprintf(stderr, "fedcache-device: %lld updates still unacknowledged; they stay in the outbox\n",
                       (long long)store_->outbox_size());
        checkpoint();
        state_ = DeviceState::kDone;
        report(epoch_of_.back() + 1, true);
      } else {
        pump(std::min(0.2, std::max(0.0, flush_deadline_ - now())));  // wakes on the reply
      }
    }
  } catch (const std::exception& e) {
    state_ = DeviceState::kFailed;
    error_ = e.what();
  }
  return state_;
}

std::string NativeDevice::status_json() {
  std::string base = last_report_.empty() ? "{}" : last_report_;
  return "{\"state\": " + json_string(state_name(state_)) + ", \"position\": " + std::to_string(position_) +
         ", \"batches\": " + std::to_string(batches_.size()) + ", \"connected\": " +
         (link_->connected() ? "true" : "false") + ", \"registered\": " + (registered_ ? "true" : "false") +
         ", \"error\": " + json_string(error_) + ", \"last_report\": " + base + "}";
}

int NativeDevice::stop(double timeout_s) {
  if (state_ != DeviceState::kDone) {
    try {
      checkpoint();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "fedcache-device: checkpoint at stop failed: %s\n", e.what());
    }
  }
  const double deadline = now() + timeout_s;
  int owed = link_->undelivered() + int(final_report_owed_);
  while (owed > 0 && now() < deadline) {
    link_->maintain();  // paho resends unacknowledged QoS 1 publishes after a reconnect
    if (final_report_owed_ && link_->connected()) {
      const std::vector<uint8_t> payload(last_report_.begin(), last_report_.end());
      final_report_owed_ = !link_->publish("fedcache/v1/" + settings_.id + "/metrics", payload);
    }
    pump(0.05);
    owed = link_->undelivered() + int(final_report_owed_);
  }
  link_->disconnect(1000);
  return owed;
}

}  // namespace fedcache
