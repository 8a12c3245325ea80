#!/bin/sh
# A short tag for this CPU's vector instruction sets. llama-cpp-python compiles for the CPU it is built on
# (GGML_NATIVE), so a wheel built on an AVX512 machine crashes with "illegal instruction" on an AVX2-only one:
# the wheel cache is kept per tag, and a machine with another CPU builds its own.
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' |
  grep -E '^(sse4_2|avx|avx2|fma|f16c|bmi2|avx_vnni|avx512[a-z0-9_]*|amx[a-z0-9_]*)$' | sort | tr '\n' ' ')
if [ -z "$flags" ]; then echo "$(uname -m)-generic"; exit 0; fi
echo "$(uname -m)-$(printf '%s' "$flags" | cksum | cut -d' ' -f1)"
