#pragma once
// A minimal check harness for the data plane's C++ tests (run by ctest): each failed CHECK
// prints where and what, and main returns the number of failures.
#include <cstdio>

namespace genie::dataplane::testing {
inline int& failures() {
  static int n = 0;
  return n;
}
}  // namespace genie::dataplane::testing

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++genie::dataplane::testing::failures();                                      \
    }                                                                               \
  } while (0)

#define CHECK_EQ(a, b)                                                                           \
  do {                                                                                           \
    auto _a = (a);                                                                               \
    auto _b = (b);                                                                               \
    if (!(_a == _b)) {                                                                           \
      std::fprintf(stderr, "%s:%d: CHECK_EQ(%s, %s) failed: %lld vs %lld\n", __FILE__, __LINE__, \
                   #a, #b, (long long)_a, (long long)_b);                                        \
      ++genie::dataplane::testing::failures();                                                   \
    }                                                                                            \
  } while (0)

#define RUN(test)                                                                            \
  do {                                                                                       \
    int _before = genie::dataplane::testing::failures();                                     \
    test();                                                                                  \
    std::fprintf(stderr, "%s %s\n",                                                          \
                 genie::dataplane::testing::failures() == _before ? "ok  " : "FAIL", #test); \
  } while (0)
