// A stand-in for the CUDA runtime API that rpiae_run's TensorRT path calls: "device" memory
// is host memory, and every allocation is counted. At exit it prints the number of
// cudaMalloc calls and of allocations never freed. RPIAE_FAKE_FAIL=memcpy_d2h makes the
// device-to-host copy fail (a CUDA error in the middle of a run).
#pragma once
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>

typedef enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 } cudaError_t;
typedef enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 } cudaMemcpyKind;
typedef struct CUstream_st* cudaStream_t;

struct FakeCudaLedger {
  std::set<void*> live;
  int mallocs = 0;
  ~FakeCudaLedger() { std::fprintf(stderr, "fake-cuda: cudaMalloc calls %d, never freed %zu\n", mallocs, live.size()); }
};
inline FakeCudaLedger& fake_cuda() {
  static FakeCudaLedger ledger;
  return ledger;
}

inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "unspecified launch failure"; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaMalloc(void** ptr, size_t size) {
  *ptr = std::malloc(size);
  fake_cuda().live.insert(*ptr);
  ++fake_cuda().mallocs;
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* ptr) {
  fake_cuda().live.erase(ptr);
  std::free(ptr);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind, cudaStream_t) {
  const char* fail = std::getenv("RPIAE_FAKE_FAIL");
  if (kind == cudaMemcpyDeviceToHost && fail && std::string(fail) == "memcpy_d2h") return cudaErrorLaunchFailure;
  std::memcpy(dst, src, count);
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  *stream = reinterpret_cast<cudaStream_t>(new char);
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete reinterpret_cast<char*>(stream);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
