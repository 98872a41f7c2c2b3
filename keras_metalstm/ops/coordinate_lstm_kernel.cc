// A fused CPU kernel for one step of the coordinate-wise LSTM (layer 1 of the meta-learner), forward and
// backward.
//
// Why: the step runs over every learner coordinate (~28k for conv4) at every inner step. Written with stock
// TensorFlow ops it is a (4U x K) x (K x coordinates) product followed by a dozen element-wise ops, each of
// which streams a 4U x coordinates tensor through memory; its gradient twice as many. Here a block of
// coordinates is carried through the whole step while it sits in the cache, so the memory traffic is just
// the inputs and outputs.
//
// Equations, gate order and layout are those of CoordinateLSTM (keras_metalstm/layers/coordinate_lstm.py),
// features first:
//   inputs (KX, E, C), hidden and cell (U, E, C), input_kernel (KX, 4U), recurrent_kernel (U, 4U),
//   gate_bias (4U, E) (the layer's bias plus the episode's shared-input contribution).
//   gates = [inputs; hidden]^T . [input_kernel; recurrent_kernel] + gate_bias, split into i, f, g, o;
//   cell' = sigmoid(f) * cell + sigmoid(i) * tanh(g);  hidden' = sigmoid(o) * tanh(cell').
// It also returns readout (R, E, C) = readout_kernel^T . hidden' for a readout_kernel (U, R): the
// meta-learner cell's products of h_t with its gate weights, which as a separate (2 x U) x (U x C) product
// cost more than the whole fused step.
// The backward op recomputes the gates instead of storing them (four times the size of the state).

#include <immintrin.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace keras_metalstm {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
using ::tensorflow::shape_inference::InferenceContext;

REGISTER_OP("MetaLstmCoordinateStep")
    .Input("inputs: float")
    .Input("hidden: float")
    .Input("cell: float")
    .Input("input_kernel: float")
    .Input("recurrent_kernel: float")
    .Input("gate_bias: float")
    .Input("readout_kernel: float")
    .Output("new_hidden: float")
    .Output("new_cell: float")
    .Output("readout: float")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(1));
      c->set_output(1, c->input(2));
      c->set_output(2, c->MakeShape({c->Dim(c->input(6), 1), c->Dim(c->input(1), 1), c->Dim(c->input(1), 2)}));
      return Status();
    });

REGISTER_OP("MetaLstmCoordinateStepGrad")
    .Input("inputs: float")
    .Input("hidden: float")
    .Input("cell: float")
    .Input("input_kernel: float")
    .Input("recurrent_kernel: float")
    .Input("gate_bias: float")
    .Input("readout_kernel: float")
    .Input("new_hidden_grad: float")
    .Input("new_cell_grad: float")
    .Input("readout_grad: float")
    .Output("inputs_grad: float")
    .Output("hidden_grad: float")
    .Output("cell_grad: float")
    .Output("input_kernel_grad: float")
    .Output("recurrent_kernel_grad: float")
    .Output("gate_bias_grad: float")
    .Output("readout_kernel_grad: float")
    .SetShapeFn([](InferenceContext* c) {
      for (int i = 0; i < 7; ++i) c->set_output(i, c->input(i));
      return Status();
    });

REGISTER_OP("MetaLstmKernelArithmetic")
    .Output("description: string")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Scalar());
      return Status();
    });

namespace {

// One register of float lanes: sixteen with AVX-512, else eight (one AVX register; the compiler splits it
// where the CPU has narrower vectors). The matrix products below are written on these so that the
// accumulators stay in registers.
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef int IntVec __attribute__((vector_size(4 * kLanes)));
// A block of coordinates, carried through a step together, is eight registers wide (128 coordinates with
// AVX-512, 64 with AVX): a row of a block product is then eight independent accumulator chains, enough to keep
// both FMA units busy. Measured on AVX-512 against 64 coordinates (benchmarks/fused_kernel.py): forward and
// backward together ~1.25x faster, as every per-block cost (the kernel gradient's partial sums, each row's
// gather) is paid half as often, while the block's gates (40 KB) still fit in the L1 cache.
constexpr int kVectors = 8;
constexpr int kBlock = kVectors * kLanes;

// e^x as 2^n * (1 + q), inlined (a library call per vector costs more than the arithmetic): Cody-Waite range
// reduction x = n ln2 + r, then the Cephes polynomial for q = e^r - 1 on |r| <= ln2 / 2 (relative error ~1e-7).
// Exp and ExpMinusOne put the parts together; x must lie in [-87, 88].
struct ExpParts {
  Vec scale;  // 2^n
  Vec q;      // e^r - 1
};

inline ExpParts SplitExp(Vec x) {
  // Round x / ln2 to the nearest integer: adding 1.5 * 2^23 pushes the fraction out of the mantissa.
  const Vec shifted = x * 1.44269504f + 12582912.0f;
  const Vec n = shifted - 12582912.0f;
  const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const IntVec exponent = (reinterpret_cast<const IntVec&>(shifted) - 0x4B400000 + 127) << 23;
  return {reinterpret_cast<const Vec&>(exponent), p * r * r + r};
}

inline Vec Exp(Vec x) {
  x = x < -87.0f ? Vec{} - 87.0f : x;
  x = x > 88.0f ? Vec{} + 88.0f : x;
  const ExpParts parts = SplitExp(x);
  return (parts.q + 1.0f) * parts.scale;
}

// e^x - 1 without the cancellation of Exp(x) - 1 near 0: where |x| < ln2 / 2, n = 0 and it is q itself, whose
// relative error does not grow as x shrinks; elsewhere |e^x - 1| > 0.29 and nothing cancels.
inline Vec ExpMinusOne(Vec x) {
  const ExpParts parts = SplitExp(x);
  return parts.q * parts.scale + (parts.scale - 1.0f);
}

// 1 / x from the hardware's approximate reciprocal and one Newton step (relative error ~1e-7 or better):
// several times the throughput of a division, which would otherwise dominate the activations.
inline Vec Reciprocal(Vec x) {
#if defined(__AVX512F__)
  const Vec estimate = reinterpret_cast<Vec>(_mm512_rcp14_ps(reinterpret_cast<__m512>(x)));
#elif defined(__AVX__)
  const Vec estimate = reinterpret_cast<Vec>(_mm256_rcp_ps(reinterpret_cast<__m256>(x)));
#else
  const Vec estimate = 1.0f / x;
#endif
  return estimate * (2.0f - x * estimate);
}

// Relative error ~3e-7 (measured against float64 in the tests) from x = -87, where Exp stops, upwards: near 0,
// 1 + e^-x is ~2 and nothing cancels.
inline Vec Sigmoid(Vec x) { return Reciprocal(1.0f + Exp(-x)); }

// tanh(x) = (e^2x - 1) / (e^2x + 1) with e^2x - 1 from ExpMinusOne: a small relative error at every magnitude
// (~3e-7, measured against float64 in the tests). The former 2 / (1 + e^-2x) - 1 subtracted two numbers near 1,
// with an absolute error of ~1e-7 whatever x, so at |x| = 1e-6 its relative error was ~10%; pre-activations and
// cell states that small do occur. Beyond |x| = 10 tanh is +-1 in float (and e^2x would leave the reciprocal's
// range).
inline Vec Tanh(Vec x) {
  x = x < -10.0f ? Vec{} - 10.0f : x;
  x = x > 10.0f ? Vec{} + 10.0f : x;
  const Vec e = ExpMinusOne(2.0f * x);
  return e * Reciprocal(e + 2.0f);
}

struct Dims {
  int features;         // KX: per-coordinate input features
  int units;            // U
  int episodes;         // E
  int64_t coordinates;  // C
  int readouts;         // R
  int gates() const { return 4 * units; }
  int stacked() const { return features + units; }
  int64_t blocks_per_episode() const { return (coordinates + kBlock - 1) / kBlock; }
  int64_t row_stride() const { return static_cast<int64_t>(episodes) * coordinates; }
};

// Checks the shapes of the six forward inputs and returns their sizes.
Status ReadDims(OpKernelContext* context, Dims* dims) {
  const Tensor& inputs = context->input(0);
  const Tensor& hidden = context->input(1);
  const Tensor& cell = context->input(2);
  const Tensor& input_kernel = context->input(3);
  const Tensor& recurrent_kernel = context->input(4);
  const Tensor& gate_bias = context->input(5);
  const Tensor& readout_kernel = context->input(6);
  if (inputs.dims() != 3 || hidden.dims() != 3) {
    return InvalidArgument("inputs and hidden must have rank 3 (features, episodes, coordinates), got ",
                           inputs.shape().DebugString(), " and ", hidden.shape().DebugString());
  }
  dims->features = static_cast<int>(inputs.dim_size(0));
  dims->units = static_cast<int>(hidden.dim_size(0));
  dims->episodes = static_cast<int>(inputs.dim_size(1));
  dims->coordinates = inputs.dim_size(2);
  if (readout_kernel.dims() != 2 || readout_kernel.dim_size(0) != dims->units) {
    return InvalidArgument("readout_kernel must have shape (units, readouts) = (", dims->units,
                           ", R), got ", readout_kernel.shape().DebugString());
  }
  dims->readouts = static_cast<int>(readout_kernel.dim_size(1));
  const int gates = dims->gates();
  if (hidden.dim_size(1) != dims->episodes || hidden.dim_size(2) != dims->coordinates ||
      cell.shape() != hidden.shape()) {
    return InvalidArgument("hidden and cell must both have shape (units, ", dims->episodes, ", ",
                           dims->coordinates, "), got ", hidden.shape().DebugString(), " and ",
                           cell.shape().DebugString());
  }
  if (input_kernel.shape() != TensorShape({dims->features, gates}) ||
      recurrent_kernel.shape() != TensorShape({dims->units, gates}) ||
      gate_bias.shape() != TensorShape({gates, dims->episodes})) {
    return InvalidArgument("kernel shapes do not match: input_kernel ", input_kernel.shape().DebugString(),
                           ", recurrent_kernel ", recurrent_kernel.shape().DebugString(), ", gate_bias ",
                           gate_bias.shape().DebugString(), " for ", dims->features, " features and ",
                           dims->units, " units");
  }
  return Status();
}

// Where a block of coordinates lives: episode e, coordinates [start, start + count).
struct Block {
  int episode;
  int64_t offset;  // e * C + start, the block's first element in every (features, E, C) row
  int count;
};

Block BlockAt(const Dims& dims, int64_t index) {
  const int episode = static_cast<int>(index / dims.blocks_per_episode());
  const int64_t start = (index % dims.blocks_per_episode()) * kBlock;
  return {episode, episode * dims.coordinates + start,
          static_cast<int>(std::min<int64_t>(kBlock, dims.coordinates - start))};
}

// An unaligned view of one register of floats: a block's row in a tensor starts anywhere.
typedef float UnalignedVec __attribute__((vector_size(4 * kLanes), aligned(4)));

// Copies row r of a (rows, E, C) tensor's block into `target` (kBlock floats), zero-padded. Whole registers at
// a time, as the block is read back: a register read from two narrower stores that have not yet reached the
// cache waits for them (failed store forwarding), and the gate gradients read their rows right after the copy.
void Gather(const Dims& dims, const float* tensor, int row, const Block& block, float* target) {
  const float* source = tensor + row * dims.row_stride() + block.offset;
  // A block reads ~40 rows far apart, more streams than the hardware prefetcher follows: ask for the next
  // block's part of this row now, so it is in the cache when that block starts.
  for (int line = 0; line < kBlock; line += 16) __builtin_prefetch(source + kBlock + line);
  if (block.count == kBlock) {
    Vec* vectors = reinterpret_cast<Vec*>(target);
    for (int v = 0; v < kVectors; ++v) vectors[v] = *reinterpret_cast<const UnalignedVec*>(source + v * kLanes);
    return;
  }
  std::copy(source, source + block.count, target);
  std::fill(target + block.count, target + kBlock, 0.0f);
}

void Scatter(const Dims& dims, const float* source, int row, const Block& block, float* tensor) {
  float* target = tensor + row * dims.row_stride() + block.offset;
  if (block.count == kBlock) {
    const Vec* vectors = reinterpret_cast<const Vec*>(source);
    for (int v = 0; v < kVectors; ++v) *reinterpret_cast<UnalignedVec*>(target + v * kLanes) = vectors[v];
    return;
  }
  std::copy(source, source + block.count, target);
}

// Per-thread scratch memory of one block, all of it kBlock-wide rows.
struct Scratch {
  explicit Scratch(const Dims& dims)
      : stacked(dims.stacked() * kVectors), activations(dims.gates() * kVectors),
        gate_grads(dims.gates() * kVectors), cell(dims.units * kVectors), hidden_grad(dims.units * kVectors),
        cell_grad(dims.units * kVectors) {}
  static float* Row(std::vector<Vec>& rows, int row) { return reinterpret_cast<float*>(&rows[row * kVectors]); }
  static Vec* Vectors(std::vector<Vec>& rows, int row) { return &rows[row * kVectors]; }
  std::vector<Vec> stacked, activations, gate_grads, cell, hidden_grad, cell_grad;
};

// The forward pass of one block up to the activated gates (i, f, g, o as sigmoid, sigmoid, tanh, sigmoid),
// which land in scratch.activations; scratch.stacked holds [inputs; hidden] and scratch.cell the old cell.
struct BlockForward {
  const Dims& dims;
  const float* inputs;
  const float* hidden;
  const float* cell;
  const float* kernel;     // (stacked, gates): input_kernel rows then recurrent_kernel rows
  const float* gate_bias;  // (gates, episodes)

  void Run(const Block& block, Scratch* scratch) const {
    for (int k = 0; k < dims.features; ++k) Gather(dims, inputs, k, block, Scratch::Row(scratch->stacked, k));
    for (int u = 0; u < dims.units; ++u) {
      Gather(dims, hidden, u, block, Scratch::Row(scratch->stacked, dims.features + u));
      Gather(dims, cell, u, block, Scratch::Row(scratch->cell, u));
    }
    const int gates = dims.gates();
    const Vec* stacked = scratch->stacked.data();
    Vec* activations = scratch->activations.data();
    for (int g = 0; g < gates; ++g) {
      Vec accumulator[kVectors];
      const float bias = gate_bias[g * dims.episodes + block.episode];
      for (int v = 0; v < kVectors; ++v) accumulator[v] = Vec{} + bias;
      for (int k = 0; k < dims.stacked(); ++k) {
        const float weight = kernel[k * gates + g];
        for (int v = 0; v < kVectors; ++v) accumulator[v] += weight * stacked[k * kVectors + v];
      }
      for (int v = 0; v < kVectors; ++v) activations[g * kVectors + v] = accumulator[v];
    }
    const int gate_size = dims.units * kVectors;  // i, f, g, o: sigmoid, sigmoid, tanh, sigmoid
    for (int i = 0; i < 2 * gate_size; ++i) activations[i] = Sigmoid(activations[i]);
    for (int i = 2 * gate_size; i < 3 * gate_size; ++i) activations[i] = Tanh(activations[i]);
    for (int i = 3 * gate_size; i < 4 * gate_size; ++i) activations[i] = Sigmoid(activations[i]);
  }
};

// Concatenates input_kernel and recurrent_kernel row-wise: the stacked kernel of [inputs; hidden].
std::vector<float> StackedKernel(const Dims& dims, const Tensor& input_kernel, const Tensor& recurrent_kernel) {
  std::vector<float> kernel(static_cast<size_t>(dims.stacked()) * dims.gates());
  const auto input_values = input_kernel.flat<float>();
  const auto recurrent_values = recurrent_kernel.flat<float>();
  std::copy(input_values.data(), input_values.data() + input_values.size(), kernel.begin());
  std::copy(recurrent_values.data(), recurrent_values.data() + recurrent_values.size(),
            kernel.begin() + input_values.size());
  return kernel;
}

// The blocks are cut into shards by the size of the problem alone, never by the number of threads: the
// kernel and bias gradients are sums over coordinates, each shard sums its own blocks in order and the shards'
// sums are added in shard order, so the results are bitwise the same with any number of threads (a resumed
// run continues exactly on a machine with another core count). kMaxShards bounds the memory of the shards'
// sums and keeps up to 64 threads busy; kMinBlocksPerShard (2,048 coordinates) keeps a shard's fixed cost (its
// scratch memory, zeroing and adding up the lanes of its partial sums) small against its work: a 28k-coordinate
// episode is cut into 14 shards.
constexpr int64_t kMaxShards = 64;
constexpr int64_t kMinBlocksPerShard = 2048 / kBlock;

int64_t TotalBlocks(const Dims& dims) { return dims.episodes * dims.blocks_per_episode(); }

int ShardCount(const Dims& dims) {
  const int64_t wanted = (TotalBlocks(dims) + kMinBlocksPerShard - 1) / kMinBlocksPerShard;
  return static_cast<int>(std::clamp<int64_t>(wanted, 1, kMaxShards));
}

// Runs work(shard, first_block, end_block) for every shard of ShardCount(dims) on TensorFlow's CPU threads;
// which thread runs a shard does not change what it computes.
template <typename Work>
void ForEachShard(OpKernelContext* context, const Dims& dims, Work work) {
  const int64_t total = TotalBlocks(dims);
  const int shards = ShardCount(dims);
  auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
  pool->ParallelFor(shards, /*cost_per_unit=*/1 << 20, [&](int64_t first_shard, int64_t end_shard) {
    for (int64_t shard = first_shard; shard < end_shard; ++shard) {
      work(static_cast<int>(shard), total * shard / shards, total * (shard + 1) / shards);
    }
  });
}

// Adds the lanes of each partial sum, in lane order, into `sums` (one float per entry).
void SumLanes(const std::vector<Vec>& partials, float* sums) {
  for (size_t i = 0; i < partials.size(); ++i) {
    float sum = 0.0f;
    for (int lane = 0; lane < kLanes; ++lane) sum += partials[i][lane];
    sums[i] = sum;
  }
}

BlockForward MakeForward(OpKernelContext* context, const Dims& dims, const std::vector<float>& kernel) {
  return {dims,
          context->input(0).flat<float>().data(),
          context->input(1).flat<float>().data(),
          context->input(2).flat<float>().data(),
          kernel.data(),
          context->input(5).flat<float>().data()};
}

class CoordinateStepOp : public OpKernel {
 public:
  explicit CoordinateStepOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    Dims dims;
    OP_REQUIRES_OK(context, ReadDims(context, &dims));
    Tensor* new_hidden = nullptr;
    Tensor* new_cell = nullptr;
    Tensor* readout = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, context->input(1).shape(), &new_hidden));
    OP_REQUIRES_OK(context, context->allocate_output(1, context->input(2).shape(), &new_cell));
    OP_REQUIRES_OK(context, context->allocate_output(
                                2, TensorShape({dims.readouts, dims.episodes, dims.coordinates}), &readout));
    const std::vector<float> kernel = StackedKernel(dims, context->input(3), context->input(4));
    const BlockForward forward = MakeForward(context, dims, kernel);
    const float* readout_kernel = context->input(6).flat<float>().data();
    float* hidden_out = new_hidden->flat<float>().data();
    float* cell_out = new_cell->flat<float>().data();
    float* readout_out = readout->flat<float>().data();
    const int units = dims.units;

    ForEachShard(context, dims, [&](int, int64_t first, int64_t end) {
      Scratch scratch(dims);
      Vec cell_row[kVectors], hidden_row[kVectors];
      std::vector<Vec> readout_rows(dims.readouts * kVectors);
      for (int64_t index = first; index < end; ++index) {
        const Block block = BlockAt(dims, index);
        forward.Run(block, &scratch);
        std::fill(readout_rows.begin(), readout_rows.end(), Vec{});
        for (int u = 0; u < units; ++u) {
          const Vec* input_gate = Scratch::Vectors(scratch.activations, u);
          const Vec* forget_gate = Scratch::Vectors(scratch.activations, units + u);
          const Vec* candidate = Scratch::Vectors(scratch.activations, 2 * units + u);
          const Vec* output_gate = Scratch::Vectors(scratch.activations, 3 * units + u);
          const Vec* previous = Scratch::Vectors(scratch.cell, u);
          for (int v = 0; v < kVectors; ++v) {
            cell_row[v] = forget_gate[v] * previous[v] + input_gate[v] * candidate[v];
            hidden_row[v] = output_gate[v] * Tanh(cell_row[v]);
          }
          for (int r = 0; r < dims.readouts; ++r) {
            const float weight = readout_kernel[u * dims.readouts + r];
            for (int v = 0; v < kVectors; ++v) readout_rows[r * kVectors + v] += weight * hidden_row[v];
          }
          Scatter(dims, reinterpret_cast<const float*>(cell_row), u, block, cell_out);
          Scatter(dims, reinterpret_cast<const float*>(hidden_row), u, block, hidden_out);
        }
        for (int r = 0; r < dims.readouts; ++r) {
          Scatter(dims, reinterpret_cast<const float*>(&readout_rows[r * kVectors]), r, block, readout_out);
        }
      }
    });
  }
};

// Rows [first, first + kRows) of the gradient of the stacked [inputs; hidden] block, kernel[row] . gate_grads,
// scattered into inputs_grad or hidden_grad. Rows in pairs: each gate gradient loaded once for both.
template <int kRows>
void StackedRowGrad(const Dims& dims, const float* kernel, const Vec* gate_grads, int first, const Block& block,
                    float* inputs_grad, float* hidden_grad) {
  const int gates = dims.gates();
  Vec accumulator[kRows][kVectors] = {};
  for (int g = 0; g < gates; ++g) {
    for (int r = 0; r < kRows; ++r) {
      const float weight = kernel[(first + r) * gates + g];
      for (int v = 0; v < kVectors; ++v) accumulator[r][v] += weight * gate_grads[g * kVectors + v];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const int row = first + r;
    const float* values = reinterpret_cast<const float*>(accumulator[r]);
    if (row < dims.features) {
      Scatter(dims, values, row, block, inputs_grad);
    } else {
      Scatter(dims, values, row - dims.features, block, hidden_grad);
    }
  }
}

// Kernel gradient rows [first, first + kRows): stacked[row] . gate_grads^T, added per lane to the partial sums
// (row-major, `gates` per row). Rows in pairs: each gate gradient loaded once for both.
template <int kRows>
void KernelGradRows(const Vec* stacked, const Vec* gate_grads, int first, int gates, Vec* partials) {
  Vec rows[kRows][kVectors];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVectors; ++v) rows[r][v] = stacked[(first + r) * kVectors + v];
  }
  for (int g = 0; g < gates; ++g) {
    for (int r = 0; r < kRows; ++r) {
      // Two chains of sums halve the wait on each addition.
      Vec even = rows[r][0] * gate_grads[g * kVectors];
      Vec odd = rows[r][1] * gate_grads[g * kVectors + 1];
      for (int v = 2; v < kVectors; v += 2) {
        even += rows[r][v] * gate_grads[g * kVectors + v];
        odd += rows[r][v + 1] * gate_grads[g * kVectors + v + 1];
      }
      partials[(first + r) * gates + g] += even + odd;
    }
  }
}

// Calls work(rows, first) for rows [0, count) in pairs, then a last single row if count is odd; `rows` is a
// std::integral_constant (2 or 1) so that the work can size its registers at compile time.
template <typename Work>
void InRowPairs(int count, Work work) {
  int first = 0;
  for (; first + 2 <= count; first += 2) work(std::integral_constant<int, 2>{}, first);
  if (first < count) work(std::integral_constant<int, 1>{}, first);
}

class CoordinateStepGradOp : public OpKernel {
 public:
  explicit CoordinateStepGradOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    Dims dims;
    OP_REQUIRES_OK(context, ReadDims(context, &dims));
    const Tensor& hidden_grad_in = context->input(7);
    const Tensor& cell_grad_in = context->input(8);
    const Tensor& readout_grad_in = context->input(9);
    OP_REQUIRES(context,
                hidden_grad_in.shape() == context->input(1).shape() &&
                    cell_grad_in.shape() == context->input(2).shape() &&
                    readout_grad_in.shape() == TensorShape({dims.readouts, dims.episodes, dims.coordinates}),
                InvalidArgument("the gradients of the outputs must have the outputs' shapes"));
    Tensor* outputs[7];
    for (int i = 0; i < 7; ++i) {
      OP_REQUIRES_OK(context, context->allocate_output(i, context->input(i).shape(), &outputs[i]));
    }
    const std::vector<float> kernel = StackedKernel(dims, context->input(3), context->input(4));
    const BlockForward forward = MakeForward(context, dims, kernel);
    const float* hidden_grad = hidden_grad_in.flat<float>().data();
    const float* cell_grad = cell_grad_in.flat<float>().data();
    const float* readout_grad = readout_grad_in.flat<float>().data();
    const float* readout_kernel = context->input(6).flat<float>().data();
    float* inputs_grad = outputs[0]->flat<float>().data();
    float* previous_hidden_grad = outputs[1]->flat<float>().data();
    float* previous_cell_grad = outputs[2]->flat<float>().data();
    const int units = dims.units;
    const int gates = dims.gates();
    const int stacked_rows = dims.stacked();

    // Kernel, bias and readout-kernel gradients are sums over coordinates. Each shard sums its blocks into
    // its own partial sums, one vector of lanes per entry (so the inner loops stay vectorised), then adds
    // their lanes into its row of shard_sums; the rows are added in shard order at the end.
    const int shards = ShardCount(dims);
    const size_t kernel_size = static_cast<size_t>(stacked_rows) * gates;
    const size_t bias_size = static_cast<size_t>(gates) * dims.episodes;
    const size_t readout_size = static_cast<size_t>(units) * dims.readouts;
    const size_t sums_size = kernel_size + bias_size + readout_size;  // one shard's row: kernel, bias, readout
    std::vector<float> shard_sums(shards * sums_size);

    ForEachShard(context, dims, [&](int shard, int64_t first, int64_t end) {
      Scratch scratch(dims);
      std::vector<Vec> kernel_partials(kernel_size, Vec{}), bias_partials(bias_size, Vec{}),
          readout_partials(readout_size, Vec{});
      Vec* kernel_partial = kernel_partials.data();
      Vec* bias_partial = bias_partials.data();
      Vec* readout_partial = readout_partials.data();
      std::vector<Vec> readout_rows(dims.readouts * kVectors);
      Vec previous_row[kVectors];
      for (int64_t index = first; index < end; ++index) {
        const Block block = BlockAt(dims, index);
        forward.Run(block, &scratch);
        for (int r = 0; r < dims.readouts; ++r) {
          Gather(dims, readout_grad, r, block, reinterpret_cast<float*>(&readout_rows[r * kVectors]));
        }
        for (int u = 0; u < units; ++u) {
          // Zero-padded, so padding lanes get zero gate gradients and add nothing to the sums.
          Gather(dims, hidden_grad, u, block, Scratch::Row(scratch.hidden_grad, u));
          Gather(dims, cell_grad, u, block, Scratch::Row(scratch.cell_grad, u));
          const Vec* d_hidden = Scratch::Vectors(scratch.hidden_grad, u);
          const Vec* d_cell = Scratch::Vectors(scratch.cell_grad, u);
          const Vec* input_gate = Scratch::Vectors(scratch.activations, u);
          const Vec* forget_gate = Scratch::Vectors(scratch.activations, units + u);
          const Vec* candidate = Scratch::Vectors(scratch.activations, 2 * units + u);
          const Vec* output_gate = Scratch::Vectors(scratch.activations, 3 * units + u);
          const Vec* previous = Scratch::Vectors(scratch.cell, u);
          Vec* input_grad = Scratch::Vectors(scratch.gate_grads, u);
          Vec* forget_grad = Scratch::Vectors(scratch.gate_grads, units + u);
          Vec* candidate_grad = Scratch::Vectors(scratch.gate_grads, 2 * units + u);
          Vec* output_grad = Scratch::Vectors(scratch.gate_grads, 3 * units + u);
          for (int v = 0; v < kVectors; ++v) {
            const Vec squashed = Tanh(forget_gate[v] * previous[v] + input_gate[v] * candidate[v]);
            // h' reaches the loss directly and through the readout.
            Vec total_hidden_grad = d_hidden[v];
            for (int r = 0; r < dims.readouts; ++r) {
              total_hidden_grad += readout_kernel[u * dims.readouts + r] * readout_rows[r * kVectors + v];
              readout_partial[u * dims.readouts + r] += output_gate[v] * squashed * readout_rows[r * kVectors + v];
            }
            const Vec total_cell_grad =
                d_cell[v] + total_hidden_grad * output_gate[v] * (1.0f - squashed * squashed);
            previous_row[v] = total_cell_grad * forget_gate[v];
            input_grad[v] = total_cell_grad * candidate[v] * input_gate[v] * (1.0f - input_gate[v]);
            forget_grad[v] = total_cell_grad * previous[v] * forget_gate[v] * (1.0f - forget_gate[v]);
            candidate_grad[v] = total_cell_grad * input_gate[v] * (1.0f - candidate[v] * candidate[v]);
            output_grad[v] = total_hidden_grad * squashed * output_gate[v] * (1.0f - output_gate[v]);
          }
          Scatter(dims, reinterpret_cast<const float*>(previous_row), u, block, previous_cell_grad);
        }
        const Vec* gate_grads = scratch.gate_grads.data();
        const Vec* stacked = scratch.stacked.data();
        InRowPairs(stacked_rows, [&](auto rows, int first) {
          StackedRowGrad<rows>(dims, kernel.data(), gate_grads, first, block, inputs_grad, previous_hidden_grad);
          KernelGradRows<rows>(stacked, gate_grads, first, gates, kernel_partial);
        });
        for (int g = 0; g < gates; ++g) {
          Vec sum = gate_grads[g * kVectors];
          for (int v = 1; v < kVectors; ++v) sum += gate_grads[g * kVectors + v];
          bias_partial[g * dims.episodes + block.episode] += sum;
        }
      }
      float* sums = shard_sums.data() + shard * sums_size;
      SumLanes(kernel_partials, sums);
      SumLanes(bias_partials, sums + kernel_size);
      SumLanes(readout_partials, sums + kernel_size + bias_size);
    });

    const auto total = [&](size_t index) {  // entry `index` of a shard's row, summed in shard order
      float sum = 0.0f;
      for (int shard = 0; shard < shards; ++shard) sum += shard_sums[shard * sums_size + index];
      return sum;
    };
    float* kernel_grad_input = outputs[3]->flat<float>().data();
    float* kernel_grad_recurrent = outputs[4]->flat<float>().data();
    float* bias_grad = outputs[5]->flat<float>().data();
    float* readout_kernel_grad = outputs[6]->flat<float>().data();
    const size_t input_size = static_cast<size_t>(dims.features) * gates;
    for (size_t i = 0; i < kernel_size; ++i) {
      if (i < input_size) {
        kernel_grad_input[i] = total(i);
      } else {
        kernel_grad_recurrent[i - input_size] = total(i);
      }
    }
    for (size_t i = 0; i < bias_size; ++i) bias_grad[i] = total(kernel_size + i);
    for (size_t i = 0; i < readout_size; ++i) readout_kernel_grad[i] = total(kernel_size + bias_size + i);
  }
};

// "<lanes> lanes, FMA" or "<lanes> lanes, no FMA": what this build's results depend on besides its inputs (the
// order of the kernel gradients' sums follows the vector width; fused multiply-adds round once). A training run
// records it, so that a run resumed on a build that rounds differently can say it will not continue bitwise.
class ArithmeticOp : public OpKernel {
 public:
  explicit ArithmeticOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    Tensor* description = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({}), &description));
#ifdef __FMA__
    const char* multiply_adds = "FMA";
#else
    const char* multiply_adds = "no FMA";
#endif
    description->scalar<::tensorflow::tstring>()() = std::to_string(kLanes) + " lanes, " + multiply_adds;
  }
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("MetaLstmCoordinateStep").Device(::tensorflow::DEVICE_CPU), CoordinateStepOp);
REGISTER_KERNEL_BUILDER(Name("MetaLstmCoordinateStepGrad").Device(::tensorflow::DEVICE_CPU),
                        CoordinateStepGradOp);
REGISTER_KERNEL_BUILDER(Name("MetaLstmKernelArithmetic").Device(::tensorflow::DEVICE_CPU), ArithmeticOp);

}  // namespace keras_metalstm
