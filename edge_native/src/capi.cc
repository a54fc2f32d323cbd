// The C API over NativeDevice: every C++ exception becomes a status and a message, never an abort.
#include "fedcache_native.h"

#include <cstring>
#include <memory>
#include <string>

#include "device.h"

struct fc_device {
  std::unique_ptr<fedcache::NativeDevice> device;
  std::string error;
};

extern "C" {

fc_device* fc_device_create(void) { return new (std::nothrow) fc_device(); }

int fc_device_configure(fc_device* d, const char* toml_text) {
  if (d == nullptr) return FC_ERROR;
  if (toml_text == nullptr) {
    d->error = "no configuration text";
    return FC_ERROR;
  }
  try {
    d->device.reset();
    d->device = std::make_unique<fedcache::NativeDevice>(fedcache::parse_settings(toml_text));
    d->error.clear();
    return FC_OK;
  } catch (const std::exception& e) {
    d->error = e.what();
    return FC_ERROR;
  }
}

int fc_device_step(fc_device* d, int max_batches) {
  if (d == nullptr) return FC_ERROR;
  if (!d->device) {
    d->error = "fc_device_configure has not succeeded";
    return FC_NOT_CONFIGURED;
  }
  const fedcache::DeviceState state = d->device->step(max_batches < 0 ? 0 : max_batches);
  if (state == fedcache::DeviceState::kFailed) {
    d->error = d->device->error();
    return FC_ERROR;
  }
  return state == fedcache::DeviceState::kDone ? FC_DONE : FC_RUNNING;
}

int fc_device_status(fc_device* d, char* buffer, size_t size) {
  if (d == nullptr || buffer == nullptr) return FC_ERROR;
  if (!d->device) return FC_NOT_CONFIGURED;
  try {
    const std::string json = d->device->status_json();
    if (json.size() + 1 > size) return FC_BUFFER_TOO_SMALL;
    std::memcpy(buffer, json.c_str(), json.size() + 1);
    return FC_OK;
  } catch (const std::exception& e) {
    d->error = e.what();
    return FC_ERROR;
  }
}

int fc_device_stop(fc_device* d, double timeout_s) {
  if (d == nullptr) return FC_ERROR;
  if (!d->device) return FC_NOT_CONFIGURED;
  try {
    return d->device->stop(timeout_s);
  } catch (const std::exception& e) {
    d->error = e.what();
    return FC_ERROR;
  }
}

const char* fc_device_error(const fc_device* d) { return d == nullptr ? "no device" : d->error.c_str(); }

void fc_device_destroy(fc_device* d) { delete d; }

}  // extern "C"
