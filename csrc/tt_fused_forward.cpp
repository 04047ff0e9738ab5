// tt_embedding_bag_fused's forward, one implementation for every device: the lookup is
// tt_embedding_bag's; the fused op only adds its optimizer arguments, checked here so that a bad
// optimizer name, learning rate or state fails at the lookup rather than in backward, after the
// forward has been used. (Its backward, tt_embedding_bag_backward_fused_, is per device.)
#include <torch/library.h>

#include <optional>
#include <string>

#include "tt_checks.h"

namespace torchrec_tt {
namespace {

at::Tensor fused_forward(at::TensorList cores, at::TensorList optimizer_state, const at::Tensor& indices,
                         const at::Tensor& offsets, const std::optional<at::Tensor>& psw, int64_t num_embeddings,
                         int64_t pooling_mode, bool include_last_offset, int64_t bounds_check_mode,
                         c10::string_view optimizer, double learning_rate, double eps, c10::string_view table_name) {
  check_fused_args(std::string(table_name), cores, optimizer_state, indices, offsets, psw, num_embeddings,
                   pooling_mode, include_last_offset, bounds_check_mode, std::string(optimizer), learning_rate, eps);
  static const auto lookup = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("torchrec_tt::tt_embedding_bag", "")
                                 .typed<at::Tensor(at::TensorList, const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, int64_t, int64_t, bool, int64_t,
                                                   c10::string_view)>();
  return lookup.call(cores, indices, offsets, psw, num_embeddings, pooling_mode, include_last_offset,
                     bounds_check_mode, table_name);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_tt, CPU, m) { m.impl("tt_embedding_bag_fused", &fused_forward); }
TORCH_LIBRARY_IMPL(torchrec_tt, CUDA, m) { m.impl("tt_embedding_bag_fused", &fused_forward); }

}  // namespace torchrec_tt
