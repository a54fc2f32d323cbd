/* The native FedCache device's C API: the surface an Android app (through JNI) or an iOS app (through Swift)
 * calls. One opaque handle per device; every call is made from one thread (the app's training thread); no
 * call blocks on the network for longer than its own arguments allow. Errors never abort: a function returns
 * a negative status and fc_device_error() says why.
 *
 *   fc_device* d = fc_device_create();
 *   if (fc_device_configure(d, toml_text) != FC_OK) { puts(fc_device_error(d)); }
 *   while (fc_device_step(d, 16) == FC_RUNNING) { ... fc_device_status(d, buf, sizeof buf) ... }
 *   int owed = fc_device_stop(d, 120.0);   // waits for the broker's acknowledgements, then disconnects
 *   fc_device_destroy(d);
 */
#ifndef FEDCACHE_NATIVE_H
#define FEDCACHE_NATIVE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fc_device fc_device;

enum {
  FC_OK = 0,
  FC_RUNNING = 1,        /* step: more to do */
  FC_DONE = 2,           /* step: trained every epoch, the server acknowledged the outbox, final report sent */
  FC_ERROR = -1,         /* see fc_device_error() */
  FC_NOT_CONFIGURED = -2,
  FC_BUFFER_TOO_SMALL = -3
};

fc_device* fc_device_create(void);
/* Configure from the device's TOML text (the same file a Python device reads, plus its [native] section).
 * Loads the training program, the shard and the durable state; connects lazily in fc_device_step. */
int fc_device_configure(fc_device* device, const char* toml_text);
/* Run up to max_batches training steps and the exchanges between them: FC_RUNNING, FC_DONE or FC_ERROR. */
int fc_device_step(fc_device* device, int max_batches);
/* The device's state and last report as JSON into buffer (NUL-terminated); FC_BUFFER_TOO_SMALL if it does not fit. */
int fc_device_status(fc_device* device, char* buffer, size_t size);
/* Checkpoint and disconnect once the broker acknowledged what the device published (at most timeout_s):
 * returns how many publishes stayed unacknowledged (>= 0), or a negative status. */
int fc_device_stop(fc_device* device, double timeout_s);
/* The last error's text ("" when none); valid until the next call on this device. */
const char* fc_device_error(const fc_device* device);
void fc_device_destroy(fc_device* device);

#ifdef __cplusplus
}
#endif

#endif /* FEDCACHE_NATIVE_H */
