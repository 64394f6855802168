#pragma once
// One error model for the core: a kind and a message. The bindings install a hook that turns
// them into genie's Python exception hierarchy; without the hook they are c10::Errors.
#include <functional>
#include <string>

namespace genie {

enum class ErrorKind { Execution, Unsupported, Remote, Transport, Protocol };

using ErrorHook = std::function<void(ErrorKind, const std::string&)>;

void set_error_hook(ErrorHook hook);
[[noreturn]] void raise_error(ErrorKind kind, const std::string& message);

}  // namespace genie
