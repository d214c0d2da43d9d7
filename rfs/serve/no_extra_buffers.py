"""llama-cpp-python without ggml's extra CPU buffer types, for every process of rfs's that loads a GGUF.

ggml repacks weights into "extra" buffer types for its fastest CPU kernels; on a CPU with AMX
(Sapphire Rapids and later) that selects its AMX matmul, which segfaulted llama-cpp-python 0.3.36's
server on its first request on the development VM (gdb: ggml_backend_amx_mul_mat). Nothing in
llama-cpp-python turns them off, so `apply()` makes every model load start from parameters with
`use_extra_bufts = False`.
"""

import llama_cpp.llama_cpp as lib

_defaults = lib.llama_model_default_params


def _model_params():  # type: ignore[no-untyped-def]
    params = _defaults()
    params.use_extra_bufts = False
    return params


def apply() -> None:
    lib.llama_model_default_params = _model_params
