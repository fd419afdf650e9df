// lrdeploy_runner: run a TVM Relax artifact (model.so) on a board that has no Python.
//
//   lrdeploy_runner model.so [-i INPUT]... [-o OUTDIR] [--runs N] [--warmup N]
//
// INPUT is an .npy file, or a raw little-endian file given as PATH@DIMS:DTYPE
// (e.g. ids.bin@1x32:int64), one per model input in the manifest's order. Outputs are written
// to OUTDIR/output_K.npy. The last line printed is JSON: runs, warmup, median/min/max ms.
//
// Only the tvm/ffi API is used (the aarch64 wheels ship incomplete tvm/runtime headers);
// libtvm_runtime.so must be linked so that it registers the module loaders and the VM.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// TVM's kernels assume 64-byte aligned tensors (vector loads); malloc gives only 16.
constexpr size_t kAlignment = 64;

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = std::max<size_t>(ffi::GetDataSize(*t), 1);
    t->data = std::aligned_alloc(kAlignment, (bytes + kAlignment - 1) / kAlignment * kAlignment);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct DTypeName {
  const char* npy;   // numpy descr, little endian
  const char* name;  // manifest / raw-file spelling
  DLDataType dl;
};

const DTypeName kDTypes[] = {
    {"<f4", "float32", {kDLFloat, 32, 1}}, {"<f8", "float64", {kDLFloat, 64, 1}},
    {"<f2", "float16", {kDLFloat, 16, 1}}, {"<i8", "int64", {kDLInt, 64, 1}},
    {"<i4", "int32", {kDLInt, 32, 1}},     {"|i1", "int8", {kDLInt, 8, 1}},
    {"|u1", "uint8", {kDLUInt, 8, 1}},     {"|b1", "bool", {kDLBool, 8, 1}},
};

const DTypeName& FindDType(const std::string& key) {
  for (const auto& d : kDTypes) {
    if (key == d.npy || key == d.name) return d;
  }
  throw std::runtime_error("unsupported dtype " + key);
}

const DTypeName& FindDType(DLDataType dl) {
  for (const auto& d : kDTypes) {
    if (d.dl.code == dl.code && d.dl.bits == dl.bits) return d;
  }
  throw std::runtime_error("unsupported output dtype");
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

ffi::Tensor MakeTensor(const std::vector<int64_t>& shape, DLDataType dtype, const char* data,
                       size_t bytes, const std::string& source) {
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                           dtype, DLDevice{kDLCPU, 0});
  size_t expected = ffi::GetDataSize(static_cast<size_t>(t.numel()), dtype);
  if (bytes != expected) {
    throw std::runtime_error(source + ": holds " + std::to_string(bytes) + " bytes, shape needs " +
                             std::to_string(expected));
  }
  std::memcpy(t.data_ptr(), data, bytes);
  return t;
}

// NPY format 1.0/2.0: magic, version, header length, a Python dict literal, then the data.
ffi::Tensor LoadNpy(const std::string& path) {
  std::string raw = ReadFile(path);
  if (raw.size() < 10 || raw.compare(0, 6, "\x93NUMPY") != 0) {
    throw std::runtime_error(path + ": not an .npy file");
  }
  size_t header_len, offset;
  if (raw[6] == 1) {
    header_len = static_cast<uint8_t>(raw[8]) | (static_cast<uint8_t>(raw[9]) << 8);
    offset = 10;
  } else {
    header_len = 0;
    for (int i = 0; i < 4; ++i) header_len |= static_cast<size_t>(static_cast<uint8_t>(raw[8 + i])) << (8 * i);
    offset = 12;
  }
  std::string header = raw.substr(offset, header_len);
  auto field = [&](const std::string& key) {
    size_t at = header.find("'" + key + "'");
    if (at == std::string::npos) throw std::runtime_error(path + ": npy header lacks " + key);
    return header.substr(header.find(':', at) + 1);
  };
  std::string descr = field("descr");
  descr = descr.substr(descr.find('\'') + 1);
  descr = descr.substr(0, descr.find('\''));
  if (field("fortran_order").find("True") < field("fortran_order").find(',')) {
    throw std::runtime_error(path + ": Fortran-ordered arrays are not supported");
  }
  std::string shape_text = field("shape");
  shape_text = shape_text.substr(shape_text.find('(') + 1);
  shape_text = shape_text.substr(0, shape_text.find(')'));
  std::vector<int64_t> shape;
  std::stringstream dims(shape_text);
  for (std::string dim; std::getline(dims, dim, ',');) {
    if (dim.find_first_of("0123456789") != std::string::npos) shape.push_back(std::stoll(dim));
  }
  size_t data_at = offset + header_len;
  return MakeTensor(shape, FindDType(descr).dl, raw.data() + data_at, raw.size() - data_at, path);
}

// PATH@2x3:float32
ffi::Tensor LoadRaw(const std::string& spec) {
  size_t at = spec.rfind('@'), colon = spec.rfind(':');
  if (at == std::string::npos || colon == std::string::npos || colon < at) {
    throw std::runtime_error(spec + ": expected PATH@DIMS:DTYPE");
  }
  std::string path = spec.substr(0, at);
  std::vector<int64_t> shape;
  std::stringstream dims(spec.substr(at + 1, colon - at - 1));
  for (std::string dim; std::getline(dims, dim, 'x');) shape.push_back(std::stoll(dim));
  std::string raw = ReadFile(path);
  return MakeTensor(shape, FindDType(spec.substr(colon + 1)).dl, raw.data(), raw.size(), path);
}

void SaveNpy(const ffi::Tensor& t, const std::string& path) {
  std::string shape = "(";
  for (int64_t d : t.shape()) shape += std::to_string(d) + ",";
  if (t.shape().size() > 1) shape.pop_back();
  shape += ")";
  std::string header = "{'descr': '" + std::string(FindDType(t.dtype()).npy) +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error(path + ": cannot write");
  out.write("\x93NUMPY\x01\x00", 8);
  uint16_t len = static_cast<uint16_t>(header.size());
  out.put(static_cast<char>(len & 0xff)).put(static_cast<char>(len >> 8));
  out << header;
  out.write(static_cast<const char*>(t.data_ptr()),
            ffi::GetDataSize(static_cast<size_t>(t.numel()), t.dtype()));
}

std::vector<ffi::Tensor> Outputs(const ffi::Any& result) {
  if (auto tensor = result.try_cast<ffi::Tensor>()) return {*tensor};
  std::vector<ffi::Tensor> outputs;
  for (const ffi::Any& item : result.cast<ffi::Array<ffi::Any>>()) {
    auto nested = Outputs(item);
    outputs.insert(outputs.end(), nested.begin(), nested.end());
  }
  return outputs;
}

int Usage() {
  std::cerr << "usage: lrdeploy_runner model.so [-i INPUT]... [-o OUTDIR] [--runs N] "
               "[--warmup N]\n  INPUT: file.npy or PATH@DIMSxDIMS:DTYPE (raw little endian)\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Usage();
  std::string model = argv[1], out_dir;
  std::vector<std::string> inputs;
  int runs = 10, warmup = 2;
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (i + 1 >= argc) return Usage();
    if (arg == "-i") inputs.push_back(argv[++i]);
    else if (arg == "-o") out_dir = argv[++i];
    else if (arg == "--runs") runs = std::max(1, std::atoi(argv[++i]));
    else if (arg == "--warmup") warmup = std::max(0, std::atoi(argv[++i]));
    else return Usage();
  }
  try {
    // The outputs' folder is made first, so that one that cannot be made fails before the runs.
    if (!out_dir.empty()) std::filesystem::create_directories(out_dir);
    // dlopen searches the library path for a bare file name; the user means this folder.
    ffi::Module lib = ffi::Module::LoadFromFile(std::filesystem::absolute(model).string());
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    // device type, device id, allocator (2 = pooled), as relax.VirtualMachine does for a CPU.
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    ffi::Function entry = vm->GetFunction("main").value();

    std::vector<ffi::Any> args;
    for (const std::string& spec : inputs) {
      bool npy = spec.size() > 4 && spec.compare(spec.size() - 4, 4, ".npy") == 0;
      args.emplace_back(npy ? LoadNpy(spec) : LoadRaw(spec));
    }
    auto call = [&]() {
      ffi::Any result;
      entry.CallPacked(reinterpret_cast<const ffi::AnyView*>(args.data()),
                       static_cast<int32_t>(args.size()), &result);
      return result;
    };
    ffi::Any result;
    for (int i = 0; i < warmup; ++i) result = call();
    std::vector<double> ms;
    for (int i = 0; i < runs; ++i) {
      auto start = std::chrono::steady_clock::now();
      result = call();
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::vector<ffi::Tensor> outputs = Outputs(result);
    if (!out_dir.empty()) {
      for (size_t k = 0; k < outputs.size(); ++k) {
        SaveNpy(outputs[k], out_dir + "/output_" + std::to_string(k) + ".npy");
      }
    }
    std::sort(ms.begin(), ms.end());
    std::printf("{\"outputs\": %zu, \"runs\": %d, \"warmup\": %d, \"median_ms\": %.6f, "
                "\"min_ms\": %.6f, \"max_ms\": %.6f}\n",
                outputs.size(), runs, warmup, ms[ms.size() / 2], ms.front(), ms.back());
  } catch (const std::exception& e) {
    std::cerr << "lrdeploy_runner: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
