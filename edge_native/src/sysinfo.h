// What the process costs: peak resident set (VmHWM), read from /proc on Linux (0 elsewhere).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace fedcache {

inline long peak_rss_kib() {
  FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return 0;
  char line[256];
  long kib = 0;
  while (std::fgets(line, sizeof line, f) != nullptr)
    if (std::strncmp(line, "VmHWM:", 6) == 0) kib = std::atol(line + 6);
  std::fclose(f);
  return kib;
}

}  // namespace fedcache
