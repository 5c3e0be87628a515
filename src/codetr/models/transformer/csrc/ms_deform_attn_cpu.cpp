// Multi-scale deformable attention for the CPU: bilinear sampling (grid_sample semantics, align_corners=False,
// zero padding) of every head's value maps, weighted by the attention weights. Forward and backward.
// Written for codetr; parallel over (batch, head) so that gradient scatters never race.
// The value comes head-major, (B, H, N, D): one head's maps are then one contiguous block (2 MB at the R50
// encoder's 512x512 shapes instead of 128-byte pieces strided over 22 MB), which is what the random bilinear
// reads hit. The channel loops are compiled for D = 32 (the model's 256 / 8 heads) and for any D.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {

template <typename T>
struct Corner {
  int64_t index;  // token index inside the flattened value sequence, -1 = outside the map
  T weight;       // bilinear weight
};

template <typename T>
inline void corners(T loc_x, T loc_y, int64_t h, int64_t w, int64_t start, Corner<T> out[4], T& fx, T& fy,
                    int64_t& x0, int64_t& y0) {
  // The pixel coordinate is rounded step by step exactly as the reference computes it (grid = 2 * loc - 1, then
  // grid_sample's (grid + 1) * size / 2 - 0.5; the build disables FMA contraction): where a location falls on an
  // integer pixel position, a different last bit moves it to the neighbouring cell, and the location gradient of
  // bilinear sampling jumps there (zero-size boxes and border reference points land on such positions).
  const T grid_x = T(2) * loc_x - T(1), grid_y = T(2) * loc_y - T(1);
  const T x = (grid_x + T(1)) * (static_cast<T>(w) / T(2)) - T(0.5);
  const T y = (grid_y + T(1)) * (static_cast<T>(h) / T(2)) - T(0.5);
  const T xf = std::floor(x), yf = std::floor(y);
  x0 = static_cast<int64_t>(xf);
  y0 = static_cast<int64_t>(yf);
  fx = x - xf;
  fy = y - yf;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const T ws[4] = {(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy};
  for (int c = 0; c < 4; ++c) {
    const bool inside = xs[c] >= 0 && xs[c] < w && ys[c] >= 0 && ys[c] < h;
    out[c].index = inside ? start + ys[c] * w + xs[c] : -1;
    out[c].weight = ws[c];
  }
}

template <typename T, int kD>
void forward_kernel(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc, const T* attn,
                    T* out, int64_t B, int64_t N, int64_t H, int64_t D_runtime, int64_t Q, int64_t L, int64_t P) {
  const int64_t D = kD > 0 ? kD : D_runtime;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc_buf(D);
    T* acc = acc_buf.data();
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, m = bh % H;
      const T* value_bh = value + bh * N * D;
      for (int64_t q = 0; q < Q; ++q) {
        for (int64_t d = 0; d < D; ++d) acc[d] = 0;
        for (int64_t l = 0; l < L; ++l) {
          for (int64_t p = 0; p < P; ++p) {
            const int64_t s = (((b * Q + q) * H + m) * L + l) * P + p;
            Corner<T> cs[4];
            T fx, fy;
            int64_t x0, y0;
            corners(loc[2 * s], loc[2 * s + 1], shapes[2 * l], shapes[2 * l + 1], starts[l], cs, fx, fy, x0, y0);
            const T a = attn[s];
            for (int c = 0; c < 4; ++c) {
              if (cs[c].index < 0) continue;
              const T wgt = a * cs[c].weight;
              const T* v = value_bh + cs[c].index * D;
              for (int64_t d = 0; d < D; ++d) acc[d] += wgt * v[d];
            }
          }
        }
        T* o = out + ((b * Q + q) * H + m) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[d];
      }
    }
  });
}

template <typename T, int kD>
void backward_kernel(const T* grad_out, const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                     const T* attn, T* grad_value, T* grad_loc, T* grad_attn, int64_t B, int64_t N, int64_t H,
                     int64_t D_runtime, int64_t Q, int64_t L, int64_t P) {
  const int64_t D = kD > 0 ? kD : D_runtime;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, m = bh % H;
      for (int64_t q = 0; q < Q; ++q) {
        const T* g = grad_out + ((b * Q + q) * H + m) * D;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
          for (int64_t p = 0; p < P; ++p) {
            const int64_t s = (((b * Q + q) * H + m) * L + l) * P + p;
            Corner<T> cs[4];
            T fx, fy;
            int64_t x0, y0;
            corners(loc[2 * s], loc[2 * s + 1], h, w, starts[l], cs, fx, fy, x0, y0);
            const T a = attn[s];
            T dot[4] = {0, 0, 0, 0};  // <grad_out, value at corner>
            for (int c = 0; c < 4; ++c) {
              if (cs[c].index < 0) continue;
              const T* v = value + ((b * H + m) * N + cs[c].index) * D;
              T* gv = grad_value + ((b * H + m) * N + cs[c].index) * D;
              const T wgt = a * cs[c].weight;
              T acc = 0;
              for (int64_t d = 0; d < D; ++d) {
                acc += g[d] * v[d];
                gv[d] += wgt * g[d];
              }
              dot[c] = acc;
            }
            grad_attn[s] = cs[0].weight * dot[0] + cs[1].weight * dot[1] + cs[2].weight * dot[2] + cs[3].weight * dot[3];
            // d(bilinear)/d(fx), d/d(fy); x = loc_x * w - 0.5 -> dx/dloc_x = w
            const T dfx = (1 - fy) * (dot[1] - dot[0]) + fy * (dot[3] - dot[2]);
            const T dfy = (1 - fx) * (dot[2] - dot[0]) + fx * (dot[3] - dot[1]);
            grad_loc[2 * s] = a * dfx * w;
            grad_loc[2 * s + 1] = a * dfy * h;
          }
        }
      }
    }
  });
}

}  // namespace

torch::Tensor ms_deform_attn_forward(torch::Tensor value, torch::Tensor shapes, torch::Tensor starts,
                                     torch::Tensor loc, torch::Tensor attn) {
  const int64_t B = value.size(0), H = value.size(1), N = value.size(2), D = value.size(3);
  const int64_t Q = loc.size(1), L = loc.size(3), P = loc.size(4);
  auto out = torch::empty({B, Q, H, D}, value.options());  // every element is written
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward", [&] {
    auto fn = D == 32 ? forward_kernel<scalar_t, 32> : forward_kernel<scalar_t, 0>;
    fn(value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                             loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, N, H,
                             D, Q, L, P);
  });
  return out;
}

std::vector<torch::Tensor> ms_deform_attn_backward(torch::Tensor grad_out, torch::Tensor value, torch::Tensor shapes,
                                                   torch::Tensor starts, torch::Tensor loc, torch::Tensor attn) {
  const int64_t B = value.size(0), H = value.size(1), N = value.size(2), D = value.size(3);
  const int64_t Q = loc.size(1), L = loc.size(3), P = loc.size(4);
  auto grad_value = torch::zeros_like(value);
  auto grad_loc = torch::empty_like(loc);  // written for every sample
  auto grad_attn = torch::empty_like(attn);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward", [&] {
    auto fn = D == 32 ? backward_kernel<scalar_t, 32> : backward_kernel<scalar_t, 0>;
    fn(grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                              starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
                              grad_attn.data_ptr<scalar_t>(), B, N, H, D, Q, L, P);
  });
  return {grad_value, grad_loc, grad_attn};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ms_deform_attn_forward, "multi-scale deformable attention forward (CPU)");
  m.def("backward", &ms_deform_attn_backward, "multi-scale deformable attention backward (CPU)");
}
