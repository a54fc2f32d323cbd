// Named tensors in one file (FCW1): initial weights the harness writes, and the device's checkpoints.
//
// Layout, little-endian: "FCW1", u32 count, then per tensor: u16 name length, name (UTF-8), u8 dtype
// (0 = float32, 1 = int64), u8 rank, rank x i64 dims, the elements. One file, replaced atomically, so a
// checkpoint is either the old one or the new one after a crash.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace fedcache {

struct NamedTensor {
  uint8_t dtype = 0;  // 0 float32, 1 int64
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
};

using NamedTensors = std::map<std::string, NamedTensor>;

NamedTensors read_weights(const std::string& path);
void write_weights(const std::string& path, const NamedTensors& tensors);  // atomic (write, fsync, rename)
std::vector<uint8_t> encode_weights(const NamedTensors& tensors);
NamedTensors decode_weights(const uint8_t* data, size_t size, const std::string& what);

}  // namespace fedcache
