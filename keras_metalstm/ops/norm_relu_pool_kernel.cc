// A fused CPU kernel for a convolutional learner's block tail: training-mode batch normalisation, ReLU and 2x2
// max pooling (stride 2, no padding), forward and backward, on float32 NHWC activations whose channel count is a
// multiple of 8.
//
// Why: TensorFlow runs the three as separate oneDNN ops, each a pass over the full-size activations and as many
// again backward (about a dozen passes in all), and in a meta-training step on a CPU those passes cost about as
// much as the learner's convolutions. Here the forward op reads the activations twice (their moments, then one
// pass that normalises, rectifies and pools) and writes only quarter-size outputs; the backward op reads them
// once more and writes their gradient.
//
// Equations (per channel; M = N*H*W values, moments over all of them, as keras.layers.BatchNormalization in
// training):
//   mean = sum(x) / M, variance = sum((x - mean)^2) / M (biased), xhat = (x - mean) / sqrt(variance + eps),
//   y = gamma * xhat + beta, pooled = max over each 2x2 window of relu(y) = relu(max over the window of y).
// The last row and column of an odd-sized input are in the moments but in no window (VALID pooling).
// Backward, for the gradient g of `pooled`: dy = g at the window's first maximum where that maximum is > 0, else 0;
//   dbeta = sum(dy), dgamma = sum(dy * xhat), dx = gamma / sqrt(variance + eps) * (dy - dbeta/M - xhat*dgamma/M).
// The forward op also returns xhat at each window's maximum (quarter size), so that the backward op's sums read
// only quarter-size tensors; its pass over x recomputes each window's maximum with the forward op's arithmetic,
// so the two always agree on where it is.
//
// Sums are taken over fixed chunks of kChunk pixels, in float within a chunk and in double across chunks in
// chunk order: the results are bitwise the same with any number of threads. The moments are sums of x minus
// the first pixel's values (a shift that keeps the variance's subtraction small).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
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
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;

REGISTER_OP("MetaLstmNormReluPool")
    .Input("inputs: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Attr("epsilon: float")
    .Output("pooled: float")
    .Output("mean: float")
    .Output("variance: float")
    .Output("normalized_at_max: float")
    .SetShapeFn([](InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle inputs;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &inputs));
      DimensionHandle height, width;
      TF_RETURN_IF_ERROR(c->Divide(c->Dim(inputs, 1), 2, /*evenly_divisible=*/false, &height));
      TF_RETURN_IF_ERROR(c->Divide(c->Dim(inputs, 2), 2, /*evenly_divisible=*/false, &width));
      const auto pooled = c->MakeShape({c->Dim(inputs, 0), height, width, c->Dim(inputs, 3)});
      const auto channels = c->Vector(c->Dim(inputs, 3));
      c->set_output(0, pooled);
      c->set_output(1, channels);
      c->set_output(2, channels);
      c->set_output(3, pooled);
      return Status();
    });

REGISTER_OP("MetaLstmNormReluPoolGrad")
    .Input("inputs: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("mean: float")
    .Input("variance: float")
    .Input("pooled: float")
    .Input("normalized_at_max: float")
    .Input("pooled_grad: float")
    .Attr("epsilon: float")
    .Output("inputs_grad: float")
    .Output("gamma_grad: float")
    .Output("beta_grad: float")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      c->set_output(2, c->input(1));
      return Status();
    });

namespace {

// Eight lanes (one AVX register): the kernel is bound by memory traffic, not arithmetic, so wider registers
// would gain nothing and would ask more of the channel count.
constexpr int kLanes = 8;
typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef int IntVec __attribute__((vector_size(4 * kLanes)));
typedef float UnalignedVec __attribute__((vector_size(4 * kLanes), aligned(4)));

constexpr int64_t kChunk = 1024;  // pixels per partial sum

inline Vec Load(const float* source) { return *reinterpret_cast<const UnalignedVec*>(source); }
inline void Store(float* target, Vec value) { *reinterpret_cast<UnalignedVec*>(target) = value; }

struct Shape {
  int64_t images, height, width, channels;
  int64_t pooled_height() const { return height / 2; }
  int64_t pooled_width() const { return width / 2; }
  int64_t pixels() const { return images * height * width; }
  TensorShape pooled() const { return TensorShape({images, pooled_height(), pooled_width(), channels}); }
};

Status ReadShape(const Tensor& inputs, const Tensor& gamma, Shape* shape) {
  if (inputs.dims() != 4) {
    return InvalidArgument("inputs must have rank 4 (images, height, width, channels), got shape ",
                           inputs.shape().DebugString());
  }
  *shape = {inputs.dim_size(0), inputs.dim_size(1), inputs.dim_size(2), inputs.dim_size(3)};
  if (shape->channels % kLanes != 0 || shape->pixels() == 0) {
    return InvalidArgument("inputs must be non-empty with a multiple of ", kLanes, " channels, got shape ",
                           inputs.shape().DebugString());
  }
  if (gamma.dims() != 1 || gamma.dim_size(0) != shape->channels) {
    return InvalidArgument("gamma must have shape (", shape->channels, "), got ", gamma.shape().DebugString());
  }
  return Status();
}

template <typename Work>
void ParallelFor(OpKernelContext* context, int64_t count, int64_t cost_per_item, Work work) {
  auto* pool = context->device()->tensorflow_cpu_worker_threads()->workers;
  pool->ParallelFor(count, cost_per_item, [&](int64_t first, int64_t end) {
    for (int64_t item = first; item < end; ++item) work(item);
  });
}

// Per-channel sums of first(p) and first(p) * second(p) over rows p < rows, each (channels) long; `values(p,
// k, &first, &second)` gives one register of both for row p from channel k.
template <typename Values>
void ChannelSums(OpKernelContext* context, int64_t rows, int64_t channels, Values values,
                 std::vector<double>* first_sums, std::vector<double>* product_sums) {
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  const int64_t registers = channels / kLanes;
  std::vector<Vec> partials(chunks * 2 * registers);
  ParallelFor(context, chunks, kChunk * channels * 4, [&](int64_t chunk) {
    const int64_t end = std::min(rows, (chunk + 1) * kChunk);
    // Register by register, so both sums stay in registers; the chunk's rows are in the cache after the first.
    for (int64_t r = 0; r < registers; ++r) {
      Vec first_sum = {}, product_sum = {};
      for (int64_t row = chunk * kChunk; row < end; ++row) {
        Vec first, second;
        values(row, r * kLanes, &first, &second);
        first_sum += first;
        product_sum += first * second;
      }
      partials[(2 * chunk) * registers + r] = first_sum;
      partials[(2 * chunk + 1) * registers + r] = product_sum;
    }
  });
  first_sums->assign(channels, 0.0);
  product_sums->assign(channels, 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t r = 0; r < registers; ++r) {
      for (int lane = 0; lane < kLanes; ++lane) {
        (*first_sums)[r * kLanes + lane] += partials[(2 * chunk) * registers + r][lane];
        (*product_sums)[r * kLanes + lane] += partials[(2 * chunk + 1) * registers + r][lane];
      }
    }
  }
}

std::vector<float> InverseDeviation(const Shape& shape, const float* variance, float epsilon) {
  std::vector<float> inverse(shape.channels);
  for (int64_t k = 0; k < shape.channels; ++k) {
    inverse[k] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(variance[k]) + epsilon));
  }
  return inverse;
}

// gamma / sqrt(variance + eps), per channel.
std::vector<float> Scale(const Shape& shape, const float* gamma, const std::vector<float>& inverse_deviation) {
  std::vector<float> scale(shape.channels);
  for (int64_t k = 0; k < shape.channels; ++k) scale[k] = gamma[k] * inverse_deviation[k];
  return scale;
}

// Each corner of a 2x2 window from its top-left pixel, row-major.
typedef std::array<int64_t, 4> Corners;

inline Corners WindowCorners(const Shape& shape) {
  const int64_t row = shape.width * shape.channels;
  return {0, shape.channels, row, row + shape.channels};
}

// One register of channels of a 2x2 window: the largest y, the x it comes from and its corner (0-3, row-major;
// the first on ties, as TensorFlow's max pooling).
struct WindowMax {
  Vec y, x;
  IntVec corner;
};

// y = (x - mean) * scale + beta, scale = gamma / sqrt(variance + eps): centred before it is scaled, which loses less
// accuracy than x * scale + (beta - mean * scale) where the mean is far from zero. The forward and backward ops
// both find the maximum here, with the same arithmetic, so they agree on where it is.
inline WindowMax MaxOfWindow(const float* window, const Corners& corners, int64_t k, Vec mean, Vec scale,
                             Vec beta) {
  WindowMax best;
  best.x = Load(window + k);
  best.y = (best.x - mean) * scale + beta;
  best.corner = IntVec{};
  for (int corner = 1; corner < 4; ++corner) {
    const Vec x = Load(window + corners[corner] + k);
    const Vec y = (x - mean) * scale + beta;
    const IntVec larger = y > best.y;
    best.y = larger ? y : best.y;
    best.x = larger ? x : best.x;
    best.corner = larger ? IntVec{} + corner : best.corner;
  }
  return best;
}

// Where window (window_row, column)'s top-left pixel starts in an NHWC tensor of `shape` (window_row counts the
// windows' rows over all images).
inline int64_t WindowStart(const Shape& shape, int64_t window_row, int64_t column) {
  const int64_t image = window_row / shape.pooled_height(), row = 2 * (window_row % shape.pooled_height());
  return ((image * shape.height + row) * shape.width + 2 * column) * shape.channels;
}

// What the forward and backward ops share: the epsilon attribute, and inputs 0 and 1 (inputs, gamma) checked.
class NormReluPoolKernel : public OpKernel {
 public:
  explicit NormReluPoolKernel(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* context) final {
    Shape shape;
    OP_REQUIRES_OK(context, ReadShape(context->input(0), context->input(1), &shape));
    Run(context, context->input(0), shape);
  }

 protected:
  virtual void Run(OpKernelContext* context, const Tensor& inputs, const Shape& shape) = 0;

  float epsilon_;
};

class NormReluPoolOp : public NormReluPoolKernel {
 public:
  using NormReluPoolKernel::NormReluPoolKernel;

  void Run(OpKernelContext* context, const Tensor& inputs, const Shape& shape) override {
    const int64_t channels = shape.channels;
    const TensorShape pooled_shape = shape.pooled();
    Tensor *pooled, *mean_output, *variance_output, *normalized_at_max;
    OP_REQUIRES_OK(context, context->allocate_output(0, pooled_shape, &pooled));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({channels}), &mean_output));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({channels}), &variance_output));
    OP_REQUIRES_OK(context, context->allocate_output(3, pooled_shape, &normalized_at_max));
    const float* x = inputs.flat<float>().data();
    float* mean = mean_output->flat<float>().data();
    float* variance = variance_output->flat<float>().data();

    const std::vector<float> shift(x, x + channels);
    std::vector<double> shifted_sums, square_sums;
    ChannelSums(
        context, shape.pixels(), channels,
        [&](int64_t pixel, int64_t k, Vec* first, Vec* second) {
          *first = *second = Load(x + pixel * channels + k) - Load(shift.data() + k);
        },
        &shifted_sums, &square_sums);
    const double pixels = static_cast<double>(shape.pixels());
    for (int64_t k = 0; k < channels; ++k) {
      const double shifted_mean = shifted_sums[k] / pixels;
      mean[k] = static_cast<float>(shifted_mean + shift[k]);
      variance[k] = static_cast<float>(std::max(0.0, square_sums[k] / pixels - shifted_mean * shifted_mean));
    }
    const std::vector<float> inverse_deviation = InverseDeviation(shape, variance, epsilon_);
    const std::vector<float> scale = Scale(shape, context->input(1).flat<float>().data(), inverse_deviation);
    const float* beta = context->input(2).flat<float>().data();

    float* pooled_values = pooled->flat<float>().data();
    float* normalized_values = normalized_at_max->flat<float>().data();
    const int64_t window_rows = shape.images * shape.pooled_height();
    const Corners corners = WindowCorners(shape);
    ParallelFor(context, window_rows, shape.pooled_width() * channels * 12, [&](int64_t window_row) {
      for (int64_t column = 0; column < shape.pooled_width(); ++column) {
        const float* window = x + WindowStart(shape, window_row, column);
        const int64_t out = (window_row * shape.pooled_width() + column) * channels;
        for (int64_t k = 0; k < channels; k += kLanes) {
          const WindowMax best =
              MaxOfWindow(window, corners, k, Load(mean + k), Load(scale.data() + k), Load(beta + k));
          const Vec zero = {};
          Store(pooled_values + out + k, best.y > zero ? best.y : zero);
          Store(normalized_values + out + k, (best.x - Load(mean + k)) * Load(inverse_deviation.data() + k));
        }
      }
    });
  }
};

class NormReluPoolGradOp : public NormReluPoolKernel {
 public:
  using NormReluPoolKernel::NormReluPoolKernel;

  void Run(OpKernelContext* context, const Tensor& inputs, const Shape& shape) override {
    const int64_t channels = shape.channels;
    const TensorShape pooled_shape = shape.pooled();
    for (int input = 5; input < 8; ++input) {
      OP_REQUIRES(context, context->input(input).shape() == pooled_shape,
                  InvalidArgument("input ", input, " must have the pooled shape ", pooled_shape.DebugString(),
                                  ", got ", context->input(input).shape().DebugString()));
    }
    const float* x = inputs.flat<float>().data();
    const float* gamma = context->input(1).flat<float>().data();
    const float* mean = context->input(3).flat<float>().data();
    const float* pooled = context->input(5).flat<float>().data();
    const float* normalized_at_max = context->input(6).flat<float>().data();
    const float* pooled_grad = context->input(7).flat<float>().data();
    Tensor *inputs_grad, *gamma_grad, *beta_grad;
    OP_REQUIRES_OK(context, context->allocate_output(0, inputs.shape(), &inputs_grad));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({channels}), &gamma_grad));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({channels}), &beta_grad));

    // dbeta and dgamma from the quarter-size tensors: dy is the pooled gradient where the window's maximum is
    // positive (the pooled value is), at that maximum.
    std::vector<double> beta_sums, gamma_sums;
    ChannelSums(
        context, shape.images * shape.pooled_height() * shape.pooled_width(), channels,
        [&](int64_t window, int64_t k, Vec* first, Vec* second) {
          const int64_t at = window * channels + k;
          const Vec zero = {};
          *first = Load(pooled + at) > zero ? Load(pooled_grad + at) : zero;
          *second = Load(normalized_at_max + at);
        },
        &beta_sums, &gamma_sums);
    const std::vector<float> inverse_deviation =
        InverseDeviation(shape, context->input(4).flat<float>().data(), epsilon_);
    const std::vector<float> scale = Scale(shape, gamma, inverse_deviation);
    const float* beta = context->input(2).flat<float>().data();
    // dx = scale * dy + (x - mean) * slope + constant, per channel.
    std::vector<float> slope(channels), constant(channels);
    const double pixels = static_cast<double>(shape.pixels());
    for (int64_t k = 0; k < channels; ++k) {
      gamma_grad->flat<float>()(k) = static_cast<float>(gamma_sums[k]);
      beta_grad->flat<float>()(k) = static_cast<float>(beta_sums[k]);
      const double channel_scale = static_cast<double>(gamma[k]) * inverse_deviation[k];
      slope[k] = static_cast<float>(-channel_scale * inverse_deviation[k] * gamma_sums[k] / pixels);
      constant[k] = static_cast<float>(-channel_scale * beta_sums[k] / pixels);
    }

    float* dx = inputs_grad->flat<float>().data();
    const auto outside_windows = [&](const float* x_pixel, float* dx_pixel) {
      for (int64_t k = 0; k < channels; k += kLanes) {
        Store(dx_pixel + k, (Load(x_pixel + k) - Load(mean + k)) * Load(slope.data() + k) + Load(constant.data() + k));
      }
    };
    const int64_t window_rows = shape.images * shape.pooled_height();
    const int64_t row_size = shape.width * channels;
    const Corners corners = WindowCorners(shape);
    ParallelFor(context, window_rows, shape.pooled_width() * channels * 24, [&](int64_t window_row) {
      for (int64_t column = 0; column < shape.pooled_width(); ++column) {
        const int64_t start = WindowStart(shape, window_row, column);
        const int64_t out = (window_row * shape.pooled_width() + column) * channels;
        for (int64_t k = 0; k < channels; k += kLanes) {
          const Vec channel_mean = Load(mean + k), channel_scale = Load(scale.data() + k);
          const WindowMax best = MaxOfWindow(x + start, corners, k, channel_mean, channel_scale, Load(beta + k));
          const Vec zero = {};
          const Vec dy = best.y > zero ? Load(pooled_grad + out + k) * channel_scale : zero;
          const Vec channel_slope = Load(slope.data() + k), channel_constant = Load(constant.data() + k);
          for (int corner = 0; corner < 4; ++corner) {
            const int64_t at = start + corners[corner] + k;
            const Vec base = (Load(x + at) - channel_mean) * channel_slope + channel_constant;
            Store(dx + at, best.corner == corner ? base + dy : base);
          }
        }
      }
      // An odd width's last column, and an odd height's last row after the image's last window row.
      const int64_t top = WindowStart(shape, window_row, 0);
      if (shape.width % 2) {
        for (int64_t row = 0; row < 2; ++row) {
          const int64_t at = top + row * row_size + (shape.width - 1) * channels;
          outside_windows(x + at, dx + at);
        }
      }
      if (shape.height % 2 && window_row % shape.pooled_height() == shape.pooled_height() - 1) {
        for (int64_t column = 0; column < shape.width; ++column) {
          const int64_t at = top + 2 * row_size + column * channels;
          outside_windows(x + at, dx + at);
        }
      }
    });
    // An image of height 1 has no window rows: every pixel is outside the windows.
    if (shape.pooled_height() == 0) {
      for (int64_t pixel = 0; pixel < shape.pixels(); ++pixel) {
        outside_windows(x + pixel * channels, dx + pixel * channels);
      }
    }
  }
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("MetaLstmNormReluPool").Device(::tensorflow::DEVICE_CPU), NormReluPoolOp);
REGISTER_KERNEL_BUILDER(Name("MetaLstmNormReluPoolGrad").Device(::tensorflow::DEVICE_CPU), NormReluPoolGradOp);

}  // namespace keras_metalstm
