// The device's MQTT v5 session over Paho's C client (MQTTClient, TLS-capable): persistent session
// (clean_start = false on every connect, SessionExpiryInterval 7 days), QoS 1 both ways, TCP_NODELAY on the
// socket, TLS 1.2+ with the CA/cert/key files and a username + password file as the Python device's
// [security] gives them. It never reconnects by itself: the owner calls maintain(), which retries with
// exponential back-off (1 s doubling to 30 s) and jitter, so training never blocks on the network.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "config.h"

namespace fedcache {

size_t publish_packet_bytes(const std::string& topic, size_t payload_len);

class MqttLink {
 public:
  explicit MqttLink(const DeviceSettings& settings);
  ~MqttLink();
  MqttLink(const MqttLink&) = delete;
  MqttLink& operator=(const MqttLink&) = delete;

  // Connect now if it is time to (first call, or the back-off passed); true when connected afterwards.
  bool maintain();
  bool connected() const { return connected_.load(); }
  // QoS 1 publish; false when not connected or the client refused (the caller keeps what it owes).
  bool publish(const std::string& topic, const std::vector<uint8_t>& payload);
  // Payloads that arrived on the device's down topic since the last call; waits up to wait_s for one when none
  // is there yet (woken by the arrival, not by a clock).
  std::vector<std::vector<uint8_t>> take_messages(double wait_s = 0.0);
  // QoS 1 publishes the broker has not acknowledged yet.
  int undelivered();
  void disconnect(int timeout_ms);

  double offline_seconds() const;
  int reconnects() const { return reconnects_; }
  const std::string& last_error() const { return last_error_; }
  bool nodelay_set() const { return nodelay_; }

  // Paho's callbacks (its thread): queue the payload / flip the connected flag, nothing else.
  static int on_message(void* context, char* topic, int topic_len, void* message);

 private:
  static void on_lost(void* context, char* cause);
  static void on_delivered(void* context, int token);
  void set_nodelay();

  const DeviceSettings& settings_;
  void* client_ = nullptr;
  std::string down_topic_;
  std::atomic<bool> connected_{false};
  mutable std::mutex mutex_;
  std::condition_variable arrived_;
  std::deque<std::vector<uint8_t>> inbox_;
  std::chrono::steady_clock::time_point next_attempt_{};
  double backoff_s_ = 1.0;
  std::mt19937_64 rng_;
  std::chrono::steady_clock::time_point offline_since_;
  double offline_total_s_ = 0.0;
  bool ever_connected_ = false;
  int reconnects_ = 0;
  bool nodelay_ = false;
  std::string last_error_;
};

}  // namespace fedcache
