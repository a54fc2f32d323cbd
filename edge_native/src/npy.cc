// .npy parsing: only the header's three keys matter (descr, fortran_order, shape); everything else is refused.
#include "npy.h"

#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace fedcache {

int64_t NpyArray::count() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t NpyArray::item_size() const { return dtype.size() >= 3 ? std::stoul(dtype.substr(2)) : 0; }

namespace {

std::string header_value(const std::string& header, const std::string& key, const std::string& path) {
  auto at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error(path + ": .npy header lacks '" + key + "'");
  at = header.find(':', at);
  if (at == std::string::npos) throw std::runtime_error(path + ": malformed .npy header");
  ++at;
  while (at < header.size() && header[at] == ' ') ++at;
  size_t end = at;
  if (header[at] == '\'') {
    end = header.find('\'', at + 1);
    return header.substr(at + 1, end - at - 1);
  }
  if (header[at] == '(') {
    end = header.find(')', at);
    return header.substr(at, end - at + 1);
  }
  end = header.find_first_of(",}", at);
  return header.substr(at, end - at);
}

}  // namespace

NpyArray read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + ": not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint8_t b[2];
    in.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    uint8_t b[4];
    in.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  }
  if (!in || header_len > (1u << 20)) throw std::runtime_error(path + ": bad .npy header length");
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  NpyArray array;
  array.dtype = header_value(header, "descr", path);
  if (header_value(header, "fortran_order", path) != "False")
    throw std::runtime_error(path + ": Fortran-order arrays are not supported");
  if (array.dtype.size() < 3 || (array.dtype[0] != '<' && array.dtype[0] != '|'))
    throw std::runtime_error(path + ": only little-endian dtypes are supported, got " + array.dtype);
  std::string shape = header_value(header, "shape", path);
  std::stringstream dims(shape.substr(1, shape.size() - 2));
  std::string dim;
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_not_of(' ') == std::string::npos) continue;
    array.shape.push_back(std::stoll(dim));
  }
  const size_t nbytes = size_t(array.count()) * array.item_size();
  array.data.resize(nbytes);
  in.read(reinterpret_cast<char*>(array.data.data()), std::streamsize(nbytes));
  if (size_t(in.gcount()) != nbytes) throw std::runtime_error(path + ": truncated .npy data");
  return array;
}

void write_npy(const std::string& path, const std::string& dtype, const std::vector<int64_t>& shape,
               const void* data, size_t nbytes) {
  std::string dims;
  for (int64_t d : shape) dims += std::to_string(d) + ",";
  if (shape.size() > 1) dims.pop_back();
  std::string header = "{'descr': '" + dtype + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error(path + ": cannot write");
    out.write("\x93NUMPY\x01\x00", 8);
    const uint16_t len = uint16_t(header.size());
    const char lb[2] = {char(len & 0xff), char(len >> 8)};
    out.write(lb, 2);
    out << header;
    out.write(static_cast<const char*>(data), std::streamsize(nbytes));
    if (!out) throw std::runtime_error(path + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error(path + ": rename failed");
}

}  // namespace fedcache
