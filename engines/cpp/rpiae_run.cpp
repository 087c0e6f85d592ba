// rpiae_run: encode an image to the model's latent and decode it back, from C++.
//
//   rpiae_run ENCODER DECODER INPUT.ppm [OUTPUT.ppm] [--latent FILE] [--raw FILE] [--device cpu|cuda[:N]]
//
// ENCODER/DECODER are both TensorRT engines (`.plan`, built by `rpiae export --target trt`)
// or both AOTInductor packages (`.pt2`, built by `rpiae export --target aoti`). Which
// backends exist depends on what CMake found (see README.md): `.plan` needs TensorRT and
// CUDA (RPIAE_WITH_TENSORRT), `.pt2` needs libtorch (RPIAE_WITH_AOTI).
//
// INPUT is a binary PPM (P6, 8-bit) of exactly the encoder's image size (the model config's
// image_size, 256 for RPiAE: the package's rpiae_input_shape, the engine's input shape):
// resizing and cropping are the caller's job (rpiae.imageio's policy; `rpiae samples` writes
// PNGs, any tool converts). OUTPUT (default: reconstruction.ppm) is the decoded image clamped
// to [0, 1] and rounded to 8 bits. --latent writes the (1, C, H, W) latent and --raw the
// unclamped decoded (1, 3, S, S) image, both as little-endian float32 in NCHW order, for
// comparisons.
//
// Exit codes: 0 success, 1 runtime failure (unreadable file, package refused), 2 usage.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef RPIAE_WITH_AOTI
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>
#endif

#ifdef RPIAE_WITH_TENSORRT
#include <NvInfer.h>
#include <cuda_runtime_api.h>
#endif

namespace {

struct Array {  // float32 NCHW
  std::vector<int64_t> shape;
  std::vector<float> data;
};

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error(msg); }

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << ")";
  return o.str();
}

// ---- PPM (P6) I/O -----------------------------------------------------------------------
void skip_space_and_comments(std::istream& in) {
  for (int c = in.peek(); c != EOF; c = in.peek()) {
    if (c == '#') {
      std::string line;
      std::getline(in, line);
    } else if (std::isspace(c)) {
      in.get();
    } else {
      break;
    }
  }
}

// an 8-bit binary PPM of exactly `want_h` x `want_w` pixels -> (1, 3, H, W) in [0, 1]
Array read_ppm(const std::string& path, int64_t want_h, int64_t want_w) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path + ": cannot open");
  std::string magic;
  in >> magic;
  if (magic != "P6") fail(path + ": not a binary PPM (P6) file");
  long w = 0, h = 0, maxval = 0;
  skip_space_and_comments(in);
  in >> w;
  skip_space_and_comments(in);
  in >> h;
  skip_space_and_comments(in);
  in >> maxval;
  if (!in || maxval != 255) fail(path + ": only 8-bit PPM (maxval 255) is supported");
  in.get();  // the single whitespace byte before the pixels
  if (w != want_w || h != want_h)
    fail(path + ": image is " + std::to_string(w) + "x" + std::to_string(h) + ", the graphs take " +
         std::to_string(want_w) + "x" + std::to_string(want_h) + " (resize the short side to " +
         std::to_string(std::min(want_w, want_h)) + " and centre-crop first)");
  std::vector<unsigned char> px(static_cast<size_t>(w * h * 3));
  in.read(reinterpret_cast<char*>(px.data()), static_cast<std::streamsize>(px.size()));
  if (in.gcount() != static_cast<std::streamsize>(px.size())) fail(path + ": truncated pixel data");
  Array a{{1, 3, h, w}, std::vector<float>(px.size())};
  const size_t plane = static_cast<size_t>(w * h);
  for (size_t i = 0; i < plane; ++i)
    for (size_t c = 0; c < 3; ++c) a.data[c * plane + i] = px[i * 3 + c] / 255.0f;
  return a;
}

void write_file(const std::string& path, const char* data, size_t n) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(path + ": cannot write");
    out.write(data, static_cast<std::streamsize>(n));
    if (!out) fail(path + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(path + ": cannot rename " + tmp);
}

void write_ppm(const std::string& path, const Array& img) {
  const int64_t h = img.shape[2], w = img.shape[3];
  const size_t plane = static_cast<size_t>(h * w);
  std::string buf = "P6\n" + std::to_string(w) + " " + std::to_string(h) + "\n255\n";
  const size_t head = buf.size();
  buf.resize(head + plane * 3);
  for (size_t i = 0; i < plane; ++i)
    for (size_t c = 0; c < 3; ++c) {
      float v = std::min(1.0f, std::max(0.0f, img.data[c * plane + i]));
      buf[head + i * 3 + c] = static_cast<char>(static_cast<unsigned char>(std::nearbyint(v * 255.0f)));
    }
  write_file(path, buf.data(), buf.size());
}

void write_raw(const std::string& path, const Array& a) {
  write_file(path, reinterpret_cast<const char*>(a.data.data()), a.data.size() * sizeof(float));
}

// ---- the runtime interface ----------------------------------------------------------------
class Graph {
 public:
  virtual ~Graph() = default;
  virtual Array run(const Array& x) = 0;
  virtual std::string describe() const = 0;
  // one sample's input shape, from the graph itself: (3, S, S) for the encoder
  virtual std::vector<int64_t> input_shape() const = 0;
};

#ifdef RPIAE_WITH_AOTI
std::set<std::string> cpu_flags() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  std::set<std::string> flags;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) == 0 || line.rfind("Features", 0) == 0) {
      std::istringstream words(line.substr(line.find(':') + 1));
      for (std::string f; words >> f;) flags.insert(f);
      break;
    }
  }
  return flags;
}

class AOTIGraph : public Graph {
 public:
  AOTIGraph(const std::string& path, const std::string& graph, const std::string& device) : path_(path) {
    auto meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
    auto get = [&](const std::string& k) { return meta.count(k) ? meta.at(k) : std::string(); };
    if (get("rpiae_graph") != graph)
      fail(path + ": is not an rpiae " + graph + " package (its graph: '" + get("rpiae_graph") + "')");
    const std::string dev = get("rpiae_device");
    const bool want_cuda = device.rfind("cuda", 0) == 0;
    if (dev != (want_cuda ? "cuda" : "cpu"))
      fail(path + ": was compiled for " + dev + ", not " + (want_cuda ? "cuda" : "cpu") +
           " (pass --device " + dev + " or export a package for this device)");
    if (dev == "cpu") {
      auto have = cpu_flags();
      std::istringstream need(get("rpiae_cpu_flags"));
      std::string missing;
      for (std::string f; need >> f;)
        if (!have.empty() && !have.count(f)) missing += (missing.empty() ? "" : ", ") + f;
      if (!missing.empty())
        fail(path + ": was compiled for " + get("rpiae_cpu_level") + "; this CPU lacks " + missing);
    } else if (!torch::cuda::is_available()) {
      fail(path + ": is a CUDA package and no CUDA device is available to libtorch");
    } else {
      // FP32 is IEEE FP32: the package's convolutions (cuDNN) and matmuls (cuBLAS) run through
      // ATen, which would use TF32 for cuDNN by default
      at::globalContext().setAllowTF32CuDNN(false);
      at::globalContext().setAllowTF32CuBLAS(false);
    }
    std::istringstream dims(get("rpiae_input_shape"));
    for (std::string d; std::getline(dims, d, ',');) input_shape_.push_back(std::stoll(d));
    if (input_shape_.empty()) fail(path + ": carries no rpiae_input_shape (re-export it with `rpiae export --target aoti`)");
    batch_min_ = std::stoll(get("rpiae_batch_min").empty() ? "1" : get("rpiae_batch_min"));
    batch_max_ = std::stoll(get("rpiae_batch_max").empty() ? "1" : get("rpiae_batch_max"));
    level_ = dev == "cpu" ? get("rpiae_cpu_level") : "sm " + get("rpiae_capability");
    device_ = want_cuda ? torch::Device(device) : torch::Device(torch::kCPU);
    const c10::DeviceIndex index = want_cuda ? device_.index() : -1;
    loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model", false, 1, index);
  }

  Array run(const Array& x) override {
    const int64_t n = x.shape[0];
    if (n < batch_min_ || n > batch_max_)
      fail(path_ + ": batch " + std::to_string(n) + " is outside the package's range " + std::to_string(batch_min_) +
           ".." + std::to_string(batch_max_));
    torch::NoGradGuard no_grad;
    auto in = torch::from_blob(const_cast<float*>(x.data.data()), x.shape, torch::kFloat32).to(device_).contiguous();
    std::vector<at::Tensor> outs = loader_->run({in});
    if (outs.size() != 1) fail(path_ + ": expected one output, got " + std::to_string(outs.size()));
    at::Tensor y = outs[0].to(torch::kCPU, torch::kFloat32).contiguous();
    Array a{std::vector<int64_t>(y.sizes().begin(), y.sizes().end()), {}};
    a.data.assign(y.data_ptr<float>(), y.data_ptr<float>() + y.numel());
    return a;
  }

  std::string describe() const override {
    return "AOTInductor " + level_ + ", batch " + std::to_string(batch_min_) + ".." + std::to_string(batch_max_);
  }

  std::vector<int64_t> input_shape() const override { return input_shape_; }

 private:
  std::string path_, level_;
  int64_t batch_min_ = 1, batch_max_ = 1;
  std::vector<int64_t> input_shape_;
  torch::Device device_{torch::kCPU};
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};
#endif  // RPIAE_WITH_AOTI

#ifdef RPIAE_WITH_TENSORRT
// Minimal TensorRT 10 runtime, after NVIDIA's sampleOnnxMNIST / migration guide:
// deserialize the plan, one execution context, name-based I/O, enqueueV3 on a stream.
void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail(std::string(what) + ": " + cudaGetErrorString(e));
}

class TrtLogger : public nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
  }
};

TrtLogger& trt_logger() {
  static TrtLogger logger;
  return logger;
}

// Device memory owned by one graph: grown when a larger batch needs it, reused otherwise,
// and freed by the destructor (also when a CUDA call throws half-way through a run).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }

  void* reserve(size_t bytes) {
    if (bytes > bytes_) {
      release();
      cuda_check(cudaMalloc(&ptr_, bytes), "cudaMalloc");
      bytes_ = bytes;
    }
    return ptr_;
  }

 private:
  void release() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class TRTGraph : public Graph {
 public:
  TRTGraph(const std::string& path, bool version_compatible) : path_(path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail(path + ": cannot open");
    std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    runtime_.reset(nvinfer1::createInferRuntime(trt_logger()));
    if (!runtime_) fail("TensorRT: createInferRuntime failed");
    // a version-compatible plan carries TensorRT's lean runtime (host code), which a runtime
    // only runs when allowed: opt in with --version-compatible, for plans you exported yourself
    if (version_compatible) runtime_->setEngineHostCodeAllowed(true);
    engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_)
      fail(path + ": TensorRT could not deserialize the engine (built by another TensorRT version or for "
           "another GPU? see its manifest entry" +
           std::string(version_compatible ? ")" : "; a plan exported with --version-compatible needs --version-compatible here)"));
    context_.reset(engine_->createExecutionContext());
    if (!context_) fail(path + ": createExecutionContext failed");
    for (int i = 0; i < engine_->getNbIOTensors(); ++i) {
      const char* name = engine_->getIOTensorName(i);
      if (engine_->getTensorDataType(name) != nvinfer1::DataType::kFLOAT)
        fail(path + ": tensor " + name + " is not float32 (the bundle's engines keep fp32 I/O)");
      (engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT ? input_ : output_) = name;
    }
    if (input_.empty() || output_.empty()) fail(path + ": expected one input and one output tensor");
    cuda_check(cudaStreamCreate(&stream_), "cudaStreamCreate");
  }
  ~TRTGraph() override {
    if (stream_) {
      cudaStreamSynchronize(stream_);  // nothing may still use the buffers or the context
      cudaStreamDestroy(stream_);
    }
  }

  Array run(const Array& x) override {
    nvinfer1::Dims dims;
    dims.nbDims = static_cast<int32_t>(x.shape.size());
    for (int i = 0; i < dims.nbDims; ++i) dims.d[i] = x.shape[i];
    if (!context_->setInputShape(input_.c_str(), dims))
      fail(path_ + ": input shape " + shape_str(x.shape) + " is outside the engine's optimisation profile");
    nvinfer1::Dims od = context_->getTensorShape(output_.c_str());
    Array y;
    size_t count = 1;
    for (int i = 0; i < od.nbDims; ++i) {
      y.shape.push_back(od.d[i]);
      count *= static_cast<size_t>(od.d[i]);
    }
    y.data.resize(count);
    void* din = input_buffer_.reserve(x.data.size() * sizeof(float));
    void* dout = output_buffer_.reserve(count * sizeof(float));
    cuda_check(cudaMemcpyAsync(din, x.data.data(), x.data.size() * sizeof(float), cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync");
    context_->setTensorAddress(input_.c_str(), din);
    context_->setTensorAddress(output_.c_str(), dout);
    if (!context_->enqueueV3(stream_)) {
      cudaStreamSynchronize(stream_);
      fail(path_ + ": enqueueV3 failed");
    }
    cuda_check(cudaMemcpyAsync(y.data.data(), dout, count * sizeof(float), cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync");
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return y;
  }

  std::string describe() const override { return "TensorRT " + std::to_string(NV_TENSORRT_MAJOR) + " engine"; }

  std::vector<int64_t> input_shape() const override {  // the engine's input dims without the batch axis
    const nvinfer1::Dims d = engine_->getTensorShape(input_.c_str());
    return std::vector<int64_t>(d.d + 1, d.d + d.nbDims);
  }

 private:
  std::string path_, input_, output_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  DeviceBuffer input_buffer_, output_buffer_;
  cudaStream_t stream_ = nullptr;
};
#endif  // RPIAE_WITH_TENSORRT

std::unique_ptr<Graph> open_graph(const std::string& path, const std::string& graph, const std::string& device,
                                  bool version_compatible) {
  (void)graph;
  (void)device;
  (void)version_compatible;
  if (ends_with(path, ".plan") || ends_with(path, ".engine")) {
#ifdef RPIAE_WITH_TENSORRT
    if (device.rfind("cuda:", 0) == 0) cuda_check(cudaSetDevice(std::stoi(device.substr(5))), "cudaSetDevice");
    return std::make_unique<TRTGraph>(path, version_compatible);
#else
    fail(path + ": this rpiae_run was built without TensorRT (CMake did not find it); rebuild with "
         "-DTENSORRT_ROOT=/path/to/TensorRT on a machine that has it");
#endif
  }
  if (ends_with(path, ".pt2")) {
#ifdef RPIAE_WITH_AOTI
    return std::make_unique<AOTIGraph>(path, graph, device);
#else
    fail(path + ": this rpiae_run was built without libtorch (CMake did not find Torch); rebuild with "
         "-DCMAKE_PREFIX_PATH=$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')");
#endif
  }
  fail(path + ": unknown file type (expected a TensorRT .plan or an AOTInductor .pt2)");
}

void check_shape(const Array& a, const std::vector<int64_t>& want, const std::string& what) {
  if (a.shape != want) fail(what + ": expected shape " + shape_str(want) + ", got " + shape_str(a.shape));
  for (float v : a.data)
    if (!std::isfinite(v)) fail(what + ": contains NaN or Inf");
}

int usage(const char* argv0) {
  std::cerr << "usage: " << argv0
            << " ENCODER DECODER INPUT.ppm [OUTPUT.ppm] [--latent FILE] [--raw FILE] [--device cpu|cuda[:N]]"
               " [--version-compatible]\n"
               "  ENCODER/DECODER: TensorRT .plan files or AOTInductor .pt2 packages (both the same kind)\n"
               "  INPUT: binary PPM (P6) of the encoder's image size (256x256 for RPiAE); OUTPUT defaults to reconstruction.ppm\n"
               "  --latent / --raw: also write the latent / unclamped image as float32 NCHW\n"
               "  --version-compatible: the .plan files were exported with --version-compatible (lets TensorRT\n"
               "    run the lean runtime they carry: only for plans you trust, e.g. from your own export)\n"
               "built with:"
#ifdef RPIAE_WITH_TENSORRT
               " TensorRT"
#endif
#ifdef RPIAE_WITH_AOTI
               " AOTInductor(libtorch)"
#endif
               "\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> pos;
  std::string latent_path, raw_path, device;
  bool version_compatible = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    try {
      if (a == "--latent") latent_path = value();
      else if (a == "--raw") raw_path = value();
      else if (a == "--device") device = value();
      else if (a == "--version-compatible") version_compatible = true;
      else if (a == "-h" || a == "--help") return usage(argv[0]);
      else if (!a.empty() && a[0] == '-') { std::cerr << "unknown option " << a << "\n"; return usage(argv[0]); }
      else pos.push_back(a);
    } catch (const std::invalid_argument& e) {
      std::cerr << e.what() << "\n";
      return usage(argv[0]);
    }
  }
  if (pos.size() < 3 || pos.size() > 4) return usage(argv[0]);
  const std::string out_path = pos.size() == 4 ? pos[3] : "reconstruction.ppm";
  if (device.empty()) device = (ends_with(pos[0], ".plan") || ends_with(pos[0], ".engine")) ? "cuda" : "cpu";
  // keep AOTInductor's generated input checks (shape, dtype, batch bound) on: each model
  // library reads this once, on its first run
  setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", 1);
  try {
    auto encoder = open_graph(pos[0], "encode", device, version_compatible);
    auto decoder = open_graph(pos[1], "decode", device, version_compatible);
    const std::vector<int64_t> in = encoder->input_shape();
    if (in.size() != 3 || in[0] != 3) fail(pos[0] + ": expected a (3, H, W) image input, got " + shape_str(in));
    Array image = read_ppm(pos[2], in[1], in[2]);
    Array latent = encoder->run(image);
    // the latent's channels and grid are the model's (its config's latent_shape): whatever
    // the encoder graph gives, which the decoder graph checks as its input
    if (latent.shape.size() != 4 || latent.shape[0] != 1)
      fail("encoder output: expected a (1, C, H, W) latent, got " + shape_str(latent.shape));
    Array decoded = decoder->run(latent);
    check_shape(decoded, {1, 3, in[1], in[2]}, "decoder output");
    write_ppm(out_path, decoded);
    if (!latent_path.empty()) write_raw(latent_path, latent);
    if (!raw_path.empty()) write_raw(raw_path, decoded);
    std::cout << "encoder: " << encoder->describe() << "\ndecoder: " << decoder->describe() << "\nlatent "
              << shape_str(latent.shape) << " -> " << out_path << "\n";
  } catch (const std::exception& e) {
    std::string msg = e.what();
    const auto nl = msg.find('\n');
    std::cerr << "rpiae_run: error: " << (nl == std::string::npos ? msg : msg.substr(0, nl)) << "\n";
    return 1;
  }
  return 0;
}
