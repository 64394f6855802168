// C++ microbenchmark: per-op cost of capturing on remote_accelerator next to eager CPU.
// Prints one JSON object on stdout; bench/bench_capture.py builds, runs and tabulates it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "capture/device.h"
#include "capture/executor.h"
#include "capture/kernels.h"
#include "capture/recorder.h"
#include "capture/shape_cache.h"

namespace {

using Clock = std::chrono::steady_clock;

// Median over rounds of the mean time per call, in microseconds.
double time_us(const std::function<void()>& fn, const std::function<void()>& between, int calls, int rounds) {
  for (int i = 0; i < calls; ++i) fn();  // warm-up (fills the shape cache on the remote path)
  between();
  std::vector<double> per_call;
  for (int r = 0; r < rounds; ++r) {
    auto t0 = Clock::now();
    for (int i = 0; i < calls; ++i) fn();
    auto t1 = Clock::now();
    per_call.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / calls);
    between();  // untimed: drop what the round recorded
  }
  std::sort(per_call.begin(), per_call.end());
  return per_call[per_call.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int calls = argc > 1 ? std::stoi(argv[1]) : 2000;
  int rounds = argc > 2 ? std::stoi(argv[2]) : 15;
  int64_t n = argc > 3 ? std::stoll(argv[3]) : 16;
  std::string only = argc > 4 ? argv[4] : "";  // run one op (for profilers)
  // One intra-op thread: per-op costs at 16x16 are about dispatch, and idle OpenMP workers
  // spinning after an eager round otherwise steal the capture round's core on small machines.
  at::set_num_threads(1);
  genie::register_device();
  genie::register_direct_kernels();
  genie::recorder().set_executor(std::make_shared<genie::LocalExecutor>(c10::Device(c10::DeviceType::CPU)));
  at::manual_seed(0);
  const c10::Device remote(c10::DeviceType::PrivateUse1, 0);
  at::Tensor a = at::randn({n, n}), b = at::randn({n, n});
  at::Tensor w = at::randn({n}), bias = at::randn({n});
  at::Tensor ra = a.to(remote), rb = b.to(remote), rw = w.to(remote), rbias = bias.to(remote);
  auto nothing = [] {};
  auto collect = [] { genie::recorder().collect(); };

  struct Case {
    const char* name;
    std::function<void()> eager, capture;
  };
  std::vector<Case> cases = {
      {"add", [&] { (void)at::add(a, b); }, [&] { (void)at::add(ra, rb); }},
      {"mm", [&] { (void)at::mm(a, b); }, [&] { (void)at::mm(ra, rb); }},
      {"layer_norm", [&] { (void)at::layer_norm(a, {n}, w, bias); },
       [&] { (void)at::layer_norm(ra, {n}, rw, rbias); }},
      {"view", [&] { (void)a.view({-1}); }, [&] { (void)ra.view({-1}); }},
  };
  std::printf("{\"size\": %lld, \"calls\": %d, \"rounds\": %d, \"ops\": {", static_cast<long long>(n), calls, rounds);
  if (!only.empty()) {
    cases.erase(std::remove_if(cases.begin(), cases.end(), [&](const Case& c) { return only != c.name; }),
                cases.end());
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    double eager = time_us(cases[i].eager, nothing, calls, rounds);
    double capture = time_us(cases[i].capture, collect, calls, rounds);
    std::printf("%s\"%s\": {\"eager_us\": %.4f, \"capture_us\": %.4f}", i ? ", " : "", cases[i].name, eager, capture);
  }
  std::printf("}, \"shape_cache_hits\": %lld, \"shape_cache_misses\": %lld}\n",
              static_cast<long long>(genie::shape_cache().hits()), static_cast<long long>(genie::shape_cache().misses()));
  return 0;
}
