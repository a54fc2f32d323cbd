// One native FedCache device: the life docs/protocol.md §11 describes, driven in small steps so that an app
// (the C API) decides when it runs. hello -> register (resumable chunks) -> per batch: train on the last
// teacher held for each sample, queue the fresh logits in the durable outbox, send one update_fetch that
// uploads waiting logits and prefetches teachers for the next batches; never wait for the network.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config.h"
#include "mqtt_link.h"
#include "npy.h"
#include "store.h"
#include "trainer.h"
#include "wire.h"

namespace fedcache {

enum class DeviceState { kStarting = 0, kTraining = 1, kFlushing = 2, kDone = 3, kFailed = 4 };
const char* state_name(DeviceState state);

class NativeDevice {
 public:
  explicit NativeDevice(DeviceSettings settings);
  ~NativeDevice();
  NativeDevice(const NativeDevice&) = delete;
  NativeDevice& operator=(const NativeDevice&) = delete;

  // Run up to `max_batches` training steps with their exchanges (0: only the network); returns the state.
  DeviceState step(int max_batches);
  // The latest metrics report as JSON (what the device publishes on its metrics topic).
  std::string status_json();
  // Checkpoint, disconnect after waiting up to timeout_s for the broker's acknowledgements; returns how many
  // publishes stayed unacknowledged.
  int stop(double timeout_s);
  DeviceState state() const { return state_; }
  const std::string& error() const { return error_; }

 private:
  struct Pending {
    std::string kind;
    double sent_at = 0;
    size_t packet_bytes = 0;
    bool has_update = false;
    uint64_t version = 0;
    Rows held;  // the update's rows as the server decodes them
  };

  void load_shard();
  void build_schedule();
  void compute_hashes();
  uint64_t send(wire::Message& message);
  void pump(double wait_s);
  void handle(const wire::Message& reply);
  void expire();
  void registration_step();
  void send_register_chunk();
  void exchange();
  void checkpoint();
  void report(int epoch, bool done);
  bool epoch_ends_at(int64_t position) const;
  double now() const;
  std::vector<uint32_t> ids_between(int64_t start, int64_t stop) const;
  bool exchanges(int64_t position) const;

  DeviceSettings settings_;
  DeviceState state_ = DeviceState::kStarting;
  std::string error_;
  std::unique_ptr<TrainingProgram> program_;
  std::unique_ptr<DeviceStore> store_;
  std::unique_ptr<MqttLink> link_;
  NpyArray x_train_, y_train_, x_test_, y_test_;
  std::vector<int64_t> labels_;
  int64_t samples_ = 0;
  int classes_ = 0;
  std::vector<std::vector<uint32_t>> batches_;
  std::vector<int> epoch_of_;
  int64_t position_ = 0;
  int64_t fetched_upto_ = 0;
  // teachers: one row per sample, with a flag; received counts every teacher row that arrived
  std::vector<float> teachers_;
  std::vector<uint8_t> has_teacher_;
  int64_t teachers_received_ = 0;
  // registration
  std::vector<uint8_t> hashes_;
  size_t hash_bytes_ = 0;
  bool hello_acked_ = false, registered_ = false;
  int64_t register_next_ = 0;
  uint64_t hello_cid_ = 0, register_cid_ = 0;
  double registration_started_ = 0;
  // link bookkeeping
  std::map<uint64_t, Pending> pending_;
  uint64_t next_cid_ = 0;
  int64_t bytes_register_up_ = 0, bytes_up_ = 0, bytes_down_ = 0, wasted_bytes_ = 0;
  int64_t rejections_ = 0, dropped_replies_ = 0, offline_steps_ = 0;
  std::vector<double> latencies_s_;
  double started_ = 0, flush_deadline_ = 0, train_ms_ = 0;
  int64_t steps_this_run_ = 0;
  std::map<std::string, double> startup_s_;
  std::string last_report_;
  bool final_report_owed_ = false;  // the done report could not be published yet (offline)
};

}  // namespace fedcache
