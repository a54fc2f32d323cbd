// The native device's durable state: the same SQLite schema (device.sqlite3, WAL) as the Python device's
// edge/state.py — outbox coalesced by sample, last teachers, the acknowledged-update journal, counters — so
// the harness's invariant checks read either kind of device. Checkpoints are FCW1 files beside it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct sqlite3;

namespace fedcache {

struct Rows {
  std::vector<uint32_t> ids;
  std::vector<float> logits;  // ids.size() x classes
};

class DeviceStore {
 public:
  DeviceStore(const std::string& directory, int classes);
  ~DeviceStore();
  DeviceStore(const DeviceStore&) = delete;
  DeviceStore& operator=(const DeviceStore&) = delete;

  int64_t get(const std::string& key, int64_t fallback = 0);
  void put(const std::string& key, int64_t value);

  void outbox_put(const uint32_t* ids, const float* logits, size_t n);  // newest per sample wins
  Rows outbox_take(size_t limit, uint64_t cid);                          // mark as in flight under cid
  void outbox_acknowledged(uint64_t cid, uint64_t version, const Rows& as_held);
  void outbox_release(uint64_t cid);
  int64_t outbox_size();

  void save_teachers(const Rows& teachers);
  Rows load_teachers();

 private:
  void exec(const char* sql);
  sqlite3* db_ = nullptr;
  int classes_;
  std::string path_;
};

}  // namespace fedcache
