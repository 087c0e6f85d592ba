// A stand-in for TensorRT's NvInfer.h, for compiling and running rpiae_run's TensorRT path on
// a machine without TensorRT (tests/test_cpp_runner.py). It declares only what rpiae_run
// uses, with TensorRT 10's names and signatures, and "runs" an engine on host memory: the
// plan file's text is the graph ("encode" or "decode"), the output is zeros.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda_runtime_api.h"

#define NV_TENSORRT_MAJOR 10

namespace nvinfer1 {

enum class DataType : int32_t { kFLOAT = 0, kHALF = 1, kINT8 = 2, kINT32 = 3 };
enum class TensorIOMode : int32_t { kNONE = 0, kINPUT = 1, kOUTPUT = 2 };

class Dims64 {
 public:
  static constexpr int32_t MAX_DIMS{8};
  int32_t nbDims;
  int64_t d[MAX_DIMS];
};
using Dims = Dims64;

class ILogger {
 public:
  enum class Severity : int32_t { kINTERNAL_ERROR = 0, kERROR = 1, kWARNING = 2, kINFO = 3, kVERBOSE = 4 };
  virtual void log(Severity severity, const char* msg) noexcept = 0;
  virtual ~ILogger() = default;
};

class IExecutionContext {
 public:
  explicit IExecutionContext(bool encode) : encode_(encode) {}
  virtual ~IExecutionContext() = default;
  bool setInputShape(const char*, const Dims64& dims) noexcept {
    batch_ = dims.d[0];
    return dims.nbDims == 4 && batch_ >= 1 && batch_ <= 8;
  }
  Dims64 getTensorShape(const char*) const noexcept {
    Dims64 out{};
    out.nbDims = 4;
    const int64_t item[3] = {encode_ ? 64 : 3, encode_ ? 16 : 256, encode_ ? 16 : 256};
    out.d[0] = batch_;
    for (int i = 0; i < 3; ++i) out.d[i + 1] = item[i];
    return out;
  }
  bool setTensorAddress(const char* name, void* ptr) noexcept {
    (std::strcmp(name, "input") == 0 ? in_ : out_) = ptr;
    return true;
  }
  bool enqueueV3(cudaStream_t) noexcept {
    const char* fail = std::getenv("RPIAE_FAKE_FAIL");
    if (fail && std::string(fail) == "enqueue") return false;
    const Dims64 o = getTensorShape("output");
    std::memset(out_, 0, static_cast<size_t>(o.d[0] * o.d[1] * o.d[2] * o.d[3]) * sizeof(float));
    return true;
  }

 private:
  bool encode_;
  int64_t batch_ = 1;
  void* in_ = nullptr;
  void* out_ = nullptr;
};

class ICudaEngine {
 public:
  explicit ICudaEngine(bool encode) : encode_(encode) {}
  virtual ~ICudaEngine() = default;
  IExecutionContext* createExecutionContext() noexcept { return new IExecutionContext(encode_); }
  int32_t getNbIOTensors() const noexcept { return 2; }
  const char* getIOTensorName(int32_t index) const noexcept { return index == 0 ? "input" : "output"; }
  DataType getTensorDataType(const char*) const noexcept { return DataType::kFLOAT; }
  // the engine's I/O shape, -1 for the dynamic batch (an encoder's input: images, a decoder's: latents)
  Dims64 getTensorShape(const char* name) const noexcept {
    Dims64 out{};
    out.nbDims = 4;
    const bool images = encode_ == (std::strcmp(name, "input") == 0);
    const int64_t item[4] = {-1, images ? 3 : 64, images ? 256 : 16, images ? 256 : 16};
    for (int i = 0; i < 4; ++i) out.d[i] = item[i];
    return out;
  }
  TensorIOMode getTensorIOMode(const char* name) const noexcept {
    return std::strcmp(name, "input") == 0 ? TensorIOMode::kINPUT : TensorIOMode::kOUTPUT;
  }

 private:
  bool encode_;
};

class IRuntime {
 public:
  virtual ~IRuntime() = default;
  void setEngineHostCodeAllowed(bool allowed) noexcept { host_code_allowed_ = allowed; }
  ICudaEngine* deserializeCudaEngine(const void* blob, std::size_t size) noexcept {
    std::string text(static_cast<const char*>(blob), size);
    // a version-compatible plan ("vc:" here) carries host code: TensorRT refuses it unless allowed
    if (text.rfind("vc:", 0) == 0) {
      if (!host_code_allowed_) return nullptr;
      text = text.substr(3);
    }
    if (text.rfind("encode", 0) == 0) return new ICudaEngine(true);
    if (text.rfind("decode", 0) == 0) return new ICudaEngine(false);
    return nullptr;
  }

 private:
  bool host_code_allowed_ = false;
};

inline IRuntime* createInferRuntime(ILogger&) noexcept { return new IRuntime(); }

}  // namespace nvinfer1
