/* fedcache-capi-check CONFIG.toml: the C API driven from plain C through libfedcache_native.so, as an app's
 * JNI or Swift glue would: misuse first (no config, bad config, small buffer), then a whole device life.
 * Prints one JSON line: what each call returned, and the final status. tests/test_native_capi.py runs it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fedcache_native.h"

static char* read_file(const char* path) {
  FILE* f = fopen(path, "rb");
  if (f == NULL) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char* text = malloc((size_t)n + 1);
  if (text == NULL || fread(text, 1, (size_t)n, f) != (size_t)n) {
    fclose(f);
    free(text);
    return NULL;
  }
  text[n] = '\0';
  fclose(f);
  return text;
}

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: fedcache-capi-check CONFIG.toml\n");
    return 2;
  }
  char* toml = read_file(argv[1]);
  if (toml == NULL) {
    fprintf(stderr, "cannot read %s\n", argv[1]);
    return 2;
  }
  fc_device* d = fc_device_create();
  char small[8];
  const int step_unconfigured = fc_device_step(d, 1);
  const int bad_config = fc_device_configure(d, "[device]\nid = 7\n");
  char bad_error[256];
  snprintf(bad_error, sizeof bad_error, "%s", fc_device_error(d));
  const int null_config = fc_device_configure(d, NULL);
  const int configured = fc_device_configure(d, toml);
  const int small_status = fc_device_status(d, small, sizeof small);
  int status = FC_RUNNING, steps = 0;
  while (status == FC_RUNNING) {
    status = fc_device_step(d, 4);
    ++steps;
  }
  static char buffer[1 << 16];
  const int status_rc = fc_device_status(d, buffer, sizeof buffer);
  const int owed = fc_device_stop(d, 60.0);
  for (char* c = bad_error; *c; ++c)
    if (*c == '"' || *c == '\\') *c = '\'';
  printf("{\"step_unconfigured\": %d, \"bad_config\": %d, \"bad_error\": \"%s\", \"null_config\": %d, "
         "\"configured\": %d, \"small_status\": %d, \"final\": %d, \"calls\": %d, \"status_rc\": %d, \"owed\": %d, "
         "\"status\": %s}\n",
         step_unconfigured, bad_config, bad_error, null_config, configured, small_status, status, steps, status_rc,
         owed, status_rc == FC_OK ? buffer : "null");
  fc_device_destroy(d);
  free(toml);
  return status == FC_DONE && owed == 0 ? 0 : 1;
}
