#pragma once
// Note: [Program digests]
// A remote executor sends a flush as a program (storage ids replaced by local indices, in order
// of first appearance) plus a binding (the real ids by local index); see
// python/genie/runtime/program/__init__.py, Note: [Programs and bindings]. Building that from Python
// dicts costs ~10 us a node, which on a GPU is longer than the node runs. The digest computes
// the same canonical form here, in one pass: a 128-bit fingerprint of everything the program
// bytes encode (op, argument values, references, aliasing, writes, creations, randomness) and
// the binding. A client that has sent a program with this fingerprint before sends its key and
// this binding, and never builds the dicts again.
//
// The recorder also fingerprints the first few nodes recorded after each flush (the "window",
// Note: [Speculation hook]): a client that saw a recording begin that way before guesses, early,
// which program it will become (Note: [Client speculation] in python/genie/runtime/remote/speculator.py).
//
// Note: [Program templates]
// A decode step with a growing KV cache records the same ops every step; only integers move
// (the cache's length in sizes, strides and byte counts, an arange's bounds). The digest also
// computes a *structural* fingerprint that leaves those integers out, and lists them in order
// (`params`): every size, stride, offset and storage size of every reference, and every value
// argument the op's schema types as int or int[], or that is a Python int standing for a tensor.
// Everything else (ops, dtypes, ranks, list
// lengths, wiring, other values) stays in the structure. `param_paths` says where each
// parameter sits in the encoded program (python/genie/runtime/program/encode.py), as
// [node, field, index, part, element] with -1 for a missing last level, so a client can send
// the next step as a patch of numbers against a program the server checked
// (Note: [Program templates] in python/genie/runtime/remote/namer.py).
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
  std::array<uint64_t, 2> structure{};         // Note: [Program templates]
  std::array<uint64_t, 2> structure_prefix{};  // the structure of the first `prefix_nodes`
  std::vector<int64_t> params;                 // the integers the structure leaves out
  std::vector<std::array<int32_t, 5>> param_paths;  // filled only when asked for
  std::vector<StorageId> binding;     // real storage ids by local index
  std::vector<std::pair<int64_t, at::Tensor>> rng;  // (node index, generator state)
};

// `prefix_nodes`: how many leading nodes the prefix fingerprints cover (fewer if shorter);
// `paths`: also fill param_paths.
ProgramDigest digest_program(const std::vector<std::shared_ptr<Node>>& nodes, size_t prefix_nodes,
                             bool paths = false);

}  // namespace genie
