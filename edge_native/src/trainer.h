// The FedCache training program (.train.pte) run through ExecuTorch's C++ Method API, with the SGD that
// PyTorch and ExecuTorch's training extension apply (momentum, weight decay, no dampening or Nesterov).
//
// The program's `forward` takes (images f32 N x C x H x W, labels i64 N, teacher logits f32 N x K, teacher
// mask f32 N) and returns loss, logits, gradients..., parameters... : the FedCache loss (CE + alpha T^2 KL
// over the samples with a teacher) is inside the program, so the device only feeds the teacher and mask.
// Outputs are sliced from the end (the program's index metadata counts BatchNorm buffers, see DESIGN.md).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "weights.h"

namespace fedcache {

struct SgdSettings {
  float lr = 0.01f;
  float momentum = 0.9f;
  float weight_decay = 5e-4f;
};

struct ProgramNames {
  std::vector<std::string> parameters;    // the zoo's state-dict names, in the program's order
  std::vector<std::string> buffers;       // BatchNorm buffers (running stats and counters)
  std::vector<std::string> running_stats; // the float buffers `predict` takes after the parameters
};

// Size ExecuTorch's (XNNPACK's) process-wide thread pool.
void set_runtime_threads(unsigned threads);

class TrainingProgram {
 public:
  TrainingProgram(const std::string& path, ProgramNames names, SgdSettings sgd);
  ~TrainingProgram();
  TrainingProgram(const TrainingProgram&) = delete;
  TrainingProgram& operator=(const TrainingProgram&) = delete;

  // One SGD step on a batch of n (1..max_batch); returns the loss and writes the forward pass's logits (n x K).
  float step(const float* images, const int64_t* labels, const float* teacher, const float* mask, int n,
             float* logits);
  // Eval-mode logits of the current weights (chunked to the predict method's batch bound).
  void predict(const float* images, int64_t n, float* logits);
  double accuracy(const float* images, const int64_t* labels, int64_t n);

  NamedTensors weights() const;                      // parameters and buffers (copies)
  void load_weights(const NamedTensors& tensors);    // any subset, checked by name and shape
  NamedTensors optimizer_state() const;              // momentum buffers (for resumable checkpoints)
  void load_optimizer_state(const NamedTensors& tensors);

  int max_batch() const { return max_batch_; }
  int classes() const { return classes_; }
  const std::vector<int64_t>& input_shape() const { return input_shape_; }  // C, H, W
  int64_t sample_size() const { return input_shape_[0] * input_shape_[1] * input_shape_[2]; }
  int64_t steps() const { return steps_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  ProgramNames names_;
  SgdSettings sgd_;
  int max_batch_ = 0;
  int max_eval_batch_ = 0;
  int classes_ = 0;
  std::vector<int64_t> input_shape_;
  int64_t steps_ = 0;
};

// The frozen hash encoder (.pte inference program, N x C x H x W -> N x D features).
class EncoderProgram {
 public:
  explicit EncoderProgram(const std::string& path);
  ~EncoderProgram();
  std::vector<float> features(const float* images, int64_t n, int64_t sample_size, int* dim);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int max_batch_ = 1;
  std::vector<int64_t> input_shape_;
};

}  // namespace fedcache
