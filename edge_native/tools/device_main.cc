// fedcache-device --config device.toml: the command-line native device, a thin loop over the C API (the
// same calls an app makes). Exit status as the Python device's: 0 done, 1 failed, 2 bad usage or config,
// 3 finished but the broker did not acknowledge everything within delivery_timeout_s.
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>

#include "fedcache_native.h"

namespace {
volatile std::sig_atomic_t stop_requested = 0;
void on_signal(int) { stop_requested = 1; }

double delivery_timeout(const std::string& toml) {
  const auto at = toml.find("delivery_timeout_s");
  if (at == std::string::npos) return 120.0;
  const auto eq = toml.find('=', at);
  return eq == std::string::npos ? 120.0 : std::atof(toml.c_str() + eq + 1);
}
}  // namespace

int main(int argc, char** argv) {
  std::string path;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--config") == 0 && i + 1 < argc) path = argv[++i];
    else if (std::strcmp(argv[i], "--help") == 0) {
      std::printf("usage: fedcache-device --config device.toml\n");
      return 0;
    }
  }
  if (path.empty()) {
    std::fprintf(stderr, "usage: fedcache-device --config device.toml\n");
    return 2;
  }
  std::ifstream in(path);
  if (!in) {
    std::fprintf(stderr, "fedcache-device: cannot read %s\n", path.c_str());
    return 2;
  }
  const std::string toml((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  fc_device* device = fc_device_create();
  if (fc_device_configure(device, toml.c_str()) != FC_OK) {
    std::fprintf(stderr, "fedcache-device: %s\n", fc_device_error(device));
    fc_device_destroy(device);
    return 2;
  }
  int status = FC_RUNNING;
  while (status == FC_RUNNING && !stop_requested) status = fc_device_step(device, 8);
  if (status == FC_ERROR) std::fprintf(stderr, "fedcache-device: %s\n", fc_device_error(device));
  const int owed = fc_device_stop(device, status == FC_DONE ? delivery_timeout(toml) : 5.0);
  fc_device_destroy(device);
  if (status == FC_ERROR) return 1;
  if (owed > 0) {
    std::fprintf(stderr, "fedcache-device: %d message(s) unacknowledged by the broker at exit\n", owed);
    return 3;
  }
  return stop_requested && status != FC_DONE ? 1 : 0;
}
