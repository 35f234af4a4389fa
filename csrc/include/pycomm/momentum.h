// DGC momentum correction of one element, shared by the CPU and CUDA kernels
// so that both round every step the same way.
#pragma once

#include "pycomm/common.h"

namespace pycomm {

// u = m*u + g; v += u, or (Nesterov) u = m*(u + g); v += u + g.
PYCOMM_HD void momentum_correction(float g, float& u, float& v, float momentum, bool nesterov) {
  if (nesterov) {
    u = mul_rn(momentum, add_rn(u, g));
    v = add_rn(v, add_rn(u, g));
  } else {
    u = add_rn(mul_rn(momentum, u), g);
    v = add_rn(v, u);
  }
}

}  // namespace pycomm
