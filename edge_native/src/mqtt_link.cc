// Paho's synchronous client with callbacks: its thread only queues payloads and flips flags; the device's
// thread does everything else, so no state of the device is touched from two threads.
#include "mqtt_link.h"

#include <MQTTClient.h>
#include <dirent.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>

namespace fedcache {

namespace {

constexpr int kSessionExpiryS = 604800;
constexpr int kKeepAliveS = 15;
constexpr double kBackoffMinS = 1.0;
constexpr double kBackoffMaxS = 30.0;

size_t varint_len(size_t v) {
  size_t n = 1;
  while (v >= 128) { v /= 128; ++n; }
  return n;
}

std::string read_secret(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read the password file " + path);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}

int arrived(void* context, char* topic, int topic_len, MQTTClient_message* message) {
  return MqttLink::on_message(context, topic, topic_len, message);
}

// Paho returns negative client errors in an MQTTReasonCodes enum field; read the bits as an int (loading an
// out-of-range enum value is undefined behaviour, and UBSan says so).
int reason_of(const MQTTResponse& response) {
  int rc = 0;
  static_assert(sizeof(response.reasonCode) == sizeof(int), "MQTTReasonCodes is int-sized");
  std::memcpy(&rc, &response.reasonCode, sizeof rc);
  return rc;
}

}  // namespace

size_t publish_packet_bytes(const std::string& topic, size_t payload_len) {
  const size_t remaining = 2 + topic.size() + 2 + 1 + payload_len;  // topic, packet id, empty properties
  return 1 + varint_len(remaining) + remaining;
}

MqttLink::MqttLink(const DeviceSettings& settings)
    : settings_(settings), rng_(std::random_device{}()), offline_since_(std::chrono::steady_clock::now()) {
  const BrokerUrl url = settings.broker_url();
  const std::string uri = std::string(url.tls ? "ssl://" : "tcp://") + url.host + ":" + std::to_string(url.port);
  const std::string client_id = "fedcache-device-" + settings.id;
  down_topic_ = "fedcache/v1/" + settings.id + "/down";
  MQTTClient_createOptions options = MQTTClient_createOptions_initializer;
  options.MQTTVersion = MQTTVERSION_5;
  MQTTClient client = nullptr;
  const int rc = MQTTClient_createWithOptions(&client, uri.c_str(), client_id.c_str(), MQTTCLIENT_PERSISTENCE_NONE,
                                              nullptr, &options);
  if (rc != MQTTCLIENT_SUCCESS) throw std::runtime_error("cannot create an MQTT client for " + uri);
  client_ = client;
  MQTTClient_setCallbacks(client, this, &MqttLink::on_lost, &arrived, &MqttLink::on_delivered);
}

MqttLink::~MqttLink() {
  MQTTClient client = client_;
  if (connected_) MQTTClient_disconnect5(client, 0, MQTTREASONCODE_NORMAL_DISCONNECTION, nullptr);
  MQTTClient_destroy(&client);
}

void MqttLink::on_lost(void* context, char* cause) {
  auto* self = static_cast<MqttLink*>(context);
  {
    std::lock_guard<std::mutex> lock(self->mutex_);
    self->offline_since_ = std::chrono::steady_clock::now();
  }
  self->connected_ = false;
  self->arrived_.notify_one();
}

int MqttLink::on_message(void* context, char* topic, int topic_len, void* raw) {
  auto* self = static_cast<MqttLink*>(context);
  auto* message = static_cast<MQTTClient_message*>(raw);
  const auto* bytes = static_cast<const uint8_t*>(message->payload);
  {
    std::lock_guard<std::mutex> lock(self->mutex_);
    self->inbox_.emplace_back(bytes, bytes + message->payloadlen);
  }
  self->arrived_.notify_one();
  MQTTClient_freeMessage(&message);
  MQTTClient_free(topic);
  return 1;
}

void MqttLink::on_delivered(void* context, int token) {}

void MqttLink::set_nodelay() {
  // Paho opens the socket itself; set TCP_NODELAY on this process's TCP sockets after each connect (a device
  // process has no other), since Nagle plus delayed ACKs turned a 0.4 ms request/reply into 88 ms.
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return;
  while (dirent* entry = readdir(dir)) {
    const int fd = std::atoi(entry->d_name);
    int type = 0;
    socklen_t len = sizeof type;
    if (fd <= 2 || getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) continue;
    const int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == 0) nodelay_ = true;
  }
  closedir(dir);
}

bool MqttLink::maintain() {
  if (connected_) return true;
  const auto now = std::chrono::steady_clock::now();
  if (now < next_attempt_) return false;
  MQTTClient client = client_;
  MQTTClient_connectOptions options = MQTTClient_connectOptions_initializer5;
  options.keepAliveInterval = kKeepAliveS;
  options.cleanstart = 0;  // the persistent session keeps replies while the device is away
  options.connectTimeout = 5;
  std::string password;
  if (!settings_.username.empty()) options.username = settings_.username.c_str();
  if (!settings_.password_file.empty()) {
    password = read_secret(settings_.password_file);
    options.password = password.c_str();
  }
  MQTTClient_SSLOptions ssl = MQTTClient_SSLOptions_initializer;
  if (settings_.broker_url().tls) {
    ssl.enableServerCertAuth = 1;
    ssl.verify = 1;  // the broker's name must match its certificate
    ssl.sslVersion = MQTT_SSL_VERSION_TLS_1_2;
    if (!settings_.ca_file.empty()) ssl.trustStore = settings_.ca_file.c_str();
    if (!settings_.cert_file.empty()) {
      ssl.keyStore = settings_.cert_file.c_str();
      ssl.privateKey = settings_.key_file.c_str();
    }
    options.ssl = &ssl;
  }
  MQTTProperties properties = MQTTProperties_initializer;
  MQTTProperty expiry;
  expiry.identifier = MQTTPROPERTY_CODE_SESSION_EXPIRY_INTERVAL;
  expiry.value.integer4 = kSessionExpiryS;
  MQTTProperties_add(&properties, &expiry);
  MQTTResponse response = MQTTClient_connect5(client, &options, &properties, nullptr);
  MQTTProperties_free(&properties);
  const int rc = reason_of(response);
  MQTTResponse_free(response);
  if (rc == MQTTCLIENT_SUCCESS) {
    MQTTResponse sub = MQTTClient_subscribe5(client, down_topic_.c_str(), 1, nullptr, nullptr);
    const int granted = reason_of(sub);
    MQTTResponse_free(sub);
    if (granted == 1 || granted == 0) {
      set_nodelay();
      connected_ = true;
      if (ever_connected_) ++reconnects_;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        offline_total_s_ += std::chrono::duration<double>(now - offline_since_).count();
      }
      ever_connected_ = true;
      backoff_s_ = kBackoffMinS;
      last_error_.clear();
      return true;
    }
    last_error_ = "subscription to " + down_topic_ + " refused (reason " + std::to_string(granted) + ")";
    MQTTClient_disconnect5(client, 0, MQTTREASONCODE_NORMAL_DISCONNECTION, nullptr);
  } else {
    last_error_ = "connect to " + settings_.broker + " failed (" + std::to_string(rc) + ")";
  }
  // Exponential back-off with jitter (a uniform draw in [backoff/2, backoff]) so devices do not reconnect
  // in lock-step after a broker restart.
  std::uniform_real_distribution<double> jitter(0.5, 1.0);
  const double delay = backoff_s_ * jitter(rng_);
  next_attempt_ = now + std::chrono::microseconds(int64_t(delay * 1e6));
  backoff_s_ = std::min(backoff_s_ * 2, kBackoffMaxS);
  return false;
}

bool MqttLink::publish(const std::string& topic, const std::vector<uint8_t>& payload) {
  if (!connected_) return false;
  MQTTClient_message message = MQTTClient_message_initializer;
  message.payload = const_cast<uint8_t*>(payload.data());
  message.payloadlen = int(payload.size());
  message.qos = 1;
  message.retained = 0;
  MQTTClient_deliveryToken token = 0;
  MQTTResponse response = MQTTClient_publishMessage5(client_, topic.c_str(), &message, &token);
  const int rc = reason_of(response);
  MQTTResponse_free(response);
  return rc == MQTTCLIENT_SUCCESS;
}

std::vector<std::vector<uint8_t>> MqttLink::take_messages(double wait_s) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (inbox_.empty() && wait_s > 0)
    arrived_.wait_for(lock, std::chrono::microseconds(int64_t(wait_s * 1e6)), [this] { return !inbox_.empty(); });
  std::vector<std::vector<uint8_t>> out(std::make_move_iterator(inbox_.begin()), std::make_move_iterator(inbox_.end()));
  inbox_.clear();
  return out;
}

int MqttLink::undelivered() {
  MQTTClient_deliveryToken* tokens = nullptr;
  if (MQTTClient_getPendingDeliveryTokens(client_, &tokens) != MQTTCLIENT_SUCCESS || tokens == nullptr) return 0;
  int n = 0;
  while (tokens[n] != -1) ++n;
  MQTTClient_free(tokens);
  return n;
}

void MqttLink::disconnect(int timeout_ms) {
  if (connected_) MQTTClient_disconnect5(client_, timeout_ms, MQTTREASONCODE_NORMAL_DISCONNECTION, nullptr);
  connected_ = false;
}

double MqttLink::offline_seconds() const {
  std::lock_guard<std::mutex> lock(mutex_);
  double total = offline_total_s_;
  if (!connected_) total += std::chrono::duration<double>(std::chrono::steady_clock::now() - offline_since_).count();
  return total;
}

}  // namespace fedcache
