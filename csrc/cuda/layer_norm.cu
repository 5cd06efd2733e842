// LayerNorm on CUDA: the CUDA twin of csrc/cpu/layer_norm.cpp (same checks, outputs, shapes and
// dtypes). This file checks inputs, allocates outputs, dispatches on the dtype, picks a kernel of
// layer_norm_kernels.cuh and launches it on the current stream.
//
// Kernel choice, per call: x (made contiguous) is rows x cols. When all pointers are 16-byte
// aligned and cols is a multiple of the vector width (16 bytes of x), the kernels read 16-byte
// vectors, else single values. A row that fits the registers of at most kRowsMaxThreads threads
// (at most 32 accumulation registers per thread for the forward's row, 16 per array in the
// backward) goes to the *_rows kernels; a longer one to the *_large kernels. With vectors that is
// up to 16384 values forward and 8192 backward (8192 and 4096 for float64); with single values
// up to 4096.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common.h"
#include "cuda/layer_norm_kernels.cuh"

namespace normext::cuda {
namespace {

// Bytes of accumulation values one thread holds per register array (the forward keeps the row;
// the backward keeps xhat, g and the dweight/dbias column sums).
constexpr int kFwdRegisterBytes = 128;
constexpr int kBwdRegisterBytes = 64;
// Partial rows per block in the first stage of the dweight/dbias reduction.
constexpr int64_t kReduceChunk = 128;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Whether a half input's weight and bias (those given, at least one) are all in the input's own
// dtype: the kernels then read them as they are (W = the input's type), instead of a float32 copy
// made per call, a conversion kernel per parameter (launches that cost more than a small
// LayerNorm's own). The op itself accepts a float32 weight beside a half bias (the Python layer
// refuses the mix, as torch does); such a pair takes the float32 copies.
bool params_in_input_dtype(const at::Tensor& x,
                           std::initializer_list<const c10::optional<at::Tensor>*> params) {
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return false;
  bool any = false;
  for (const c10::optional<at::Tensor>* p : params) {
    if (!p->has_value() || !(*p)->defined()) continue;
    if ((*p)->scalar_type() != x.scalar_type()) return false;
    any = true;
  }
  return any;
}

// A parameter as a flat contiguous tensor: as it is where `own`, else in the statistics' dtype.
at::Tensor param_flat(const c10::optional<at::Tensor>& p, bool own, at::ScalarType acc) {
  if (!own) return param_as_acc(p, acc);
  if (!p.has_value() || !p->defined()) return at::Tensor();
  return p->reshape({-1}).contiguous();
}

template <typename W>
struct TypeTag {
  using type = W;
};

// f(TypeTag<W>) with W the parameters' element type: T where `own` (a half input), else A.
template <typename T, typename A, typename F>
void with_param_type(bool own, F&& f) {
  if constexpr (!std::is_same_v<T, A>) {
    if (own) {
      f(TypeTag<T>{});
      return;
    }
  }
  f(TypeTag<A>{});
}

// Vectors of VEC values per thread at most (a power of two, at most 8) for `bytes` per array.
template <typename A, int VEC>
constexpr int max_items(int bytes) {
  const int n = bytes / (VEC * static_cast<int>(sizeof(A)));
  return n >= 8 ? 8 : n >= 4 ? 4 : n >= 2 ? 2 : 1;
}

// Launch shape of a *_rows kernel: threads per row (a power of two in [32, kRowsMaxThreads]),
// vectors per thread (a power of two <= max_items) and rows per block. The fewest threads that
// cover the row: a warp per row for short rows, the block then holding several rows.
struct RowsConfig {
  int threads_per_row = 0;
  int items = 0;
  int rows_per_block = 0;
};

bool pick_rows_config(int64_t nvec, int max_items_per_thread, RowsConfig& cfg) {
  int threads = kWarpSize;
  while (threads < kRowsMaxThreads && static_cast<int64_t>(threads) * max_items_per_thread < nvec)
    threads *= 2;
  if (static_cast<int64_t>(threads) * max_items_per_thread < nvec) return false;
  int items = 1;
  while (static_cast<int64_t>(threads) * items < nvec) items *= 2;
  cfg.threads_per_row = threads;
  cfg.items = items;
  cfg.rows_per_block = std::max(1, 128 / threads);
  return true;
}

// Blocks of `threads` threads of `kernel` that the device runs at once.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return static_cast<int64_t>(std::max(per_sm, 1)) *
         at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Calls f(std::integral_constant<int, items>) for items in {1, 2, 4, 8}, items <= kMaxItems.
template <int kMaxItems, typename F>
void with_items(int items, F&& f) {
  switch (items) {
    case 1:
      f(std::integral_constant<int, 1>{});
      return;
    case 2:
      if constexpr (kMaxItems >= 2) {
        f(std::integral_constant<int, 2>{});
        return;
      }
      break;
    case 4:
      if constexpr (kMaxItems >= 4) {
        f(std::integral_constant<int, 4>{});
        return;
      }
      break;
    case 8:
      if constexpr (kMaxItems >= 8) {
        f(std::integral_constant<int, 8>{});
        return;
      }
      break;
  }
  TORCH_CHECK(false, "normext: internal error, no LayerNorm kernel for ", str_of(int64_t{items}),
              " vectors per thread");
}

template <typename T, typename A, int VEC, typename W>
void launch_fwd(const LayerNormFwdParams<T, A, W>& p, cudaStream_t stream) {
  constexpr int kMax = max_items<A, VEC>(kFwdRegisterBytes);
  RowsConfig cfg;
  if (pick_rows_config(p.cols / VEC, kMax, cfg)) {
    with_items<kMax>(cfg.items, [&](auto items) {
      auto kernel = layer_norm_fwd_rows_kernel<T, A, VEC, decltype(items)::value, W>;
      const int threads = cfg.threads_per_row * cfg.rows_per_block;
      const int64_t blocks = std::min(ceil_div(p.rows, cfg.rows_per_block),
                                      resident_blocks(kernel, threads));
      const dim3 block(cfg.threads_per_row, cfg.rows_per_block);
      kernel<<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  auto kernel = layer_norm_fwd_large_kernel<T, A, VEC, W>;
  const int64_t blocks = std::min(p.rows, resident_blocks(kernel, kLargeThreads));
  kernel<<<static_cast<unsigned>(blocks), kLargeThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename A, int VEC, typename W>
void launch_bwd(LayerNormBwdParams<T, A, W> p, A* dweight, A* dbias, const at::TensorOptions& acc,
                cudaStream_t stream) {
  const bool sums = dweight != nullptr || dbias != nullptr;
  at::Tensor parts_buf;
  int64_t parts = 0;
  // dweight/dbias partial sums: one (parts, cols) slab per requested gradient.
  auto alloc_parts = [&](int64_t n) {
    parts = n;
    const int64_t slabs = (dweight != nullptr) + (dbias != nullptr);
    parts_buf = at::empty({slabs, parts, p.cols}, acc);
    A* base = parts_buf.mutable_data_ptr<A>();
    p.part_dweight = dweight != nullptr ? base : nullptr;
    p.part_dbias = dbias != nullptr ? base + (dweight != nullptr ? parts * p.cols : 0) : nullptr;
  };

  constexpr int kMax = max_items<A, VEC>(kBwdRegisterBytes);
  RowsConfig cfg;
  if (pick_rows_config(p.cols / VEC, kMax, cfg)) {
    with_items<kMax>(cfg.items, [&](auto items) {
      auto kernel = layer_norm_bwd_rows_kernel<T, A, VEC, decltype(items)::value, W>;
      const int threads = cfg.threads_per_row * cfg.rows_per_block;
      const int64_t blocks = std::min(ceil_div(p.rows, cfg.rows_per_block),
                                      resident_blocks(kernel, threads));
      if (sums) alloc_parts(blocks * cfg.rows_per_block);
      const dim3 block(cfg.threads_per_row, cfg.rows_per_block);
      kernel<<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    if (p.dx != nullptr) {
      auto kernel = layer_norm_bwd_large_kernel<T, A, VEC, W>;
      const int64_t blocks = std::min(p.rows, resident_blocks(kernel, kLargeThreads));
      kernel<<<static_cast<unsigned>(blocks), kLargeThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (sums) {
      // Enough (column block, row slice) blocks to fill the device a few times over.
      const int64_t col_blocks = ceil_div(p.cols, kWarpSize);
      const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      const int64_t want = std::clamp<int64_t>(ceil_div(8 * sms, col_blocks), 1, 1024);
      const int64_t slices = std::min(want, ceil_div(p.rows, kColThreadsY));
      const int64_t rows_per_part = ceil_div(p.rows, slices);
      alloc_parts(ceil_div(p.rows, rows_per_part));
      const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(parts));
      layer_norm_bwd_col_partials_kernel<T, A, W>
          <<<grid, dim3(kWarpSize, kColThreadsY), 0, stream>>>(p, rows_per_part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (!sums) return;
  // dweight/dbias = column sums of the partial rows. Many partial rows are first summed in chunks
  // of kReduceChunk rows (more blocks in flight than one block per 32 columns would give).
  auto reduce = [&](const A* in_dw, const A* in_db, A* out_dw, A* out_db, int64_t rows,
                    int64_t rows_per_chunk) {
    const dim3 grid(static_cast<unsigned>(ceil_div(p.cols, kWarpSize)),
                    static_cast<unsigned>(ceil_div(rows, rows_per_chunk)));
    layer_norm_bwd_param_reduce_kernel<A><<<grid, dim3(kWarpSize, kColThreadsY), 0, stream>>>(
        in_dw, in_db, out_dw, out_db, rows, rows_per_chunk, p.cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const A* in_dw = p.part_dweight;
  const A* in_db = p.part_dbias;
  at::Tensor stage;
  if (parts > 2 * kReduceChunk) {
    const int64_t chunks = ceil_div(parts, kReduceChunk);
    stage = at::empty({parts_buf.size(0), chunks, p.cols}, acc);
    A* base = stage.mutable_data_ptr<A>();
    A* stage_dw = dweight != nullptr ? base : nullptr;
    A* stage_db = dbias != nullptr ? base + (dweight != nullptr ? chunks * p.cols : 0) : nullptr;
    reduce(in_dw, in_db, stage_dw, stage_db, parts, kReduceChunk);
    in_dw = stage_dw;
    in_db = stage_db;
    parts = chunks;
  }
  reduce(in_dw, in_db, dweight, dbias, parts, parts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& input, int64_t normalized_ndim, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  const LnShape ln =
      check_ln_fwd_args(input, normalized_ndim, weight, bias, "normext::layer_norm_fwd", at::kCUDA);
  const int64_t axis = ln.axis, M = ln.m, N = ln.n;
  const c10::cuda::CUDAGuard guard(input.device());
  const auto acc = acc_dtype(input.scalar_type());
  at::Tensor x = input.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty(x.sizes().slice(0, axis), x.options().dtype(acc));
  at::Tensor rstd = at::empty(x.sizes().slice(0, axis), x.options().dtype(acc));
  if (M == 0) return {y, mean, rstd};
  if (N == 0) {  // as on the CPU: mean 0, rstd 1 / sqrt(eps)
    mean.zero_();
    rstd.fill_(1.0 / std::sqrt(eps));
    return {y, mean, rstd};
  }
  const bool own = params_in_input_dtype(x, {&weight, &bias});
  at::Tensor w = param_flat(weight, own, acc), b = param_flat(bias, own, acc);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cuda",
                                  [&] {
    using A = acc_t<scalar_t>;
    with_param_type<scalar_t, A>(own, [&](auto wtag) {
      using W = typename decltype(wtag)::type;
      constexpr int V = kVecWidth<scalar_t>;
      LayerNormFwdParams<scalar_t, A, W> p;
      p.x = x.const_data_ptr<scalar_t>();
      p.y = y.mutable_data_ptr<scalar_t>();
      p.mean = mean.mutable_data_ptr<A>();
      p.rstd = rstd.mutable_data_ptr<A>();
      p.weight = ptr_or_null<W>(w);
      p.bias = ptr_or_null<W>(b);
      p.rows = M;
      p.cols = N;
      p.inv_cols = static_cast<A>(1.0 / static_cast<double>(N));
      p.eps = static_cast<A>(eps);
      const bool vec = N % V == 0 && aligned16(p.x) && aligned16(p.y) && aligned16(p.weight) &&
                       aligned16(p.bias);
      if (vec) {
        launch_fwd<scalar_t, A, V>(p, stream);
      } else {
        launch_fwd<scalar_t, A, 1>(p, stream);
      }
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, int64_t normalized_ndim,
    const at::Tensor& mean, const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
    std::array<bool, 3> mask) {
  const LnShape ln = check_ln_bwd_args(grad_out, input, normalized_ndim, mean, rstd, weight,
                                       "normext::layer_norm_bwd", at::kCUDA);
  const int64_t axis = ln.axis, M = ln.m, N = ln.n;
  const auto acc = acc_dtype(input.scalar_type());
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor x = input.contiguous(), dy = grad_out.contiguous();
  at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const bool own = params_in_input_dtype(x, {&weight});
  at::Tensor w = param_flat(weight, own, acc);
  at::Tensor dx = mask[0] ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  auto param_shape = x.sizes().slice(axis);
  auto acc_opts = x.options().dtype(acc);
  at::Tensor dw = mask[1] ? at::empty(param_shape, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor db = mask[2] ? at::empty(param_shape, acc_opts) : at::empty({0}, acc_opts);
  if (N == 0) return {dx, dw, db};
  if (M == 0) {  // sums over no rows
    if (mask[1]) dw.zero_();
    if (mask[2]) db.zero_();
    return {dx, dw, db};
  }
  if (!mask[0] && !mask[1] && !mask[2]) return {dx, dw, db};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd_cuda",
                                  [&] {
    using A = acc_t<scalar_t>;
    with_param_type<scalar_t, A>(own, [&](auto wtag) {
      using W = typename decltype(wtag)::type;
      constexpr int V = kVecWidth<scalar_t>;
      LayerNormBwdParams<scalar_t, A, W> p;
      p.dy = dy.const_data_ptr<scalar_t>();
      p.x = x.const_data_ptr<scalar_t>();
      p.mean = mean_c.const_data_ptr<A>();
      p.rstd = rstd_c.const_data_ptr<A>();
      p.weight = ptr_or_null<W>(w);
      p.dx = mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr;
      p.part_dweight = nullptr;
      p.part_dbias = nullptr;
      p.rows = M;
      p.cols = N;
      p.inv_cols = static_cast<A>(1.0 / static_cast<double>(N));
      A* dwp = mask[1] ? dw.mutable_data_ptr<A>() : nullptr;
      A* dbp = mask[2] ? db.mutable_data_ptr<A>() : nullptr;
      const bool vec = N % V == 0 && aligned16(p.x) && aligned16(p.dy) && aligned16(p.dx) &&
                       aligned16(p.weight);
      if (vec) {
        launch_bwd<scalar_t, A, V>(p, dwp, dbp, acc_opts, stream);
      } else {
        launch_bwd<scalar_t, A, 1>(p, dwp, dbp, acc_opts, stream);
      }
    });
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}

}  // namespace normext::cuda
