#pragma once
// Note: [Program digests]
// A remote executor sends a flush as a program (storage ids replaced by local indices, in order
// of first appearance) plus a binding (the real ids by local index); see
// python/genie/runtime/program.py, Note: [Programs and bindings]. Building that from Python
// dicts costs ~10 us a node, which on a GPU is longer than the node runs. The digest computes
// the same canonical form here, in one pass: a 128-bit fingerprint of everything the program
// bytes encode (op, argument values, references, aliasing, writes, creations, randomness) and
// the binding. A client that has sent a program with this fingerprint before sends its key and
// this binding, and never builds the dicts again.
//
// The recorder also fingerprints the first few nodes recorded after each flush (the "window",
// Executor::speculate): a client that saw a recording begin that way before guesses, early,
// which program it will become (Note: [Client speculation] in python/genie/runtime/client.py).
#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "capture/recorder.h"

namespace genie {

struct ProgramDigest {
  bool ok = false;                    // false: some argument cannot be fingerprinted
  std::array<uint64_t, 2> fingerprint{};
  std::array<uint64_t, 2> prefix{};   // over the first `prefix_nodes` nodes
  std::vector<StorageId> binding;     // real storage ids by local index
  std::vector<std::pair<int64_t, at::Tensor>> rng;  // (node index, generator state)
};

// `prefix_nodes`: how many leading nodes the prefix fingerprint covers (fewer if shorter).
ProgramDigest digest_program(const std::vector<std::shared_ptr<Node>>& nodes, size_t prefix_nodes);

}  // namespace genie
