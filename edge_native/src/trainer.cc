// ExecuTorch glue: two Module instances of one program (training and predict keep separate planned memory),
// parameters exposed by one zero-batch forward call (they are aliases into the method's memory), SGD in place.
#include "trainer.h"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <cmath>
#include <cstring>
#include <stdexcept>

namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace fedcache {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Method;

namespace {

constexpr const char* kTrainMethod = "forward";
constexpr const char* kPredictMethod = "predict";
constexpr const char* kModelPrefix = "model.";

std::string error_text(Error e) { return "ExecuTorch error " + std::to_string(int(e)); }

std::vector<executorch::aten::SizesType> sizes32(const std::vector<int64_t>& v) {
  return std::vector<executorch::aten::SizesType>(v.begin(), v.end());
}

size_t element_size(ScalarType t) { return t == ScalarType::Long ? 8 : 4; }

}  // namespace

void set_runtime_threads(unsigned threads) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool != nullptr && pool->get_thread_count() != threads) pool->_unsafe_reset_threadpool(threads);
}

struct TrainingProgram::Impl {
  std::unique_ptr<Module> train;
  std::unique_ptr<Module> eval;
  Method* train_method = nullptr;
  std::vector<Tensor> parameters;   // aliases into the training method's memory
  std::vector<Tensor> buffers;      // mutable buffers, by ProgramNames::buffers order
  std::vector<std::vector<float>> momentum;
  bool momentum_started = false;
};

static std::vector<EValue> run(Module& module, const char* method, const std::vector<EValue>& inputs) {
  auto result = module.execute(method, inputs);
  if (!result.ok()) throw std::runtime_error(std::string(method) + " failed: " + error_text(result.error()));
  return std::move(result.get());
}

TrainingProgram::TrainingProgram(const std::string& path, ProgramNames names, SgdSettings sgd)
    : impl_(std::make_unique<Impl>()), names_(std::move(names)), sgd_(sgd) {
  impl_->train = std::make_unique<Module>(path, Module::LoadMode::File);
  impl_->eval = std::make_unique<Module>(path, Module::LoadMode::File);
  for (Module* m : {impl_->train.get(), impl_->eval.get()}) {
    const Error e = m->load();
    if (e != Error::Ok) throw std::runtime_error(path + ": cannot load the program (" + error_text(e) + ")");
  }
  if (impl_->train->load_method(kTrainMethod) != Error::Ok)
    throw std::runtime_error(path + ": no loadable '" + kTrainMethod + "' method (missing operator or backend?)");
  if (impl_->eval->load_method(kPredictMethod) != Error::Ok)
    throw std::runtime_error(path + ": no loadable '" + kPredictMethod + "' method");
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  auto method = impl_->train->method(kTrainMethod);
#pragma GCC diagnostic pop
  if (!method.ok()) throw std::runtime_error(path + ": cannot reach the training method");
  impl_->train_method = method.get();
  auto meta = impl_->train->method_meta(kTrainMethod);
  if (!meta.ok() || meta->num_inputs() != 4)
    throw std::runtime_error(path + ": not a FedCache training program (forward needs 4 inputs)");
  auto images = meta->input_tensor_meta(0);
  auto teacher = meta->input_tensor_meta(2);
  if (!images.ok() || !teacher.ok() || images->sizes().size() != 4)
    throw std::runtime_error(path + ": unexpected input layout");
  max_batch_ = images->sizes()[0];
  for (size_t i = 1; i < 4; ++i) input_shape_.push_back(images->sizes()[i]);
  classes_ = teacher->sizes()[1];
  auto pmeta = impl_->eval->method_meta(kPredictMethod);
  if (!pmeta.ok()) throw std::runtime_error(path + ": no predict method metadata");
  max_eval_batch_ = pmeta->input_tensor_meta(0)->sizes()[0];
  const size_t k = names_.parameters.size();
  if (k == 0 || meta->num_outputs() < 2 + 2 * k)
    throw std::runtime_error(path + ": the program returns fewer outputs than 2 + 2 x " + std::to_string(k));
  if (pmeta->num_inputs() != 1 + k + names_.running_stats.size())
    throw std::runtime_error(path + ": predict's inputs do not match the parameter and running-stat names");

  for (const std::string& name : names_.buffers) {
    auto t = impl_->train_method->get_attribute(std::string(kModelPrefix) + name);
    if (!t.ok()) throw std::runtime_error(path + ": the program has no buffer '" + name + "'");
    impl_->buffers.push_back(t.get());
  }
  NamedTensors baked;
  for (size_t i = 0; i < impl_->buffers.size(); ++i) {
    const Tensor& t = impl_->buffers[i];
    NamedTensor copy;
    copy.dtype = t.scalar_type() == ScalarType::Long ? 1 : 0;
    copy.data.assign(t.const_data_ptr<uint8_t>(), t.const_data_ptr<uint8_t>() + t.nbytes());
    for (auto d : t.sizes()) copy.shape.push_back(d);
    baked[names_.buffers[i]] = std::move(copy);
  }
  // Expose the parameters: a zero batch of 2 returns them (aliases) as the last k outputs.
  const int n = std::min(2, max_batch_);
  std::vector<int64_t> xshape{n, input_shape_[0], input_shape_[1], input_shape_[2]};
  std::vector<float> x(size_t(n * sample_size()), 0.0f), t(size_t(n * classes_), 0.0f), m(size_t(n), 0.0f);
  std::vector<int64_t> y(size_t(n), 0);
  auto xt = executorch::extension::from_blob(x.data(), sizes32(xshape));
  auto yt = executorch::extension::from_blob(y.data(), {n}, ScalarType::Long);
  auto tt = executorch::extension::from_blob(t.data(), {n, classes_});
  auto mt = executorch::extension::from_blob(m.data(), {n});
  auto outputs = run(*impl_->train, kTrainMethod, {EValue(*xt), EValue(*yt), EValue(*tt), EValue(*mt)});
  for (size_t i = outputs.size() - k; i < outputs.size(); ++i) impl_->parameters.push_back(outputs[i].toTensor());
  for (const Tensor& p : impl_->parameters) impl_->momentum.emplace_back(size_t(p.numel()), 0.0f);
  load_weights(baked);  // the exposing call moved the running statistics: put them back
}

TrainingProgram::~TrainingProgram() = default;

float TrainingProgram::step(const float* images, const int64_t* labels, const float* teacher, const float* mask,
                            int n, float* logits) {
  if (n < 1 || n > max_batch_)
    throw std::invalid_argument("batch of " + std::to_string(n) + " outside 1.." + std::to_string(max_batch_));
  std::vector<int64_t> xshape{n, input_shape_[0], input_shape_[1], input_shape_[2]};
  auto xt = executorch::extension::from_blob(const_cast<float*>(images), sizes32(xshape));
  auto yt = executorch::extension::from_blob(const_cast<int64_t*>(labels), {n}, ScalarType::Long);
  auto tt = executorch::extension::from_blob(const_cast<float*>(teacher), {n, classes_});
  auto mt = executorch::extension::from_blob(const_cast<float*>(mask), {n});
  auto outputs = run(*impl_->train, kTrainMethod, {EValue(*xt), EValue(*yt), EValue(*tt), EValue(*mt)});
  const size_t k = impl_->parameters.size();
  const float loss = outputs[0].toTensor().const_data_ptr<float>()[0];
  if (logits != nullptr) std::memcpy(logits, outputs[1].toTensor().const_data_ptr<float>(), size_t(n * classes_) * 4);
  // torch.optim.SGD: d = g + wd * p; buf = d on the first step, else momentum * buf + d; p -= lr * buf.
  const size_t grad0 = outputs.size() - 2 * k;
  for (size_t i = 0; i < k; ++i) {
    const Tensor& g = outputs[grad0 + i].toTensor();
    Tensor& p = impl_->parameters[i];
    float* w = p.mutable_data_ptr<float>();
    const float* gd = g.const_data_ptr<float>();
    float* buf = impl_->momentum[i].data();
    const int64_t count = p.numel();
    if (g.numel() != count) throw std::runtime_error("gradient and parameter sizes differ");
    for (int64_t j = 0; j < count; ++j) {
      const float d = gd[j] + sgd_.weight_decay * w[j];
      buf[j] = impl_->momentum_started ? sgd_.momentum * buf[j] + d : d;
      w[j] -= sgd_.lr * buf[j];
    }
  }
  impl_->momentum_started = true;
  ++steps_;
  return loss;
}

void TrainingProgram::predict(const float* images, int64_t n, float* logits) {
  std::vector<EValue> inputs(1);
  std::vector<TensorPtr> keep;
  for (const Tensor& p : impl_->parameters) inputs.emplace_back(p);
  for (const std::string& name : names_.running_stats) {
    size_t i = 0;
    while (names_.buffers[i] != name) ++i;
    inputs.emplace_back(impl_->buffers[i]);
  }
  for (int64_t start = 0; start < n; start += max_eval_batch_) {
    const int64_t b = std::min<int64_t>(max_eval_batch_, n - start);
    std::vector<int64_t> xshape{b, input_shape_[0], input_shape_[1], input_shape_[2]};
    auto xt = executorch::extension::from_blob(const_cast<float*>(images + start * sample_size()), sizes32(xshape));
    inputs[0] = EValue(*xt);
    auto outputs = run(*impl_->eval, kPredictMethod, inputs);
    std::memcpy(logits + start * classes_, outputs[0].toTensor().const_data_ptr<float>(), size_t(b * classes_) * 4);
  }
}

double TrainingProgram::accuracy(const float* images, const int64_t* labels, int64_t n) {
  if (n == 0) return 0.0;
  std::vector<float> logits(size_t(n * classes_));
  predict(images, n, logits.data());
  int64_t right = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* row = logits.data() + i * classes_;
    int best = 0;
    for (int c = 1; c < classes_; ++c)
      if (row[c] > row[best]) best = c;
    right += best == labels[i];
  }
  return double(right) / double(n);
}

static NamedTensor copy_of(const Tensor& t) {
  NamedTensor out;
  out.dtype = t.scalar_type() == ScalarType::Long ? 1 : 0;
  for (auto d : t.sizes()) out.shape.push_back(d);
  out.data.assign(t.const_data_ptr<uint8_t>(), t.const_data_ptr<uint8_t>() + t.nbytes());
  return out;
}

NamedTensors TrainingProgram::weights() const {
  NamedTensors out;
  for (size_t i = 0; i < impl_->parameters.size(); ++i) out[names_.parameters[i]] = copy_of(impl_->parameters[i]);
  for (size_t i = 0; i < impl_->buffers.size(); ++i) out[names_.buffers[i]] = copy_of(impl_->buffers[i]);
  return out;
}

void TrainingProgram::load_weights(const NamedTensors& tensors) {
  for (const auto& [name, value] : tensors) {
    Tensor* target = nullptr;
    for (size_t i = 0; i < names_.parameters.size() && i < impl_->parameters.size(); ++i)
      if (names_.parameters[i] == name) target = &impl_->parameters[i];
    for (size_t i = 0; target == nullptr && i < names_.buffers.size(); ++i)
      if (names_.buffers[i] == name) target = &impl_->buffers[i];
    if (target == nullptr) throw std::invalid_argument("'" + name + "' is neither a parameter nor a buffer");
    const bool is_long = target->scalar_type() == ScalarType::Long;
    if (value.dtype != (is_long ? 1 : 0)) throw std::invalid_argument(name + ": dtype differs from the program's");
    if (value.data.size() != size_t(target->numel()) * element_size(target->scalar_type()))
      throw std::invalid_argument(name + ": shape differs from the program's");
    std::memcpy(target->mutable_data_ptr<uint8_t>(), value.data.data(), value.data.size());
  }
}

NamedTensors TrainingProgram::optimizer_state() const {
  NamedTensors out;
  if (!impl_->momentum_started) return out;
  for (size_t i = 0; i < impl_->momentum.size(); ++i) {
    NamedTensor t;
    t.shape = {int64_t(impl_->momentum[i].size())};
    const auto* p = reinterpret_cast<const uint8_t*>(impl_->momentum[i].data());
    t.data.assign(p, p + impl_->momentum[i].size() * 4);
    out["momentum." + names_.parameters[i]] = std::move(t);
  }
  return out;
}

void TrainingProgram::load_optimizer_state(const NamedTensors& tensors) {
  size_t found = 0;
  for (size_t i = 0; i < impl_->momentum.size(); ++i) {
    auto it = tensors.find("momentum." + names_.parameters[i]);
    if (it == tensors.end()) continue;
    if (it->second.data.size() != impl_->momentum[i].size() * 4)
      throw std::invalid_argument("momentum of " + names_.parameters[i] + " has the wrong size");
    std::memcpy(impl_->momentum[i].data(), it->second.data.data(), it->second.data.size());
    ++found;
  }
  impl_->momentum_started = found == impl_->momentum.size() && found > 0;
}

struct EncoderProgram::Impl {
  std::unique_ptr<Module> module;
};

EncoderProgram::EncoderProgram(const std::string& path) : impl_(std::make_unique<Impl>()) {
  impl_->module = std::make_unique<Module>(path, Module::LoadMode::File);
  Module* module_ = impl_->module.get();
  if (module_->load() != Error::Ok || module_->load_method("forward") != Error::Ok)
    throw std::runtime_error(path + ": cannot load the encoder program");
  auto meta = module_->method_meta("forward");
  if (!meta.ok() || meta->num_inputs() != 1 || meta->input_tensor_meta(0)->sizes().size() != 4)
    throw std::runtime_error(path + ": an encoder takes one N x C x H x W input");
  auto sizes = meta->input_tensor_meta(0)->sizes();
  max_batch_ = sizes[0];
  for (size_t i = 1; i < 4; ++i) input_shape_.push_back(sizes[i]);
}

EncoderProgram::~EncoderProgram() = default;

std::vector<float> EncoderProgram::features(const float* images, int64_t n, int64_t sample_size, int* dim) {
  if (sample_size != input_shape_[0] * input_shape_[1] * input_shape_[2])
    throw std::invalid_argument("the encoder's input shape differs from the samples'");
  std::vector<float> out;
  *dim = 0;
  for (int64_t start = 0; start < n; start += max_batch_) {
    const int64_t b = std::min<int64_t>(max_batch_, n - start);
    std::vector<int64_t> xshape{b, input_shape_[0], input_shape_[1], input_shape_[2]};
    auto xt = executorch::extension::from_blob(const_cast<float*>(images + start * sample_size), sizes32(xshape));
    auto outputs = run(*impl_->module, "forward", {EValue(*xt)});
    const Tensor& f = outputs[0].toTensor();
    *dim = int(f.size(1));
    out.insert(out.end(), f.const_data_ptr<float>(), f.const_data_ptr<float>() + f.numel());
  }
  for (float v : out)
    if (!std::isfinite(v)) throw std::runtime_error("the encoder produced non-finite features");
  return out;
}

}  // namespace fedcache
