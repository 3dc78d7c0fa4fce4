// safetensors reading (mmap, zero copy; single file or sharded with model.safetensors.index.json)
// and writing (atomic: temp file + fsync + rename). Header format: 8-byte little-endian length,
// JSON {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the byte buffer.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moekit {

struct SafetensorsEntry {
  std::string name;
  Tensor tensor;     // a view into the mapped file (CPU), dtype as stored
  std::string file;  // the file it came from, for error messages
};

class SafetensorsFile {
 public:
  // Maps and validates the whole header (dtypes, shapes vs byte ranges, ranges inside the file,
  // no overlaps); throws Error naming the file and the tensor.
  static SafetensorsFile open(const std::filesystem::path& path);

  const std::map<std::string, SafetensorsEntry>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::map<std::string, SafetensorsEntry> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint directory: model.safetensors, or the shards listed in
// model.safetensors.index.json. Duplicate names across shards are an error.
std::map<std::string, SafetensorsEntry> load_checkpoint_tensors(const std::filesystem::path& dir);

// One tensor's place in a file being written: its data follows the previous one's.
struct SafetensorsSlot {
  std::string name;
  DType dtype;
  Shape shape;
};

// Everything before the data of a file holding `slots` back to back in that order: the 8-byte
// little-endian length and the JSON header, padded with spaces to a multiple of 8 bytes.
std::string safetensors_header(const std::vector<SafetensorsSlot>& slots,
                               const std::map<std::string, std::string>& metadata = {});

// Writes tensors (CPU, any dtype) in name order; atomic replace of `path`.
void save_safetensors(const std::filesystem::path& path,
                      const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace moekit
