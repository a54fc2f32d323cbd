// Reading and writing NumPy .npy files (version 1/2, little-endian, C order): the shard and batch files the
// harness writes are plain .npy so that the device needs no zip or pickle reader.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fedcache {

struct NpyArray {
  std::string dtype;            // "<f4", "<i8", "<u2", "|u1", ...
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;    // raw little-endian elements

  int64_t count() const;
  size_t item_size() const;
  template <typename T>
  const T* as() const { return reinterpret_cast<const T*>(data.data()); }
};

// Throws std::runtime_error naming the file and what is wrong (bad magic, Fortran order, big-endian, ...).
NpyArray read_npy(const std::string& path);
void write_npy(const std::string& path, const std::string& dtype, const std::vector<int64_t>& shape,
               const void* data, size_t nbytes);

}  // namespace fedcache
