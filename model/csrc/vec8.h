// Eight floats as one value: a GCC/Clang vector extension, compiled to AVX on x86-64 with -march=native (and
// to what the target has elsewhere). Unaligned loads and stores go through memcpy, which compiles to one move.
#pragma once

#include <cstring>

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
