"""Programs on the wire: the client's encoding of a flush and the server's validated decoding.

Note: [Programs and bindings]
A flush is split into a *program* and a *binding*. The program is the node list with every
storage id replaced by a local index (its order of first appearance), so the same code run
again (the next decode step, the next batch) is the same program, byte for byte, whatever
storage ids the recorder handed out. The binding lists the real storage ids, by local index.
The server decodes and validates a program once, caches it under the hash of its bytes, and
afterwards the client sends only that 16-byte key and the binding (see Note: [Wire format]).
Because the server computes the key from the bytes it validated, one client cannot make
another run something it did not validate.

The package is the wire IR alone; nothing in it knows about sockets or sessions:
  encode.py   flush -> program bytes, key, binding (the client)
  ops.py      the op allow-list and the checks of argument values against a schema
  decode.py   program bytes -> a checked Program (the server)
  patches.py  programs named by a patch of another: diff, apply, key, next guess, instances
  cache.py    checked programs by key, shared by a server's sessions
  run.py      the binding check and running a checked program (Python steps, C++ runner)
  graphs.py   running repeated static programs as CUDA graphs
"""

from genie.runtime.program.cache import ProgramCache
from genie.runtime.program.decode import Program, Step, decode_program
from genie.runtime.program.encode import EncodedProgram, encode_program, encoded_meta, program_key
from genie.runtime.program.ops import resolve_op
from genie.runtime.program.patches import apply_patch, diff_program, next_patch, patch_key
from genie.runtime.program.run import bind_result, check_binding, execute, native_runner, run_step

__all__ = [
    "EncodedProgram",
    "Program",
    "ProgramCache",
    "Step",
    "apply_patch",
    "bind_result",
    "check_binding",
    "decode_program",
    "diff_program",
    "encode_program",
    "encoded_meta",
    "execute",
    "native_runner",
    "next_patch",
    "patch_key",
    "program_key",
    "resolve_op",
    "run_step",
]
