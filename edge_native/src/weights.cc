// FCW1 reading and writing; every length is checked against the bytes left, so a torn file is an error.
#include "weights.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace fedcache {

namespace {

template <typename T>
void put(std::vector<uint8_t>& out, T value) {
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  out.insert(out.end(), p, p + sizeof(T));
}

struct Reader {
  const uint8_t* data;
  size_t size;
  size_t at = 0;
  std::string what;
  template <typename T>
  T get() {
    need(sizeof(T));
    T value;
    std::memcpy(&value, data + at, sizeof(T));
    at += sizeof(T);
    return value;
  }
  void need(size_t n) const {
    if (size - at < n) throw std::runtime_error(what + ": truncated weights file");
  }
};

}  // namespace

std::vector<uint8_t> encode_weights(const NamedTensors& tensors) {
  std::vector<uint8_t> out{'F', 'C', 'W', '1'};
  put<uint32_t>(out, uint32_t(tensors.size()));
  for (const auto& [name, t] : tensors) {
    put<uint16_t>(out, uint16_t(name.size()));
    out.insert(out.end(), name.begin(), name.end());
    put<uint8_t>(out, t.dtype);
    put<uint8_t>(out, uint8_t(t.shape.size()));
    for (int64_t d : t.shape) put<int64_t>(out, d);
    out.insert(out.end(), t.data.begin(), t.data.end());
  }
  return out;
}

NamedTensors decode_weights(const uint8_t* data, size_t size, const std::string& what) {
  Reader r{data, size, 0, what};
  r.need(4);
  if (std::memcmp(data, "FCW1", 4) != 0) throw std::runtime_error(what + ": not an FCW1 weights file");
  r.at = 4;
  const uint32_t count = r.get<uint32_t>();
  NamedTensors tensors;
  for (uint32_t i = 0; i < count; ++i) {
    const uint16_t len = r.get<uint16_t>();
    r.need(len);
    std::string name(reinterpret_cast<const char*>(data + r.at), len);
    r.at += len;
    NamedTensor t;
    t.dtype = r.get<uint8_t>();
    if (t.dtype > 1) throw std::runtime_error(what + ": " + name + " has an unknown dtype");
    const uint8_t rank = r.get<uint8_t>();
    int64_t n = 1;
    for (uint8_t k = 0; k < rank; ++k) {
      const int64_t d = r.get<int64_t>();
      if (d < 0 || d > (int64_t(1) << 32)) throw std::runtime_error(what + ": " + name + " has a bad shape");
      t.shape.push_back(d);
      n *= d;
    }
    const size_t nbytes = size_t(n) * (t.dtype == 0 ? 4 : 8);
    r.need(nbytes);
    t.data.assign(data + r.at, data + r.at + nbytes);
    r.at += nbytes;
    tensors.emplace(std::move(name), std::move(t));
  }
  if (r.at != size) throw std::runtime_error(what + ": trailing bytes after the weights");
  return tensors;
}

NamedTensors read_weights(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return decode_weights(bytes.data(), bytes.size(), path);
}

void write_weights(const std::string& path, const NamedTensors& tensors) {
  const std::vector<uint8_t> bytes = encode_weights(tensors);
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw std::runtime_error(path + ": cannot write");
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) {
      ::close(fd);
      throw std::runtime_error(path + ": write failed");
    }
    done += size_t(n);
  }
  ::fsync(fd);
  ::close(fd);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error(path + ": rename failed");
}

}  // namespace fedcache
