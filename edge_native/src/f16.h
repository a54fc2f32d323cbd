// IEEE binary16 <-> binary32 with round-to-nearest-even (docs/protocol.md §6 f16 logits and §7 f16 hashes).
#pragma once

#include <cstdint>

namespace fedcache {

uint16_t float_to_half(float value);
float half_to_float(uint16_t half);

}  // namespace fedcache
