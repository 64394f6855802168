#pragma once
// Note: [Speculation hook]
// Nothing in the capture core knows about speculation. A client that wants to guess, early,
// which program the current recording will become (Note: [Client speculation] in
// python/genie/runtime/remote/speculator.py) installs a hook. After each flush that ran, the
// recorder fingerprints the first window() nodes recorded (the structural prefix of Note:
// [Program templates]) and calls on_window() with it, outside its lock. Installing an
// executor removes the hook: it belongs to the client that was installed with it.
#include <array>
#include <cstddef>
#include <cstdint>

namespace genie {

class SpeculationHook {
 public:
  virtual ~SpeculationHook() = default;
  // How many freshly recorded nodes to fingerprint before on_window() (0: never).
  virtual size_t window() const = 0;
  // The structural fingerprint of those nodes. Called without the recorder's lock.
  virtual void on_window(const std::array<uint64_t, 2>& structure_prefix) = 0;
};

}  // namespace genie
