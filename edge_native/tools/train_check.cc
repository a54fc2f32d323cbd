// fedcache-train-check: N SGD steps of a training program from given weights on given batches, for the parity
// test against PyTorch (tests/test_native_training.py) and the step-time bench (bench/native.py).
//
//   fedcache-train-check --program P.train.pte --names names.txt --weights init.fcw --batches DIR --out out.fcw
//                        [--lr 0.01 --momentum 0.9 --weight-decay 5e-4 --repeat 1 --threads 1]
// DIR holds x.npy (T,C,H,W f32), y.npy (T i64), teacher.npy (T,K f32), mask.npy (T f32), sizes.npy (S i64:
// the batch sizes, summing to T). names.txt: lines "param NAME", "buffer NAME", "stat NAME".
// Prints one JSON line: steps, mean step milliseconds, last loss, peak RSS.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>

#include "../src/npy.h"
#include "../src/trainer.h"
#include "../src/weights.h"
#include "../src/sysinfo.h"

using namespace fedcache;

int main(int argc, char** argv) {
  std::map<std::string, std::string> a{{"--lr", "0.01"}, {"--momentum", "0.9"}, {"--weight-decay", "5e-4"},
                                       {"--repeat", "1"}, {"--threads", "1"}, {"--weights", ""}, {"--out", ""}};
  for (int i = 1; i + 1 < argc; i += 2) a[argv[i]] = argv[i + 1];
  try {
    for (const char* key : {"--program", "--names", "--batches"})
      if (a.count(key) == 0) throw std::invalid_argument(std::string("missing ") + key);
    ProgramNames names;
    std::ifstream in(a["--names"]);
    if (!in) throw std::runtime_error(a["--names"] + ": cannot open");
    std::string kind, name;
    while (in >> kind >> name) {
      if (kind == "param") names.parameters.push_back(name);
      else if (kind == "buffer") names.buffers.push_back(name);
      else if (kind == "stat") names.running_stats.push_back(name);
      else throw std::invalid_argument("names file: unknown kind " + kind);
    }
    set_runtime_threads(unsigned(std::stoul(a["--threads"])));
    SgdSettings sgd{std::stof(a["--lr"]), std::stof(a["--momentum"]), std::stof(a["--weight-decay"])};
    TrainingProgram program(a["--program"], names, sgd);
    if (!a["--weights"].empty()) program.load_weights(read_weights(a["--weights"]));
    const std::string dir = a["--batches"];
    NpyArray x = read_npy(dir + "/x.npy"), y = read_npy(dir + "/y.npy"), t = read_npy(dir + "/teacher.npy"),
             m = read_npy(dir + "/mask.npy"), sizes = read_npy(dir + "/sizes.npy");
    if (x.dtype != "<f4" || y.dtype != "<i8" || t.dtype != "<f4" || m.dtype != "<f4" || sizes.dtype != "<i8")
      throw std::invalid_argument("batch files need f4 images/teacher/mask and i8 labels/sizes");
    const int64_t sample = program.sample_size(), classes = program.classes();
    std::vector<float> logits(size_t(program.max_batch() * classes));
    float loss = 0;
    double total_ms = 0;
    int64_t steps = 0;
    const int repeat = std::stoi(a["--repeat"]);
    for (int r = 0; r < repeat; ++r) {
      int64_t at = 0;
      for (int64_t s = 0; s < sizes.count(); ++s) {
        const int n = int(sizes.as<int64_t>()[s]);
        if (at + n > y.count()) throw std::invalid_argument("sizes.npy sums past the batch files");
        const auto start = std::chrono::steady_clock::now();
        loss = program.step(x.as<float>() + at * sample, y.as<int64_t>() + at, t.as<float>() + at * classes,
                            m.as<float>() + at, n, logits.data());
        total_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        at += n;
        ++steps;
      }
    }
    if (!a["--out"].empty()) write_weights(a["--out"], program.weights());
    std::printf("{\"steps\": %lld, \"step_ms\": %.4f, \"loss\": %.8g, \"peak_rss_kib\": %ld}\n", (long long)steps,
                steps ? total_ms / double(steps) : 0.0, loss, peak_rss_kib());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fedcache-train-check: %s\n", e.what());
    return 2;
  }
}
