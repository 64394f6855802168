# Source on a lent GPU machine (no registry access): installs carried wheels from .whl/ and
# builds genie._C from source against the machine's torch, without pip or build isolation.
#   . bench/gpu_setup.sh
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/python:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
# The system g++ (the GCC torch was built with there): /opt/gcc's newer g++ inlines libstdc++
# code that does not match the system libstdc++ loaded at run time (iostreams crashed).
rm -rf build/gpu
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=/usr/bin/g++ \
  -DPython_EXECUTABLE="$(command -v python3)" > build-gpu.log 2>&1
cmake --build build/gpu -j 16 >> build-gpu.log 2>&1 || { tail -40 build-gpu.log; false; }
cp build/gpu/_C*.so python/genie/
python3 -c "import torch, genie; print('genie built against torch', torch.__version__, 'cuda', torch.cuda.is_available())"
set +e
