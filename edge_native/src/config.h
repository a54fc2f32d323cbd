// The native device's settings, read from the same TOML file a Python device reads (edge/config.py's
// sections and keys) plus a [native] section naming the files the harness prepared for it (program, encoder,
// shard, initial weights). Unknown sections or keys are errors, as in the Python device; keys that only
// make sense for Python (eval_backend, ...) are accepted and ignored; features the native device lacks
// (other algorithms, attacks, raw teachers) are refused with a message saying so.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace fedcache {

struct BrokerUrl {
  std::string host;
  int port = 1883;
  bool tls = false;
};

struct DeviceSettings {
  // [device]
  std::string id, broker = "mqtt://127.0.0.1:1883", state_dir = "edge-state";
  double reply_timeout_s = 30.0, delivery_timeout_s = 120.0;
  // [data]
  std::string dataset = "fashion-mnist";
  int64_t num_devices = 20, index = 0;
  // [train]
  std::string arch = "cnn", logit_encoding = "f16";
  int64_t epochs = 5, batch_size = 8, seed = 0, prefetch_batches = 4, max_outstanding = 8, eval_every_epochs = 1;
  // FedCache: knowledge exchanged in every this-many-th epoch only, from the first after the warm-up
  // (edge.knowledge.ExchangeEpochs).
  int64_t knowledge_every_epochs = 1;
  // FedCache: epochs trained with cross-entropy only before the first exchange.
  int64_t knowledge_warmup_epochs = 0;
  // FedCache: the waiting logits sent, and teachers fetched, every this many batches in one message each way.
  int64_t knowledge_every_batches = 1;
  double lr = 0.01, momentum = 0.9, weight_decay = 5e-4, kd_alpha = 1.5, temperature = 3.0;
  // [hash]
  std::string hash_kind = "bin";
  int64_t hash_dim = 256;
  // [security]
  std::string username, password_file, ca_file, cert_file, key_file;
  // [native]
  std::string program, encoder, shard, initial_weights;
  std::vector<std::string> parameter_names, buffer_names, running_stat_names;
  int64_t threads = 1;

  BrokerUrl broker_url() const;
};

// Parse TOML text (the subset config_to_toml writes: [tables], key = "string" | number | true/false |
// ["string", ...], comments); throws std::invalid_argument with the line and what is wrong.
DeviceSettings parse_settings(const std::string& toml_text);
BrokerUrl parse_broker_url(const std::string& url);

}  // namespace fedcache
